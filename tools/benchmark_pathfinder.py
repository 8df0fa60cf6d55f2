#!/usr/bin/env python
"""Pathfinder benchmark of the gradient methods at CPU scale (a documented command, not a test).

The benchmark lives in :mod:`rfpn.benchmarks.pathfinder` (its docstring says what is measured and
kept); this script is its command line::

    python tools/benchmark_pathfinder.py --iters 3000 --prepare --jobs 2 --copy-to-docs
"""
from rfpn.benchmarks.pathfinder import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main)

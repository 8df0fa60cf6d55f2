#!/usr/bin/env python
"""Long contours, 3x3 kernels, a memory budget: where C-RBP should win (a documented command, not a test).

The benchmark lives in :mod:`rfpn.benchmarks.long_contours` (its docstring says what is measured and
kept); this script is its command line::

    python tools/benchmark_long_contours.py --prepare --jobs 2 --copy-to-docs
"""
from rfpn.benchmarks.long_contours import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main)

#!/usr/bin/env python
"""Panoptic FPN vs R-FPN (and the RevNet-18 backbone) on the synthetic panoptic set at CPU scale.

The benchmark lives in :mod:`rfpn.benchmarks.rfpn_panoptic` (its docstring says what is measured
and kept); this script is its command line::

    python tools/benchmark_rfpn.py --models fpn crbp20 revnet18 --seeds 0 1 2 3 4 5 6 7 --iters 300 --jobs 2 \\
        --output-dir output/benchmark_rfpn_300
"""
import sys

from rfpn.benchmarks.rfpn_panoptic import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

#!/usr/bin/env python
"""Command line of :mod:`rfpn.benchmarks.parameter_counts`: parameter counts of every packaged Panoptic FPN / R-FPN."""
import sys

from rfpn.benchmarks.parameter_counts import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

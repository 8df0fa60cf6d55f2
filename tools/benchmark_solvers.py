#!/usr/bin/env python
"""Command line of :mod:`rfpn.benchmarks.solvers` (its docstring says what is measured and written); ``--help`` lists the flags."""
import sys

from rfpn.benchmarks.solvers import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

#!/usr/bin/env python
"""Command line of :mod:`rfpn.benchmarks.momentum_sequences` (its docstring says what is measured and written); ``--help`` lists the flags."""
import sys

from rfpn.benchmarks.momentum_sequences import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

#!/usr/bin/env python
"""Memory and time of one training step of the recurrent core, per gradient method and step count.

The benchmark lives in :mod:`rfpn.benchmarks.recurrent_memory` (its docstring lists what is
measured); this script is its command line::

    python tools/benchmark_memory.py --copy-to-docs
    python tools/benchmark_memory.py --methods bptt crbp reversible reversible-additive --steps 1 5 20 80
"""
import sys

from rfpn.benchmarks.recurrent_memory import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

#!/usr/bin/env python
"""bf16 over fp32 speed-ups of several ``benchmark_memory --precisions fp32 bf16`` runs: JSON, table, figure.

The logic lives in :mod:`rfpn.benchmarks.precision_speedup`; the runs behind the committed results::

    for k in 7 15; do for c in 25 8; do
      python tools/benchmark_memory.py --methods crbp --steps 5 20 80 --precisions fp32 bf16 \\
          --channels $c --kernel $k --norm bn --threads 1 --output-dir output/bf16_c${c}_k${k}
    done; done
    python tools/plot_precision_speedup.py output/bf16_c*_k*/memory.json --output output/precision_speedup.json
"""
import sys

from rfpn.benchmarks.precision_speedup import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

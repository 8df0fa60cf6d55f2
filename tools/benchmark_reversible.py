#!/usr/bin/env python
"""Float32 drift of reversible recurrences: rebuilt-state error vs inversions, gradient cosine with BPTT.

Writes ``reversible_drift.json`` and ``reversible_drift.png`` to ``--output-dir`` (see
:mod:`rfpn.analysis.reversible_drift`)::

    python tools/benchmark_reversible.py --output-dir output/benchmark_reversible --copy-to-docs
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from rfpn.analysis.figures import plot_reconstruction_drift
from rfpn.analysis.reversible_drift import DriftSettings, drift_report
from rfpn.utils import run_cli
from rfpn.utils.cli import tool_parser
from rfpn.utils.files import report_written, write_json_atomic



def main(argv: list[str]) -> None:
    parser = tool_parser(__doc__, threads=1, output_dir="output/benchmark_reversible", copy_to_docs=True)
    parser.add_argument("--steps", type=int, default=80, help="steps of the reconstruction curves")
    parser.add_argument("--cosine-steps", nargs="+", type=int, default=[20, 80])
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.9, 0.8, 0.5])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    report = drift_report(DriftSettings(), args.steps, tuple(args.cosine_steps), tuple(args.gammas))
    report["command"] = "python tools/benchmark_reversible.py " + " ".join(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "reversible_drift.json", out / "reversible_drift.png"
    write_json_atomic(str(json_path), report)
    plot_reconstruction_drift(str(png_path), report["reconstruction_error"])
    for c in report["gradient_cosine"]:
        print(f"{c['coupling']:9s} gamma={c['gamma']!s:4s} exact={c['exact']!s:5s} steps={c['steps']:3d} "
              f"1 - cosine with BPTT: {c['one_minus_cosine']:.2e}")
    for label, curve in report["reconstruction_error"].items():
        print(f"{label:22s} error after {len(curve)} inversions: {curve[-1]:.3g}")
    report_written(json_path, png_path, to_docs=args.copy_to_docs)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

#!/usr/bin/env python
"""Activation memory and time of one training step of ResNet and RevNet bottom-up networks of equal depth.

One fresh process per backbone (see :mod:`rfpn.benchmarks.backbone_memory`); writes
``backbone_memory.json`` and ``backbone_memory.png`` to ``--output-dir``::

    python tools/benchmark_backbones.py --copy-to-docs
"""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from rfpn.analysis.figures import plot_backbone_memory
from rfpn.benchmarks.backbone_memory import BACKBONES, compare, format_table, measure_in_subprocess
from rfpn.utils import run_cli
from rfpn.utils.cli import tool_parser
from rfpn.utils.files import report_written, write_json_atomic



def main(argv: list[str]) -> None:
    parser = tool_parser(__doc__, threads=1, output_dir="output/benchmark_backbones", copy_to_docs=True)
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), default=list(BACKBONES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per backbone (median reported)")
    args = parser.parse_args(argv)
    rows = [measure_in_subprocess(b, args.batch, args.size, args.repeats, args.threads)
            for b in tqdm(args.backbones, desc="backbones", unit="backbone")]
    ratios = compare(rows)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "backbone_memory.json", out / "backbone_memory.png"
    write_json_atomic(str(json_path), {"command": "python tools/benchmark_backbones.py " + " ".join(argv),
                                       "backbones": rows, "ratios": ratios})
    plot_backbone_memory(str(png_path), rows)
    print(format_table(rows, ratios))
    report_written(json_path, png_path, to_docs=args.copy_to_docs)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

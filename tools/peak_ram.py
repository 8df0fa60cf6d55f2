#!/usr/bin/env python
"""Peak activation memory of one inference: the operator rule, tensor liveness and what eager PyTorch held.

``report``: any rfpn or Detectron2 config, one part (stem, bottom_up, backbone, model) at one size;
prints the layer table and writes ``peak_ram.json`` and ``peak_ram.png`` (memory over the operator
sequence). ``--rss`` also measures the peak RSS increase of the same inference in a fresh process::

    python tools/peak_ram.py report configs/Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool.yaml \\
        --part backbone --size 800 1333 --depth 3 --rss

``stems``: the ResNet stem vs the RNNPool stem (batched and streaming) of the synthetic R-18 configs,
with FLOPs and the fresh-process RSS check (docs/rnnpool.md). The committed results
(``benchmarks/results/peak_ram.json``, ``docs/figures/peak_ram.png``; about 3 minutes on one thread)::

    python tools/peak_ram.py stems --point stem:128x128 backbone:128x128 stem:800x1333 --copy-to-docs

Counting and its blind spots: :mod:`rfpn.analysis.peak_ram`; the points: :mod:`rfpn.benchmarks.peak_ram`.
"""
from __future__ import annotations

import argparse
import re
import sys

import torch

from rfpn.benchmarks.peak_ram import PARTS, report, stems
from rfpn.utils import run_cli
from rfpn.utils.cli import add_common_arguments, tool_parser


def _point_spec(text: str) -> tuple[str, int, int]:
    match = re.fullmatch(r"(\w+):(\d+)x(\d+)", text)
    if not match or match.group(1) not in PARTS:
        raise argparse.ArgumentTypeError(f"{text!r} is not PART:HxW with PART one of {', '.join(PARTS)}")
    return match.group(1), int(match.group(2)), int(match.group(3))


def main(argv: list[str]) -> None:
    common = add_common_arguments(argparse.ArgumentParser(add_help=False), threads=1,
                                  helps={"threads": "intra-op threads (here and in the RSS process)"})
    common.add_argument("--depth", type=int, help="cut module paths to this many parts in the layer table")
    parser = tool_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("report", parents=[common], help="one config, part and size")
    one.add_argument("config", help="a YAML config (rfpn's are under configs/)")
    one.add_argument("--part", choices=PARTS, default="model")
    one.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=[800, 1333])
    one.add_argument("--top", type=int, help="only the layers with the largest liveness peaks")
    one.add_argument("--rss", action="store_true", help="also the peak RSS increase in a fresh process")
    add_common_arguments(one, output_dir="output/peak_ram")
    one.add_argument("--opts", nargs="*", default=[], help="config overrides, KEY VALUE ...")
    one.set_defaults(run=report)
    cmp = commands.add_parser("stems", parents=[common], help="ResNet stem vs RNNPool stem (batched, streaming)")
    cmp.add_argument("--point", type=_point_spec, nargs="+", default=[("stem", 128, 128), ("backbone", 128, 128),
                                                                       ("stem", 800, 1333)],
                     help="PART:HxW, e.g. stem:800x1333 backbone:128x128")
    cmp.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS measurements")
    add_common_arguments(cmp, output_dir="output/peak_ram_stems", copy_to_docs=True)
    cmp.set_defaults(run=stems)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.run(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

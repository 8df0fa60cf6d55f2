#!/usr/bin/env python
"""Ship a trained CPU-scale Pathfinder checkpoint with rfpn (model zoo, ``rfpn://`` weights).

Copies the model weights of a finished run into ``rfpn/model_zoo/weights/`` and records in
``rfpn/model_zoo/trained.json`` the numbers of the run's benchmark row (``row.json`` of
``tools/benchmark_pathfinder.py`` or ``tools/benchmark_long_contours.py``), the file's SHA-256 and its
IoU on the first 100 test images of the config's set::

    python tools/publish_checkpoint.py Pathfinder/cpu/pfcpu9_hgru_jfb.yaml output/benchmark_pathfinder/jfb/row.json
"""
from __future__ import annotations

import argparse
import json
import sys

from rfpn.model_zoo.trained import publish
from rfpn.utils import run_cli

ROW_KEYS = ("method", "iters", "batch", "iou", "saved_bytes", "sec_per_iter", "mean_steps", "inference")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the config's path under configs/, e.g. Pathfinder/cpu/pfcpu9_hgru_jfb.yaml")
    p.add_argument("row", help="the run's row.json (its 'checkpoint' is the file to ship)")
    p.add_argument("--command", default="make benchmark-pathfinder", help="how the checkpoint was trained")
    args = p.parse_args(argv)
    with open(args.row) as f:
        row = json.load(f)
    entry = {k: row[k] for k in ROW_KEYS if k in row}
    entry.update(iou_1000=entry.pop("iou"), command=args.command)
    record = publish(args.config, row["checkpoint"], entry)
    print(json.dumps({args.config: record}, indent=1))
    return record


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

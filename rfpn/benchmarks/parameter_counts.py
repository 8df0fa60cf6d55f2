"""Parameter counts of Panoptic FPN and R-FPN (R-50, R-101, RevNet-104, RNNPool stem) and of their backbones and mask heads.

Builds each model from rfpn's packaged configs on the CPU, without loading weights, and
prints a table (optionally JSON). The paper reports that R-FPN-R50 has 783,552 fewer
parameters than Panoptic FPN R-50; the "fewer than FPN" column is what this build gives.

    python tools/count_parameters.py [--json output/parameter_counts.json]
"""
from __future__ import annotations

import argparse
import sys
import logging
from pathlib import Path

import torch
from torch import nn

from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from rfpn import model_zoo
from rfpn.utils import run_cli
from rfpn.utils.files import write_json_atomic

PAPER_DIFFERENCE_R50 = 783_552

# (name, config, the feed-forward model it is compared with, config overrides)
MODELS = [
    ("Panoptic FPN R-50", "COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml", None, []),
    ("R-FPN R-50 (C-RBP-20)", "COCO-PanopticSegmentation/panoptic_rfpn_R_50_crbp20_1x.yaml", "Panoptic FPN R-50", []),
    (
        "R-FPN R-50 (C-RBP-20, GALA gate)",
        "COCO-PanopticSegmentation/panoptic_rfpn_R_50_crbp20_1x.yaml",
        "Panoptic FPN R-50",
        ["MODEL.RECURRENT.GATE", "gala"],
    ),
    ("Panoptic FPN R-101", "COCO-PanopticSegmentation/panoptic_fpn_R_101_3x.yaml", None, []),
    ("R-FPN R-101 (C-RBP-20)", "COCO-PanopticSegmentation/panoptic_rfpn_R_101_crbp20_3x.yaml", "Panoptic FPN R-101", []),
    ("Panoptic FPN RevNet-104", "COCO-PanopticSegmentation/panoptic_fpn_RevNet_104_3x.yaml", None, []),
    (
        "R-FPN RevNet-104 (C-RBP-20)",
        "COCO-PanopticSegmentation/panoptic_rfpn_RevNet_104_crbp20_3x.yaml",
        "Panoptic FPN RevNet-104",
        [],
    ),
    ("Panoptic FPN R-50, RNNPool stem", "COCO-PanopticSegmentation/panoptic_fpn_R_50_rnnpool_1x.yaml", None, []),
    (
        "R-FPN R-50, RNNPool stem (C-RBP-20)",
        "COCO-PanopticSegmentation/panoptic_rfpn_R_50_rnnpool_crbp20_1x.yaml",
        "Panoptic FPN R-50, RNNPool stem",
        [],
    ),
    ("Panoptic FPN R-18 (synthetic)", "Synthetic-Panoptic/panoptic_fpn_R_18.yaml", None, []),
    ("Panoptic FPN RevNet-18 (synthetic)", "Synthetic-Panoptic/panoptic_fpn_RevNet_18.yaml", None, []),
    ("Panoptic FPN R-18, RNNPool stem (synthetic)", "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool.yaml", None, []),
]


def count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def count_all(models: list = MODELS) -> list[dict]:
    """Build every model on the CPU (no weights loaded) and count its parameters."""
    logger = logging.getLogger("rfpn.count_parameters")
    rows: list[dict] = []
    totals: dict[str, int] = {}
    for name, config, reference, overrides in models:
        cfg = model_zoo.get_config(config)
        cfg.merge_from_list(overrides)
        cfg.MODEL.DEVICE = "cpu"
        logger.info("Building %s from %s", name, config)
        model = build_model(cfg)
        # Frozen backbone stages (FREEZE_AT) still count as parameters of the model.
        total = sum(p.numel() for p in model.parameters())
        mask_head = model.roi_heads.mask_head
        totals[name] = total
        rows.append(
            {
                "model": name,
                "config": config,
                "overrides": overrides,
                "total": total,
                "backbone": sum(p.numel() for p in model.backbone.bottom_up.parameters()),
                "trainable": count(model),
                "mask_head": sum(p.numel() for p in mask_head.parameters()),
                "mask_head_type": type(mask_head).__name__,
                "fewer_than_ffwd": totals[reference] - total if reference else None,
            }
        )
        del model
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"| {'model':44s} | {'parameters':>12s} | {'backbone':>12s} | {'mask head':>10s} | "
              f"{'fewer than FPN':>14s} |")
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        fewer = f"{r['fewer_than_ffwd']:,}" if r["fewer_than_ffwd"] is not None else "-"
        lines.append(f"| {r['model']:44s} | {r['total']:>12,} | {r['backbone']:>12,} | {r['mask_head']:>10,} | "
                     f"{fewer:>14s} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    setup_logger(name="rfpn")
    torch.set_num_threads(1)
    rows = count_all()
    print(format_table(rows))
    ours = next(r for r in rows if r["model"] == "R-FPN R-50 (C-RBP-20)")["fewer_than_ffwd"]
    print(
        f"\nPaper: R-FPN-R50 has {PAPER_DIFFERENCE_R50:,} fewer parameters than Panoptic FPN R-50; this build: "
        f"{ours:,} fewer (difference {ours - PAPER_DIFFERENCE_R50:+,})."
    )
    if args.json:
        write_json_atomic(args.json, {"paper_difference_r50": PAPER_DIFFERENCE_R50, "models": rows})
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

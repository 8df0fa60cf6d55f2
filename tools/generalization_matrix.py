#!/usr/bin/env python
"""Generalisation across contour lengths (the paper's Fig. 2a, c): a table and a plot.

Every model (config + weights, trained on one Pathfinder length) is tested on every test set;
the result is a models x test-lengths IoU matrix written as ``generalization.json``,
``generalization.md`` (Markdown table) and ``generalization.png`` under ``--output-dir``.

Usage::

    python tools/generalization_matrix.py \\
        --model C-RBP configs/Pathfinder/cpu/pfcpu9_hgru_crbp.yaml output/pathfinder/pfcpu9_hgru_crbp/model_final.pth \\
        --model BPTT configs/Pathfinder/cpu/pfcpu9_hgru_bptt.yaml output/pathfinder/pfcpu9_hgru_bptt/model_final.pth \\
        --test-lengths 9 12 14 --preset cpu --num-images 200

Test sets are ``pathfinder_cpu{N}_test`` (``--preset cpu``) or ``pathfinder{N}_test`` (``paper``);
make missing ones with ``datasets/prepare_pathfinder.py``. The contour length a model was
trained on is read from its first ``DATASETS.TRAIN`` name.
"""
from __future__ import annotations

import sys
import logging
import os
import re

import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import rfpn  # noqa: F401  (registers rfpn's models and datasets)
from rfpn.analysis import GeneralizationMatrix, StepIoU
from rfpn.analysis.figures import plot_generalization
from rfpn.data.pathfinder_generator import default_dataset_name
from rfpn.data.pathfinder_mapper import PathfinderDatasetMapper
from rfpn.utils import run_cli
from rfpn.utils.cli import tool_parser

from analyze_dynamics import load_model  # noqa: E402  (tools/ sibling)

logger = logging.getLogger("rfpn.generalization_matrix")
_LENGTH = re.compile(r"^pathfinder(?:_cpu)?(\d+)")


def train_length(cfg) -> int:
    """Contour length of the model's first training set, from its registered name."""
    name = cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else ""
    match = _LENGTH.match(name)
    if not match:
        raise ValueError(
            f"Cannot read a contour length from DATASETS.TRAIN[0]={name!r}; expected pathfinder<N>_train or "
            "pathfinder_cpu<N>_train."
        )
    return int(match.group(1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg, dataset: str, num_images: int, batch_size: int) -> float:
    """Pooled contour IoU of ``model``'s output on the first ``num_images`` images of ``dataset``."""
    if dataset not in DatasetCatalog.list():
        raise KeyError(f"Test set {dataset!r} is not registered; make it with datasets/prepare_pathfinder.py.")
    dicts = DatasetCatalog.get(dataset)[:num_images]
    mapper = PathfinderDatasetMapper(cfg, is_train=False)
    iou = StepIoU()
    for start in tqdm(range(0, len(dicts), batch_size), desc=dataset, leave=False):
        batch = [mapper(d) for d in dicts[start : start + batch_size]]
        outputs = model(batch)
        scores = torch.stack([o["sem_seg"] for o in outputs])[None]  # (1, B, 2, H, W)
        iou.update(scores, torch.stack([d["sem_seg"] for d in batch]))
    return float(iou.ious()[0])


def main(argv: list[str] | None = None) -> GeneralizationMatrix:
    p = tool_parser(__doc__, models=True, threads=2, output_dir="output/generalization", opts=True)
    p.add_argument("--test-lengths", type=int, nargs="+", default=[9, 12, 14])
    p.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    p.add_argument("--num-images", type=int, default=200, help="test images per set")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    setup_logger(name="rfpn")
    torch.set_num_threads(args.threads)
    matrix = GeneralizationMatrix(test_lengths=list(args.test_lengths))
    for name, config, weights in args.model:
        cfg, model = load_model(config, weights, args.opts)
        ious = {}
        for n in args.test_lengths:
            dataset = default_dataset_name(args.preset, n) + "_test"
            ious[n] = evaluate(model, cfg, dataset, args.num_images, args.batch_size)
            logger.info(f"{name} on {dataset}: IoU {ious[n]:.3f}")
        matrix.add(name, train_length(cfg), ious)
    os.makedirs(args.output_dir, exist_ok=True)
    matrix.save_json(os.path.join(args.output_dir, "generalization.json"))
    with open(os.path.join(args.output_dir, "generalization.md"), "w") as f:
        f.write(matrix.to_markdown() + "\n")
    plot_generalization(os.path.join(args.output_dir, "generalization.png"), matrix)
    print(matrix.to_markdown())
    return matrix


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

#!/usr/bin/env python
"""R-FPN's flood-fill comparison (the paper's Fig. 4): does the recurrent mask head fill objects
the way a flood fill of their ground-truth masks does?

For ground-truth instances of a panoptic dataset it runs the R-FPN mask head on the
ground-truth boxes (so every object has a timecourse), and for each object:

1. crops its ground-truth mask to the box at the head's mask resolution,
2. tessellates it into Voronoi cells and flood-fills them from the most interior cell, one ring
   of neighbouring cells per step,
3. compares the model's per-step masks with that fill: coverage of the ground truth against
   step for both, and the Spearman correlation between the steps at which each ground-truth
   pixel is first covered by the model and by the flood fill.

Writes ``flood_fill.json`` (per-object and mean numbers) and ``flood_fill_<k>.png`` for the
first objects under ``--output-dir``. Usage::

    python tools/analyze_flood_fill.py --config-file configs/Synthetic-Panoptic/panoptic_rfpn_R_18_crbp20.yaml \\
        --synthetic synthetic_panoptic_bench output/benchmark_rfpn/data --dataset synthetic_panoptic_bench_val_separated \\
        --num-images 10 --output-dir output/flood_fill MODEL.WEIGHTS output/benchmark_rfpn/crbp20/model_final.pth
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import build_augmentation
from detectron2.structures import Instances
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import rfpn  # noqa: F401  (registers rfpn's models and datasets)
from rfpn.analysis import compare_fill_order, flood_fill_steps, select_steps, voronoi_tessellation
from rfpn.analysis.figures import plot_flood_fill
from rfpn.data import register_synthetic_panoptic
from rfpn.utils.cli import load_config, run_cli, tool_parser
from rfpn.utils.models import build_eval_model

logger = logging.getLogger("rfpn.analyze_flood_fill")


def setup_cfg(args) -> CfgNode:
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_MASK_HEAD.TIMECOURSE = True
    cfg.MODEL.RECURRENT.EPS = 0.0
    cfg.freeze()
    if cfg.MODEL.ROI_MASK_HEAD.NAME != "RecurrentMaskHead":
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.NAME={cfg.MODEL.ROI_MASK_HEAD.NAME!r}: the flood-fill comparison needs R-FPN's "
            "'RecurrentMaskHead' (per-step masks)."
        )
    return cfg


@torch.no_grad()
def object_timecourses(model, cfg: CfgNode, dataset_dict: dict, mapper: DatasetMapper):
    """Per-step mask probabilities (N, T, M, M) on the ground-truth boxes and the boxes' GT masks (N, M, M)."""
    d = mapper(dataset_dict)
    gt = d["instances"]
    if len(gt) == 0:
        return None, None
    images = model.preprocess_image([d])
    features = model.backbone(images.tensor)
    given = Instances(gt.image_size, pred_boxes=gt.gt_boxes, pred_classes=gt.gt_classes)
    out = model.roi_heads.forward_with_given_boxes(features, [given])[0]
    probs = out.pred_mask_step_logits.sigmoid()
    size = probs.shape[-1]
    gt_masks = gt.gt_masks.crop_and_resize(gt.gt_boxes.tensor, size)
    return probs.numpy(), gt_masks.numpy().astype(bool)


def main(argv: list[str] | None = None) -> dict:
    p = tool_parser(__doc__, threads=2, output_dir="output/flood_fill", opts=True)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--dataset", default="", help="panoptic dataset with instance masks (default: DATASETS.TEST[0])")
    p.add_argument("--synthetic", nargs=2, metavar=("NAME", "ROOT"),
                   help="first register the synthetic panoptic set ROOT/NAME (e.g. tools/benchmark_rfpn.py's "
                        "synthetic_panoptic_bench output/benchmark_rfpn/data) as NAME_{train,val}_separated")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--num-cells", type=int, default=12, help="Voronoi cells per object mask")
    p.add_argument("--min-pixels", type=int, default=40, help="skip objects with fewer mask pixels at head resolution")
    p.add_argument("--figures", type=int, default=3, help="objects to draw")
    args = p.parse_args(argv)
    setup_logger(name="rfpn")
    torch.set_num_threads(args.threads)
    if args.synthetic:
        register_synthetic_panoptic(*args.synthetic)
    cfg = setup_cfg(args)
    model = build_eval_model(cfg)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    mapper = DatasetMapper(
        is_train=True,  # keep the annotations; the augmentations are the test-time resize
        augmentations=build_augmentation(cfg, is_train=False),
        image_format=cfg.INPUT.FORMAT,
        use_instance_mask=True,
        instance_mask_format="bitmask",
    )
    os.makedirs(args.output_dir, exist_ok=True)
    objects, written = [], []
    for dd in tqdm(DatasetCatalog.get(dataset)[: args.num_images], desc="images"):
        probs, gt_masks = object_timecourses(model, cfg, dd, mapper)
        if probs is None:
            continue
        for k, (prob, gt) in enumerate(zip(probs, gt_masks)):
            if gt.sum() < args.min_pixels:
                continue
            cells = voronoi_tessellation(gt, args.num_cells, seed=len(objects))
            flood = flood_fill_steps(cells, prob.shape[0])
            comp = compare_fill_order(prob > 0.5, flood, gt)
            objects.append({"file_name": dd["file_name"], "instance": k, **comp})
            if len(written) < args.figures:
                steps = select_steps(prob.shape[0], prob.shape[0], 6)
                path = os.path.join(args.output_dir, f"flood_fill_{len(written)}.png")
                written.append(plot_flood_fill(path, flood, prob, steps, comp))
    if not objects:
        raise SystemExit(f"No object of {dataset} has >= {args.min_pixels} mask pixels; lower --min-pixels.")
    rhos = np.array([o["spearman"] for o in objects], dtype=np.float64)
    report = {
        "config": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "dataset": dataset,
        "steps": len(objects[0]["model_coverage"]),
        "num_objects": len(objects),
        "spearman_mean": float(np.nanmean(rhos)) if np.isfinite(rhos).any() else None,
        "spearman_defined": int(np.isfinite(rhos).sum()),
        "model_coverage_mean": np.mean([o["model_coverage"] for o in objects], 0).tolist(),
        "flood_coverage_mean": np.mean([o["flood_coverage"] for o in objects], 0).tolist(),
        "objects": objects,
        "figures": written,
    }
    with open(os.path.join(args.output_dir, "flood_fill.json"), "w") as f:
        json.dump(report, f, indent=2)
    logger.info(
        f"{len(objects)} objects; mean fill-order Spearman {report['spearman_mean']} "
        f"(defined for {report['spearman_defined']}); wrote {args.output_dir}/flood_fill.json"
    )
    return report


if __name__ == "__main__":
    run_cli(main)

#!/usr/bin/env python
"""Run a trained rfpn model on images and draw what it does, step by step (Detectron2 demo style).

- R-FPN (Panoptic FPN with the recurrent mask head): ``<name>_panoptic.png``, the panoptic
  result drawn with Detectron2's ``Visualizer``, and ``<name>_timecourse.png``, a strip of the
  detections' masks after a spread of recurrent steps (``MODEL.ROI_MASK_HEAD.TIMECOURSE``).
- Pathfinder segmentors: ``<name>_timecourse.png``, the image and the contour probability after
  a spread of steps (``MODEL.PATHFINDER.RETURN_STEPS``).

Usage::

    python tools/demo.py --config-file configs/Synthetic-Panoptic/panoptic_rfpn_R_18_crbp10.yaml \\
        --input img1.jpg img2.jpg --output output/demo --opts MODEL.WEIGHTS output/.../model_final.pth
    python tools/demo.py --config-file configs/Pathfinder/cpu/pfcpu9_hgru_crbp.yaml \\
        --input datasets/pathfinder/pathfinder_cpu9/test/images/000000.png --output output/demo \\
        --opts MODEL.WEIGHTS output/pathfinder/pfcpu9_hgru_crbp/model_final.pth MODEL.RECURRENT.TEST_STEPS 40
"""
from __future__ import annotations

import argparse
import glob
import logging
import os

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.layers import paste_masks_in_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

import rfpn  # noqa: F401  (registers rfpn's models and datasets)
from rfpn.analysis import select_steps
from rfpn.analysis.figures import plot_strip
from rfpn.config import training_steps
from rfpn.utils.cli import load_config, run_cli
from rfpn.utils.models import build_eval_model

logger = logging.getLogger("rfpn.demo")


def setup_cfg(args) -> CfgNode:
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.ROI_MASK_HEAD.TIMECOURSE = True
    cfg.MODEL.PATHFINDER.RETURN_STEPS = True
    cfg.MODEL.RECURRENT.EPS = 0.0  # every detection runs every step, so the strip has one length
    if cfg.MODEL.META_ARCHITECTURE != "PathfinderSegmentor":
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
        cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: the model runs with random weights.")
    return cfg


def mask_timecourse(image_rgb: np.ndarray, instances, metadata, count: int) -> tuple[list[np.ndarray], list[str]]:
    """Frames of the detections' masks (pasted into the image) after a spread of recurrent steps."""
    if not instances.has("pred_mask_step_logits"):
        raise ValueError(
            "The model gave no per-step masks: it needs the RecurrentMaskHead (MODEL.ROI_MASK_HEAD.NAME "
            "'RecurrentMaskHead') for a timecourse."
        )
    logits = instances.pred_mask_step_logits  # (N, T, M, M)
    total = logits.shape[1]
    frames, titles = [], []
    for t in select_steps(total, total, count) if total else []:
        masks = paste_masks_in_image(logits[:, t - 1].sigmoid(), instances.pred_boxes, image_rgb.shape[:2]) > 0
        vis = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
        frames.append(vis.overlay_instances(masks=masks.numpy(), assigned_colors=_colors(len(masks))).get_image())
        titles.append(f"t={t}")
    return frames, titles


def _colors(n: int) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(0)
    return [tuple(c) for c in rng.uniform(0.2, 1.0, size=(n, 3))]


def run_panoptic(cfg: CfgNode, path: str, out_dir: str, steps_shown: int) -> list[str]:
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    image = read_image(path, format="BGR")
    with torch.no_grad():
        outputs = predictor(image)
    rgb = image[:, :, ::-1]
    name = os.path.splitext(os.path.basename(path))[0]
    written = []
    if "panoptic_seg" in outputs:
        seg, info = outputs["panoptic_seg"]
        scale = max(1.0, 512 / max(rgb.shape[:2]))  # small images get enlarged so labels stay legible
        vis = Visualizer(rgb, metadata, scale=scale).draw_panoptic_seg(seg.to("cpu"), info)
        written.append(os.path.join(out_dir, f"{name}_panoptic.png"))
        vis.save(written[-1])
    instances = outputs["instances"].to("cpu")
    frames, titles = mask_timecourse(rgb, instances, metadata, steps_shown)
    if frames:
        written.append(plot_strip(os.path.join(out_dir, f"{name}_timecourse.png"), frames, titles, height=2.4))
    else:
        logger.warning(f"{path}: no detection above the confidence threshold; no timecourse written.")
    return written


def run_pathfinder(cfg: CfgNode, path: str, out_dir: str, steps_shown: int) -> list[str]:
    model = build_eval_model(cfg)
    gray = read_image(path, format="L")[:, :, 0].astype(np.float32)
    with torch.no_grad():
        out = model([{"image": torch.from_numpy(gray)[None], "height": gray.shape[0], "width": gray.shape[1]}])[0]
    probs = out["sem_seg_steps"][:, 1].numpy()
    n = training_steps(cfg) if cfg.MODEL.PATHFINDER.CORE == "recurrent" else len(probs)
    steps = select_steps(len(probs), min(n, len(probs)), steps_shown)
    frames = [gray / 255.0] + [probs[t - 1] for t in steps]
    titles = ["image"] + [f"t={t}" + (" (N)" if t == n else "") for t in steps]
    name = os.path.splitext(os.path.basename(path))[0]
    return [plot_strip(os.path.join(out_dir, f"{name}_timecourse.png"), frames, titles)]


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--input", nargs="+", required=True, help="image files or glob patterns")
    p.add_argument("--output", default="output/demo", help="directory for the PNG files")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--steps-shown", type=int, default=8, help="about how many steps the strip shows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs (Detectron2's demo convention), e.g. --opts MODEL.WEIGHTS m.pth")
    args = p.parse_args(argv)
    setup_logger(name="rfpn")
    cfg = setup_cfg(args)
    paths = [f for pattern in args.input for f in (sorted(glob.glob(os.path.expanduser(pattern))) or [pattern])]
    missing = [f for f in paths if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"Input images not found: {missing}.")
    os.makedirs(args.output, exist_ok=True)
    run = run_pathfinder if cfg.MODEL.META_ARCHITECTURE == "PathfinderSegmentor" else run_panoptic
    written = []
    for path in paths:
        files = run(cfg, path, args.output, args.steps_shown)
        written += files
        logger.info(f"{path}: wrote {', '.join(files) or 'nothing'}")
    return written


if __name__ == "__main__":
    run_cli(main)

#!/usr/bin/env python
"""See the dynamics of trained Pathfinder models (the paper's Fig. 1): JSON plus PNG figures.

For every model (config + weights) it runs the recurrent core for T steps (default 40, past the
training N) on test images and writes, under ``--output-dir``:

- ``readout_grid.png``: the readout (contour probability) at a spread of steps, per model;
- ``state_space.png``: the hidden states of all images and steps on each model's top two
  principal components, with densities for t <= N (red) and t > N (blue), one image in gold;
- ``distance.png``: the per-image distance between the states at t = N and t = T, its mean,
  and two-sample Kolmogorov-Smirnov tests between every pair of models;
- ``iou_vs_step.png``: pooled IoU after every step;
- ``dynamics.json``: all numbers (and the spectral norm of the Jacobian at t = N and t = T).

Usage::

    python tools/analyze_dynamics.py \\
        --model C-RBP configs/Pathfinder/cpu/<crbp>.yaml output/<crbp>/model_final.pth \\
        --model BPTT configs/Pathfinder/cpu/<bptt>.yaml output/<bptt>/model_final.pth \\
        --steps 40 --num-images 64 --output-dir output/analysis [KEY VALUE ...]

Trailing ``KEY VALUE`` pairs override every model's config (e.g. ``DATASETS.TEST "('pathfinder_cpu9_test',)"``).
"""
from __future__ import annotations

import argparse
import sys
import itertools
import json
import logging
import math
import os
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger
from tqdm import tqdm

import rfpn  # noqa: F401  (registers rfpn's models and datasets)
from rfpn.analysis import (
    StepIoU,
    fit_pca,
    fixed_solver,
    ks_test,
    select_steps,
    split_densities,
    stack_states,
    state_distance,
    step_probabilities,
)
from rfpn.analysis import figures
from rfpn.data.pathfinder_mapper import PathfinderDatasetMapper
from rfpn.recurrent.diagnostics import capture_last_step, jacobian_spectral_norm
from rfpn.utils.cli import UsageError, tool_parser
from rfpn.utils.models import load_eval_model
from rfpn.utils import run_cli

logger = logging.getLogger("rfpn.analyze_dynamics")


def build_argument_parser() -> argparse.ArgumentParser:
    p = tool_parser(__doc__, models=True, threads=2, output_dir="output/analysis", opts=True,
                    helps={"model": "a model to analyse (repeat for several; KS tests compare every pair)"})
    p.add_argument("--steps", type=int, default=40, help="T: steps to run (default 40)")
    p.add_argument("--n", type=int, default=0, help="N: the step to compare with T (default: each config's MODEL.RECURRENT.STEPS)")
    p.add_argument("--dataset", default="", help="test dataset (default: each config's first DATASETS.TEST)")
    p.add_argument("--num-images", type=int, default=64, help="test images for distances and IoU")
    p.add_argument("--pca-images", type=int, default=16, help="images whose states (all steps) the PCA sees")
    p.add_argument("--grid-images", type=int, default=2, help="images shown in the readout grid")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--power-iters", type=int, default=20, help="power iterations for the Jacobian spectral norm (0: skip)")
    return p


def _pathfinder_only(cfg: CfgNode) -> None:
    if cfg.MODEL.META_ARCHITECTURE != "PathfinderSegmentor":
        raise UsageError(
            f"MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r}; this tool analyses Pathfinder models "
            "(PathfinderSegmentor). For R-FPN use tools/demo.py and tools/analyze_flood_fill.py."
        )


def load_model(config: str, weights: str, opts: list[str]) -> tuple[CfgNode, torch.nn.Module]:
    return load_eval_model(config, weights, list(opts) + ["MODEL.DEVICE", "cpu"], check=_pathfinder_only)


def load_images(cfg: CfgNode, dataset: str, count: int) -> list[dict]:
    dicts = DatasetCatalog.get(dataset)
    if len(dicts) < count:
        logger.warning(f"{dataset} has {len(dicts)} images; using all of them (asked for {count}).")
    mapper = PathfinderDatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in dicts[:count]]


@torch.no_grad()
def analyze_model(
    model: torch.nn.Module, images: list[dict], n: int, steps: int, pca_images: int, grid_images: int,
    batch_size: int, power_iters: int,
) -> dict[str, Any]:
    """Distances, per-step IoU, projected states, grid timecourses and spectral norms of one model."""
    core = model.core
    iou = StepIoU()
    distances, pca_states, grid = [], [], []
    spectral: dict[str, float] = {}
    for start in tqdm(range(0, len(images), batch_size), desc="batches", leave=False):
        batch = images[start : start + batch_size]
        x = torch.stack([d["image"] for d in batch]).float() / 255.0
        labels = torch.stack([d["sem_seg"] for d in batch])
        with capture_last_step(core.cell) as last:
            probs, states = step_probabilities(model, x, steps)  # (T, B, H, W)
        iou.update(probs, labels)
        stacked = stack_states(states)
        distances.append(state_distance(stacked, n, steps))
        have = sum(p.shape[1] for p in pca_states)
        if have < pca_images:
            pca_states.append(stacked[:, : pca_images - have])
        if sum(len(g) for g in grid) < grid_images:
            grid.extend(probs[:, : grid_images - len(grid)].permute(1, 0, 2, 3).numpy())
        if not spectral and power_iters > 0:
            # On the first few images only (the estimate costs two passes per iteration); with a
            # batch-statistics norm in the cell this sub-batch is a slightly different map.
            k = min(4, len(batch))
            gen = torch.Generator().manual_seed(0)
            drive = last.drive[:k]
            at_t = last.state[:k]
            with fixed_solver(core, steps=n), capture_last_step(core.cell) as at_n:
                model.features(x[:k])
            for t, h in ((n, at_n.state), (steps, at_t)):
                est = jacobian_spectral_norm(lambda s: core.cell(drive, s), h, power_iters, 1e-3, gen)
                spectral[f"t={t}"] = est.value
    dist = torch.cat(distances)
    dims = pca_states[0].shape[-1]
    points = torch.cat(pca_states, 1)
    pca = fit_pca(points, k=2)
    projected = pca.project(points).numpy()
    ious = iou.ious()
    return {
        "distance": dist,
        "ious": ious,
        "projected": projected,
        "densities": split_densities(projected, n),
        "grid": grid,
        "summary": {
            "n": n,
            "steps": steps,
            "num_images": int(dist.numel()),
            "state_dims": int(dims),
            "distance_mean": float(dist.mean()),
            "distance_std": float(dist.std()) if dist.numel() > 1 else 0.0,
            "distance_rms_mean": float(dist.mean() / math.sqrt(dims)),
            "distances": dist.tolist(),
            "iou_per_step": [None if math.isnan(v) else float(v) for v in ious],
            "iou_at_n": float(ious[n - 1]),
            "iou_at_T": float(ious[-1]),
            "best_step": int(np.nanargmax(ious)) + 1 if not np.all(np.isnan(ious)) else None,
            "pca_explained_ratio": pca.explained_ratio.tolist(),
            "spectral_norm": spectral,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_argument_parser().parse_args(argv)
    setup_logger(name="rfpn")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.steps < 1 or args.num_images < 1 or args.pca_images < 1:
        raise SystemExit("--steps, --num-images and --pca-images must be >= 1.")
    names = [m[0] for m in args.model]
    if len(set(names)) != len(names):
        raise SystemExit(f"Model names must be unique; got {names}.")
    os.makedirs(args.output_dir, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    n_of: dict[str, int] = {}
    first_image = None
    for name, config, weights in args.model:
        cfg, model = load_model(config, weights, args.opts)
        n = args.n or cfg.MODEL.RECURRENT.STEPS
        if not 1 <= n <= args.steps:
            raise SystemExit(f"{name}: N={n} must lie in 1..T={args.steps}; pass --steps larger than N or set --n.")
        dataset = args.dataset or cfg.DATASETS.TEST[0]
        logger.info(f"{name}: {config} with {weights}; N={n}, T={args.steps}, {args.num_images} images of {dataset}")
        images = load_images(cfg, dataset, max(args.num_images, args.pca_images, args.grid_images))
        results[name] = analyze_model(
            model, images, n, args.steps, args.pca_images, args.grid_images, args.batch_size, args.power_iters
        )
        results[name]["summary"]["dataset"] = dataset
        n_of[name] = n
        if first_image is None:
            first_image = (images[0]["image"][0].numpy(), images[0]["sem_seg"].numpy())
        s = results[name]["summary"]
        logger.info(
            f"{name}: distance |h_T - h_N| mean {s['distance_mean']:.4g} (std {s['distance_std']:.3g}); "
            f"IoU at N {s['iou_at_n']:.3f}, at T {s['iou_at_T']:.3f}; ||J|| {s['spectral_norm']}"
        )
    ks = {(a, b): ks_test(results[a]["distance"], results[b]["distance"]) for a, b in itertools.combinations(results, 2)}
    out = args.output_dir
    steps = select_steps(args.steps, max(n_of.values()), 8)
    steps = sorted(set(steps) | set(n_of.values()))
    written = [
        figures.plot_readout_grid(
            os.path.join(out, "readout_grid.png"),
            {name: r["grid"][0] for name, r in results.items()},
            steps,
            n_of,
            image=first_image[0],
            label=first_image[1],
        ),
        figures.plot_state_space(
            os.path.join(out, "state_space.png"),
            {name: {"projected": r["projected"], "densities": r["densities"], "n": n_of[name]} for name, r in results.items()},
        ),
        figures.plot_distances(
            os.path.join(out, "distance.png"), {k: r["distance"].numpy() for k, r in results.items()}, ks, n_of, args.steps
        ),
        figures.plot_iou_vs_step(os.path.join(out, "iou_vs_step.png"), {k: r["ious"] for k, r in results.items()}, n_of),
    ]
    report = {
        "models": {name: {"config": c, "weights": w, **results[name]["summary"]} for name, c, w in args.model},
        "ks_tests": [{"a": a, "b": b, "statistic": r.statistic, "pvalue": r.pvalue} for (a, b), r in ks.items()],
        "figures": written,
    }
    with open(os.path.join(out, "dynamics.json"), "w") as f:
        json.dump(report, f, indent=2)
    for (a, b), r in ks.items():
        logger.info(f"KS {a} vs {b}: D={r.statistic:.3f}, p={r.pvalue:.2e}")
    logger.info(f"Wrote {os.path.join(out, 'dynamics.json')} and {len(written)} figures.")
    return report


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

"""Does a Pathfinder model's readout hold still past its stopping point? IoU at the stop, at 2x and at T.

For every model (config + weights) on the first ``--num-images`` test images:

- **as deployed**: the model's own forward (its ``MODEL.RECURRENT.SOLVER``): pooled IoU and the cell
  evaluations it used per sample;
- **stopping point** ``s_i`` per image, on the plain trajectory ``h_t = F^t(0)``: ``TEST_STEPS``
  (or ``STEPS``) for the ``fixed`` solver; for ``iterate``/``anderson`` the first step from which the
  relative residual ``|h_{t+1} - h_t| / |h_{t+1}|`` stays below ``TOL`` (capped at ``MAX_STEPS``);
- **IoU along the trajectory**, pooled over images, at each image's ``s_i``, at ``2 s_i`` and at
  step ``--steps`` (T, default 40), plus the whole IoU-vs-step curve.

Writes ``residual_stopping.json`` and ``residual_stopping.png`` to ``--output-dir``; the command line
is ``tools/benchmark_residual_stopping.py``::

    python tools/benchmark_residual_stopping.py \\
        --model fixed-N output/residual_stopping/fixed20/config.yaml output/residual_stopping/fixed20/model_final.pth \\
        --model anderson-tol1e-3 output/residual_stopping/anderson_tol1e-3/config.yaml \\
                                 output/residual_stopping/anderson_tol1e-3/model_final.pth \\
        --num-images 500 --copy-to-docs

Trailing ``KEY VALUE`` pairs override every model's config (e.g. ``DATASETS.TEST "('pathfinder_cpu9_test',)"``
for models trained with ``DATASETS.TEST ()``).
"""
from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from rfpn.evaluation.pathfinder_evaluation import batched_contour_counts as per_image_counts
from rfpn.evaluation.pathfinder_evaluation import pooled_iou
from rfpn.analysis.figures import plot_residual_stopping
from rfpn.utils.cli import tool_parser
from rfpn.utils.files import copy_to_docs, write_json_atomic


logger = logging.getLogger("rfpn.benchmark_residual_stopping")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = tool_parser(__doc__, models=True, threads=2, output_dir="output/residual_stopping", copy_to_docs=True, opts=True,
                    helps={"model": "a trained Pathfinder model (repeat for several)"})
    p.add_argument("--steps", type=int, default=40, help="T: the late step to compare with (default 40)")
    p.add_argument("--num-images", type=int, default=300, help="test images (the first ones of DATASETS.TEST[0])")
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args(argv)
    if args.steps < 1 or args.num_images < 1 or args.batch_size < 1:
        p.error("--steps, --num-images and --batch-size must be >= 1.")
    if len({m[0] for m in args.model}) != len(args.model):
        p.error("--model names must be unique.")
    return args


def load_model(config: str, weights: str, opts: list[str]):
    """The checked config and the recurrent Pathfinder segmentor with ``weights`` loaded, in eval mode."""
    from rfpn.utils.cli import UsageError
    from rfpn.utils.models import load_eval_model

    def recurrent_pathfinder(cfg) -> None:
        if cfg.MODEL.META_ARCHITECTURE != "PathfinderSegmentor" or cfg.MODEL.PATHFINDER.CORE != "recurrent":
            raise UsageError(f"{config}: this benchmark needs a recurrent PathfinderSegmentor (MODEL.PATHFINDER.CORE recurrent).")

    return load_eval_model(config, weights, list(opts) + ["MODEL.DEVICE", "cpu"], check=recurrent_pathfinder)


@contextmanager
def plain_iteration(core: torch.nn.Module) -> Iterator[None]:
    """Temporarily make ``core`` stop by plain iteration (same ``tol`` and cap) instead of its own solver."""
    saved = core.solver, core.test_solver
    core.solver, core.test_solver = "iterate", None
    try:
        yield
    finally:
        core.solver, core.test_solver = saved


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, images: list[dict], steps: int, batch_size: int) -> dict[str, Any]:
    """Stopping points, deployed IoU and the per-step IoU trajectory of one model (see the module docstring)."""
    from rfpn.analysis import fixed_solver

    core = model.core
    fixed = core.inference_solver == "fixed"
    cap = (core.test_steps or core.steps) if fixed else core.max_steps
    horizon = max(steps, 2 * cap)
    deployed, stops, evals, traj, change = [], [], [], [], []
    for start in tqdm(range(0, len(images), batch_size), desc="batches", leave=False):
        batch = images[start : start + batch_size]
        x = torch.stack([d["image"] for d in batch]).float() / 255.0
        labels = torch.stack([d["sem_seg"] for d in batch]).long()
        h, aux = model.features(x)
        deployed.append(per_image_counts(model.readout(h), labels))
        evals.append(aux["steps_per_sample"].numpy())
        if fixed:
            stops.append(np.full(len(batch), cap))
        else:
            with plain_iteration(core):
                stops.append(model.features(x)[1]["steps_per_sample"].numpy())
        with fixed_solver(core, steps=horizon):
            states = model.features(x, return_states=True)[1]["states"]
        traj.append(per_image_counts(torch.stack([model.readout(s) for s in states]), labels))  # (T, B, 2)
        s = torch.stack(states).flatten(2)
        rel = (s[1:] - s[:-1]).norm(dim=-1) / s[1:].norm(dim=-1).clamp_min(1e-12)
        change.append(rel.numpy())
    counts = np.concatenate(traj, 1)  # (horizon, N, 2)
    stop = np.concatenate(stops)
    idx = np.arange(counts.shape[1])
    at = lambda t: counts[np.minimum(t, horizon) - 1, idx]  # noqa: E731  (step t per image, 1-based)
    iou_stop, iou_twice, iou_late = pooled_iou(at(stop)), pooled_iou(at(2 * stop)), pooled_iou(counts[steps - 1])
    return {
        "solver": core.solver,
        "tol": core.tol if not fixed else None,
        "cap": int(cap),
        "stop_mean": float(stop.mean()),
        "stop_min": int(stop.min()),
        "stop_max": int(stop.max()),
        "stop_at_cap_fraction": float((stop >= cap).mean()) if not fixed else None,
        "deployed_evals_mean": float(np.concatenate(evals).mean()),
        "deployed_iou": pooled_iou(np.concatenate(deployed)),
        "iou_at_stop": iou_stop,
        "iou_at_twice_stop": iou_twice,
        f"iou_at_{steps}": iou_late,
        "iou_late_minus_stop": iou_late - iou_stop,
        "within_0.02": bool(abs(iou_late - iou_stop) <= 0.02),
        "iou_per_step": [pooled_iou(c) for c in counts],
        "relative_change_per_step": np.concatenate(change, 1).mean(1).tolist(),  # step t -> t+1, t = 1..horizon-1
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from detectron2.data import DatasetCatalog

    import rfpn  # noqa: F401  (registers rfpn's models and datasets)
    from rfpn.data.pathfinder_mapper import PathfinderDatasetMapper

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "copy_to_docs"}, "models": {}}
    for name, config, weights in args.model:
        cfg, model = load_model(config, weights, args.opts)
        dataset = cfg.DATASETS.TEST[0]
        dicts = DatasetCatalog.get(dataset)[: args.num_images]
        mapper = PathfinderDatasetMapper(cfg, is_train=False)
        images = [mapper(d) for d in dicts]
        res = evaluate_model(model, images, args.steps, args.batch_size)
        res.update(config=config, weights=weights, dataset=dataset, num_images=len(images))
        report["models"][name] = res
        logger.info(
            "%s (%s): stop %.1f steps, IoU at stop %.4f, at 2x %.4f, at %d %.4f; deployed IoU %.4f in %.1f evals",
            name, res["solver"], res["stop_mean"], res["iou_at_stop"], res["iou_at_twice_stop"], args.steps,
            res[f"iou_at_{args.steps}"], res["deployed_iou"], res["deployed_evals_mean"],
        )
    write_json_atomic(out / "residual_stopping.json", report)
    plot_residual_stopping(str(out / "residual_stopping.png"), report["models"], args.steps)
    logger.info("wrote %s and %s", out / "residual_stopping.json", out / "residual_stopping.png")
    if args.copy_to_docs:
        copy_to_docs(out / "residual_stopping.json")
        copy_to_docs(out / "residual_stopping.png")
    return report




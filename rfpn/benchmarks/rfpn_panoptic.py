"""Panoptic FPN vs R-FPN on the synthetic panoptic set at CPU scale: PQ, mask-head memory, time.

Every model trains for the same number of iterations from the same seeds with its
``configs/Synthetic-Panoptic/`` config, then Detectron2's evaluators score it on the val
split (PQ / SQ / RQ, mask AP, stuff mIoU). During training the mask head's forward and
loss run inside ``rfpn.recurrent.saved_tensor_bytes``: the bytes autograd keeps for the
backward pass of the mask head (divided by the number of RoIs, since that varies per
iteration). A second, controlled sweep feeds the same random RoI batch to the mask head
for several step counts under BPTT and C-RBP. Writes ``benchmark_rfpn.json`` and
``benchmark_rfpn.png`` to ``--output-dir``. The command line is ``tools/benchmark_rfpn.py``::

    .venv/bin/python tools/benchmark_rfpn.py --seeds 0 1 2          # all five models, 100 iterations each
    .venv/bin/python tools/benchmark_rfpn.py --models fpn crbp20 --iters 20 --output-dir output/quick
    .venv/bin/python tools/benchmark_rfpn.py --models fpn crbp20 --seeds 0 1 2 3 4 5 6 7 --iters 300 --jobs 2 \\
        --output-dir output/benchmark_rfpn_300
    .venv/bin/python tools/benchmark_rfpn.py --models fpn rnnpool --seeds 0 1 2 3 4 5 6 7 --iters 300 --jobs 2 \\
        --output-dir output/benchmark_rfpn_300     # ResNet stem vs RNNPool stem (docs/rnnpool.md)
    .venv/bin/python tools/benchmark_rfpn.py --models fpn rnnpool_gru --seeds 0 1 2 3 4 5 6 7 --iters 300 --jobs 2 \\
        --output-dir output/benchmark_rfpn_300_gru --previous benchmarks/results/benchmark_rfpn_300.json
    .venv/bin/python tools/benchmark_rfpn.py --models fpn rnnpool_gru rnnpool_gru_gn --seeds 0 1 2 3 4 5 6 7 \\
        --iters 300 --jobs 2 --output-dir output/benchmark_rfpn_300_gru_gn \\
        --previous benchmarks/results/benchmark_rfpn_300.json --previous benchmarks/results/benchmark_rfpn_300_rnnpool_gru.json

The dataset is generated under ``--data-root`` on first use (datasets/prepare_synthetic_panoptic.py
does the same). Every finished run saves ``<output-dir>/<model>_seed<seed>/row.json`` and is kept in
the JSON; both are reused when the command is repeated with more seeds or models (same ``--iters``),
also after an interruption, and ``--previous`` adds the runs of an earlier summary (the last commands
train only the new stems and take the ResNet-stem runs from the committed results). ``--jobs 2`` trains two runs at once in one-thread child processes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from detectron2.engine import HookBase
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger

from rfpn import model_zoo
from rfpn.data import generate_synthetic_panoptic, register_synthetic_panoptic
from rfpn.engine import Trainer
from rfpn.analysis.figures import plot_penalty_weight_curves, plot_rfpn_benchmark
from rfpn.benchmarks.seeds import paired_difference
from rfpn.modeling.recurrent_core import penalty_weight_history
from rfpn.recurrent import saved_tensor_bytes
from rfpn.utils.cli import tool_parser
from rfpn.utils.files import write_json_atomic
from rfpn.utils.jobs import ChildJob, run_child_jobs
from rfpn.utils.runs import adopt_rows, load_run, run_dir, save_run

logger = logging.getLogger("rfpn.benchmark_rfpn")

MODELS = {
    "fpn": ("Panoptic FPN", "Synthetic-Panoptic/panoptic_fpn_R_18.yaml"),
    "bptt3": ("R-FPN BPTT-3", "Synthetic-Panoptic/panoptic_rfpn_R_18_bptt3.yaml"),
    "crbp5": ("R-FPN C-RBP-5", "Synthetic-Panoptic/panoptic_rfpn_R_18_crbp5.yaml"),
    "crbp10": ("R-FPN C-RBP-10", "Synthetic-Panoptic/panoptic_rfpn_R_18_crbp10.yaml"),
    "crbp20": ("R-FPN C-RBP-20", "Synthetic-Panoptic/panoptic_rfpn_R_18_crbp20.yaml"),
    "crbp20auto": ("R-FPN C-RBP-20, automatic LCP weight", "Synthetic-Panoptic/panoptic_rfpn_R_18_crbp20_auto.yaml"),
    "revnet18": ("Panoptic FPN RevNet-18", "Synthetic-Panoptic/panoptic_fpn_RevNet_18.yaml"),
    "rnnpool": ("Panoptic FPN R-18, RNNPool stem", "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool.yaml"),
    "rnnpool_gru": ("Panoptic FPN R-18, RNNPool stem (GRU)", "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool_gru.yaml"),
    "rnnpool_gru_gn": ("Panoptic FPN R-18, RNNPool stem (GRU, GN + ReLU)",
                       "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool_gru_gn.yaml"),
    "rnnpool_gru_gn_h32": ("Panoptic FPN R-18, RNNPool stem (GRU, GN + ReLU, HIDDEN1 32)",
                           "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool_gru_gn_h32.yaml"),
}
DATASET_NAME = "synthetic_panoptic_bench"
# (model, baseline) pairs whose PQ difference is reported, paired by seed, when both ran
COMPARISONS = (("crbp20", "fpn"), ("crbp20auto", "crbp20"), ("revnet18", "fpn"), ("rnnpool", "fpn"),
               ("rnnpool_gru", "fpn"), ("rnnpool_gru_gn", "fpn"), ("rnnpool_gru_gn", "rnnpool_gru"),
               ("rnnpool_gru_gn_h32", "fpn"), ("rnnpool_gru_gn_h32", "rnnpool_gru_gn"))


class IterationClock(HookBase):
    """Wall time of every training iteration (data loading included)."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def before_step(self):
        self._start = time.perf_counter()

    def after_step(self):
        self.times.append(time.perf_counter() - self._start)


def record_saved_bytes(module: torch.nn.Module, records: list[tuple[int, int]]) -> None:
    """Count the bytes ``module``'s forward saves for backward in every training step, with its batch size."""
    original = module.forward

    def forward(x, *rest):
        if not module.training:
            return original(x, *rest)
        with saved_tensor_bytes() as counter:
            out = original(x, *rest)
        records.append((counter.forward_bytes, int(x.shape[0])))
        return out

    module.forward = forward


def train_and_evaluate(key: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    label, config = MODELS[key]
    cfg = model_zoo.get_config(config)
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN", (f"{DATASET_NAME}_train_separated",),
            "DATASETS.TEST", (f"{DATASET_NAME}_val_separated",),
            "SOLVER.MAX_ITER", args.iters,
            "SOLVER.STEPS", (int(args.iters * 0.8),),
            "SOLVER.WARMUP_ITERS", min(50, args.iters // 5),
            "SOLVER.CHECKPOINT_PERIOD", 10 * args.iters,
            "DATALOADER.NUM_WORKERS", 0,
            "OUTPUT_DIR", run_dir(args.output_dir, key, seed),
            "SEED", seed,
        ]
    )
    cfg.freeze()
    torch.manual_seed(seed)
    trainer = Trainer(cfg)
    clock = IterationClock()
    memory: list[tuple[int, int]] = []
    backbone_memory: list[tuple[int, int]] = []
    trainer.register_hooks([clock])
    record_saved_bytes(trainer.model.roi_heads.mask_head, memory)
    record_saved_bytes(trainer.model.backbone.bottom_up, backbone_memory)
    logger.info("Training %s (%s) for %d iterations, seed %d", label, config, args.iters, seed)
    start = time.perf_counter()
    results = trainer.train()  # evaluated after the last iteration
    wall = time.perf_counter() - start
    steady = clock.times[min(10, len(clock.times) // 2) :]
    per_roi = [b / n for b, n in memory if n > 0]
    pan = results["panoptic_seg"]
    row = {
        "key": key,
        "model": label,
        "config": config,
        "seed": seed,
        "iters": args.iters,
        "PQ": pan["PQ"],
        "SQ": pan["SQ"],
        "RQ": pan["RQ"],
        "PQ_th": pan["PQ_th"],
        "PQ_st": pan["PQ_st"],
        "mask_AP": results.get("segm", {}).get("AP"),
        "box_AP": results.get("bbox", {}).get("AP"),
        "mIoU": results.get("sem_seg", {}).get("mIoU"),
        "sec_per_iter": statistics.median(steady),
        "train_wall_sec": wall,
        "mask_head_bytes_per_roi": statistics.median(per_roi) if per_roi else None,
        "mask_head_bytes_median": statistics.median(b for b, _ in memory) if memory else None,
        "rois_per_iter_median": statistics.median(n for _, n in memory) if memory else None,
        # activations the bottom-up network (ResNet / RevNet) keeps for backward, per training iteration
        "backbone_bytes_median": statistics.median(b for b, _ in backbone_memory) if backbone_memory else None,
        **penalty_weight_history(trainer.storage, "mask_head", args.iters),
    }
    logger.info("%s: %s", label, json.dumps(row))
    save_run(args.output_dir, row, key, seed)  # finished runs survive an interruption
    return row


def memory_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Mask-head saved bytes on one fixed RoI batch, for several steps under BPTT and C-RBP."""
    cfg = model_zoo.get_config("Synthetic-Panoptic/Base-Synthetic-Panoptic-RFPN.yaml")
    dim, rois = cfg.MODEL.ROI_MASK_HEAD.CONV_DIM, args.sweep_rois
    g = torch.Generator().manual_seed(0)
    x = torch.rand(rois, dim, 14, 14, generator=g)
    inst = Instances((128, 128))
    xy = torch.rand(rois, 2, generator=g) * 64
    inst.proposal_boxes = Boxes(torch.cat([xy, xy + 64], dim=1))
    inst.gt_classes = torch.randint(0, cfg.MODEL.ROI_HEADS.NUM_CLASSES, (rois,), generator=g)
    inst.gt_masks = BitMasks(torch.rand(rois, 128, 128, generator=g) > 0.5)
    rows = []
    for grad, steps_list in (("bptt", args.sweep_steps), ("crbp", args.sweep_steps)):
        for steps in steps_list:
            c = cfg.clone()
            c.MODEL.RECURRENT.GRAD, c.MODEL.RECURRENT.STEPS = grad, steps
            torch.manual_seed(0)
            head = build_mask_head(c, ShapeSpec(channels=dim, height=14, width=14)).train()
            with EventStorage(), saved_tensor_bytes() as counter:
                start = time.perf_counter()
                losses = head(x, [inst])
            sum(losses.values()).backward()
            seconds = time.perf_counter() - start
            rows.append({"grad": grad, "steps": steps, "rois": rois, "bytes": counter.forward_bytes, "sec": seconds})
            logger.info("memory sweep %s-%d: %.1f MB saved, %.2f s", grad, steps, counter.forward_bytes / 2**20, seconds)
    return rows


def child_job(args: argparse.Namespace, key: str, seed: int) -> ChildJob:
    """One (model, seed) run of this module in a child process with one thread."""
    argv = [
        sys.executable, "-m", __name__, "--models", key, "--seeds", str(seed), "--row-only",
        "--iters", str(args.iters), "--data-root", str(args.data_root), "--output-dir", str(args.output_dir),
        "--threads", "1",
    ]
    return ChildJob(f"{key} seed {seed}", argv, os.path.join(run_dir(args.output_dir, key, seed), "benchmark.log"), threads=1)


def main(argv: list[str] | None = None) -> None:
    parser = tool_parser(__doc__, threads=1, output_dir="output/benchmark_rfpn")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--iters", type=int, default=100, help="training iterations per model (equal for all)")
    parser.add_argument("--data-root", type=Path, default=Path("output/benchmark_rfpn/data"))
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--sweep-steps", type=int, nargs="+", default=[1, 3, 5, 10, 20])
    parser.add_argument("--sweep-rois", type=int, default=32)
    parser.add_argument("--skip-training", action="store_true", help="only the controlled memory sweep")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each in a child process with one thread (2 on a 2-core machine)")
    parser.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: train, save row
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (results are averaged)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--previous", type=Path, action="append", default=[], metavar="JSON",
                        help="an earlier benchmark_rfpn.json (e.g. one in benchmarks/results/; repeatable): its runs "
                             "with the same --iters count as finished, and its memory sweep is reused if it has the "
                             "same settings")
    args = parser.parse_args(argv)

    setup_logger(name="rfpn")
    setup_logger(name="detectron2")
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.row_only:
        register_synthetic_panoptic(DATASET_NAME, str(args.data_root))
        for seed in args.seeds:
            for key in args.models:
                train_and_evaluate(key, seed, args)
        return

    out = output_dir / "benchmark_rfpn.json"
    rows, sweep = load_previous(out, args)
    for path in args.previous:
        previous_rows, previous_sweep = load_previous(path, args)
        adopt_rows(args.output_dir, previous_rows, "key", {"iters": args.iters}, source=str(path))
        sweep = sweep or previous_sweep
    if not sweep:
        sweep = memory_sweep(args)
    if not args.skip_training:
        if not (args.data_root / DATASET_NAME / "annotations").is_dir():
            generate_synthetic_panoptic(
                str(args.data_root), DATASET_NAME, args.num_train, args.num_test, args.image_size, args.data_seed, workers=1
            )
        register_synthetic_panoptic(DATASET_NAME, str(args.data_root))
        done = {(r["key"], r["seed"]) for r in rows}
        todo = [(key, seed) for seed in args.seeds for key in args.models if (key, seed) not in done]
        finished = {"iters": args.iters}
        pending = [(key, seed) for key, seed in todo if load_run(args.output_dir, key, seed, match=finished) is None]
        if args.jobs > 1:
            run_child_jobs([child_job(args, key, seed) for key, seed in pending], args.jobs)
        else:
            for key, seed in pending:
                train_and_evaluate(key, seed, args)
        rows += [load_run(args.output_dir, key, seed, match=finished) for key, seed in todo]
    write_json_atomic(str(out), payload(args, rows, sweep))  # every finished run at these iterations
    plot_rfpn_benchmark(str(output_dir / "benchmark_rfpn.png"), summarise(rows), sweep)
    curves = {f"{r['model']}, seed {r['seed']}": r["curves"] for r in rows if r.get("curves")}
    if curves:
        plot_penalty_weight_curves(str(output_dir / "penalty_weight.png"), curves, lam=0.9)
    print(format_table(rows, sweep))
    print(f"Wrote {out} and {output_dir / 'benchmark_rfpn.png'}")


def load_previous(path: Path, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Finished runs with the same iterations, and the memory sweep if its settings match."""
    if not path.is_file():
        return [], []
    previous = json.loads(path.read_text())
    by_config = {config: key for key, (_, config) in MODELS.items()}
    rows = []
    for r in previous.get("models", []):
        r.setdefault("key", by_config.get(r.get("config")))
        r.setdefault("seed", 0)
        if r["iters"] == args.iters and r["key"] is not None:
            rows.append(r)
    sweep = previous.get("memory_sweep", [])
    same_sweep = sorted({r["steps"] for r in sweep}) == sorted(set(args.sweep_steps)) and all(
        r["rois"] == args.sweep_rois for r in sweep
    )
    return rows, sweep if same_sweep else []


def payload(args: argparse.Namespace, rows: list[dict], sweep: list[dict]) -> dict[str, Any]:
    return {
        "args": {k: str(v) for k, v in vars(args).items()},
        "models": rows,
        "memory_sweep": sweep,
        "pq_difference": paired_pq_difference(rows),
        "pq_differences": [d for m, b in COMPARISONS if (d := paired_pq_difference(rows, m, b)) is not None],
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean of every metric over the seeds of each model, in benchmark order."""
    keys = [k for k in MODELS if any(r["key"] == k for r in rows)]
    metrics = ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mask_AP", "mIoU", "sec_per_iter", "mask_head_bytes_per_roi",
               "backbone_bytes_median")
    out = []
    for key in keys:
        runs = [r for r in rows if r["key"] == key]
        mean = {m: statistics.mean(r[m] for r in runs) if all(r.get(m) is not None for r in runs) else None
                for m in metrics}
        out.append({"key": key, "model": runs[0]["model"], "seeds": len(runs), "iters": runs[0]["iters"],
                    "PQ_runs": [r["PQ"] for r in runs], **mean})
    return out


def paired_pq_difference(rows: list[dict], model: str = "crbp20", baseline: str = "fpn") -> dict[str, Any] | None:
    """PQ of ``model`` minus PQ of ``baseline``, paired by seed (:func:`~rfpn.benchmarks.seeds.paired_difference`)."""
    return paired_difference({(r["key"], r["seed"]): r["PQ"] for r in rows}, model, baseline)


def format_table(rows: list[dict], sweep: list[dict]) -> str:
    lines = []
    if rows:
        lines += [
            "| model | PQ (mean) | PQ per seed | SQ | RQ | PQ things | PQ stuff | mask AP | mIoU | s/iter | mask-head KB/RoI "
            "| backbone MB saved |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in summarise(rows):
            fmt = lambda v, scale=1.0: f"{v / scale:.1f}" if v is not None else "-"  # noqa: E731
            per_seed = ", ".join(f"{v:.1f}" for v in r["PQ_runs"])
            lines.append(
                f"| {r['model']} | {r['PQ']:.1f} | {per_seed} | {r['SQ']:.1f} | {r['RQ']:.1f} | {r['PQ_th']:.1f} "
                f"| {r['PQ_st']:.1f} | {fmt(r['mask_AP'])} | {fmt(r['mIoU'])} | {r['sec_per_iter']:.2f} "
                f"| {r['mask_head_bytes_per_roi'] / 1024:.0f} | {fmt(r['backbone_bytes_median'], 2**20)} |"
            )
        for model, baseline in COMPARISONS:
            diff = paired_pq_difference(rows, model, baseline)
            if diff is not None:
                lines.append(
                    f"\nPQ of {MODELS[model][0]} minus {MODELS[baseline][0]}, paired by seed ({len(diff['seeds'])} "
                    f"seeds): {diff['mean']:+.2f} (95% CI {diff['ci95'][0]:+.2f} to {diff['ci95'][1]:+.2f})"
                )
    if sweep:
        steps = sorted({r["steps"] for r in sweep})
        lines += ["", "| mask-head MB saved for backward | " + " | ".join(f"{s} steps" for s in steps) + " |"]
        lines.append("|---|" + "---|" * len(steps))
        for grad in ("bptt", "crbp"):
            by = {r["steps"]: r["bytes"] for r in sweep if r["grad"] == grad}
            lines.append(f"| {grad.upper()} | " + " | ".join(f"{by[s] / 2**20:.1f}" if s in by else "-" for s in steps) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # a --jobs child (child_job)
    main()

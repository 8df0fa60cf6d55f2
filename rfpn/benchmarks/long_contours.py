"""Where C-RBP should win at CPU scale: long contours, 3x3 kernels and a memory budget.

The paper's case for C-RBP (its Fig. 2b and Pathfinder-14/20/25 results) rests on two mechanisms:
constant memory lets a model with small kernels run the tens of steps a long contour needs, which
BPTT cannot afford; and without the penalty, RBP drifts into expansive dynamics and fails. This
benchmark sets up the CPU-scale experiment in which both can appear and reports what happens:

- data: ``pathfinder_cpu14`` (64x64, 14-paddle contours) for training and test, plus longer sets
  (``--test-sets``, default ``pathfinder_cpu20``) for generalisation; ``--train-set`` changes the
  contour length the models train and are tested on (one factor, as in ``docs/long_contours.md``);
- model: the CPU hGRU with 3x3 horizontal kernels (``configs/Pathfinder/cpu/pfcpu14_*``);
- memory budget: the bytes C-RBP saves for backward in one training iteration. BPTT's bytes are
  measured at 1 and 2 steps (they grow linearly) to find how many steps fit; "BPTT at budget"
  trains with that many;
- methods: C-RBP (residual-stopped, <= 60 steps), RBP (the same without the penalty) and BPTT at
  budget over ``--seeds``; BPTT-6 (the paper's memory-limited setting), BPTT-60 (C-RBP's step cap,
  what unlimited memory buys), the feed-forward control and the one-factor changes of C-RBP (the LCP
  weight adapted by dual ascent, "C-RBP auto"; batch-statistics BatchNorm as in the paper's model,
  "C-RBP BN"; a weaker fixed LCP weight, 1 instead of 10, "C-RBP LCP 1"; 16 channels instead of 8,
  "C-RBP 16 ch"; 5x5 or 7x7 horizontal kernels instead of 3x3, "C-RBP 5x5" and "C-RBP 7x7", each with
  its partner "BPTT at budget 5x5" or "7x7", ``KERNEL_PAIRS``, and "RBP 7x7", ``PENALTY_PAIRS``) over
  ``--control-seeds``. The wider-kernel methods run only on request: ``--kernel-size 7`` (or ``--methods``).

Every run keeps ``<output-dir>/<method>_seed<seed>/row.json`` (a re-run trains only the runs
without one, each from its last checkpoint; ``--previous`` takes finished runs from an earlier
summary, such as the committed ``benchmarks/results/benchmark_long_contours.json``); a row holds the test IoU, IoU on the longer sets,
IoU after every step 1..``--curve-steps`` on the first ``--curve-images`` test images of each set,
the stability diagnostics logged during training (``DIAGNOSTICS.PERIOD`` in the configs: spectral
norm, max column sum of ``1^T J``, relative residual, Neumann terms and cap hits), bytes saved for backward
and seconds per iteration. The summary (``benchmark_long_contours.json``) adds the spread over
seeds, paired differences and the budget; three figures show IoU and memory per method, the
diagnostics over training and IoU per step. Command (``make long-contours``)::

    python tools/benchmark_long_contours.py --prepare --jobs 2 --copy-to-docs
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

import numpy as np
import torch
from detectron2.config import CfgNode

from rfpn.analysis.figures import plot_iou_vs_step, plot_long_contours, plot_training_diagnostics
from rfpn.analysis.timecourse import dataset_step_ious
from rfpn.benchmarks.pathfinder import (
    adopt_previous, contour_length_of, inference_description, scaled_cfg, start_benchmark, train_measured,
    training_bytes, training_parser,
)
from rfpn.benchmarks.seeds import paired_difference, spread
from rfpn.engine import Trainer
from rfpn.utils import run_cli
from rfpn.utils.events import metric_history
from rfpn.utils.files import copy_to_docs, write_json_atomic
from rfpn.utils.jobs import ChildJob, run_child_jobs
from rfpn.utils.runs import load_run, run_dir, save_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join("configs", "Pathfinder", "cpu")
TRAIN_SET = "pathfinder_cpu14"
BUDGET_METHOD = "BPTT at budget"
# Per horizontal-kernel size: C-RBP and its partners, BPTT with the steps that fit in the same memory
# and, where it was run, RBP (the same C-RBP without the penalty).
KERNEL_PAIRS = {
    3: ("C-RBP", BUDGET_METHOD),
    5: ("C-RBP 5x5", "BPTT at budget 5x5"),
    7: ("C-RBP 7x7", "BPTT at budget 7x7"),
}
PENALTY_PAIRS = {3: ("C-RBP", "RBP"), 7: ("C-RBP 7x7", "RBP 7x7")}
METHODS = {
    "C-RBP": "pfcpu14_hgru3x3_crbp.yaml",
    "C-RBP auto": "pfcpu14_hgru3x3_crbp_auto.yaml",
    "C-RBP BN": "pfcpu14_hgru3x3_crbp_bn.yaml",
    "C-RBP LCP 1": "pfcpu14_hgru3x3_crbp_lcp1.yaml",
    "C-RBP 16 ch": "pfcpu14_hgru3x3_crbp_16ch.yaml",
    "C-RBP 5x5": "pfcpu14_hgru5x5_crbp.yaml",
    "BPTT at budget 5x5": "pfcpu14_hgru5x5_bptt_budget.yaml",
    "C-RBP 7x7": "pfcpu14_hgru7x7_crbp.yaml",
    "BPTT at budget 7x7": "pfcpu14_hgru7x7_bptt_budget.yaml",
    "RBP 7x7": "pfcpu14_hgru7x7_rbp.yaml",
    "RBP": "pfcpu14_hgru3x3_rbp.yaml",
    BUDGET_METHOD: "pfcpu14_hgru3x3_bptt_budget.yaml",
    "FF control": "pfcpu14_ff3x3_control.yaml",
    "BPTT-6": "pfcpu14_hgru3x3_bptt6.yaml",
    "BPTT-60": "pfcpu14_hgru3x3_bptt60.yaml",
}
BUDGET_METHODS = tuple(partner for _, partner in KERNEL_PAIRS.values())  # trained with the steps that fit
COMPARED = ("C-RBP", "RBP", BUDGET_METHOD)  # trained over --seeds; the others over --control-seeds
WIDER_KERNELS = tuple(k for k in sorted(KERNEL_PAIRS) if k != 3)
COMPARISONS = (
    KERNEL_PAIRS[3], PENALTY_PAIRS[3],
    *(table[k] for table in (KERNEL_PAIRS, PENALTY_PAIRS) for k in WIDER_KERNELS if k in table),
)
logger = logging.getLogger("rfpn.benchmark_long_contours")


def kernel_methods(size: int) -> list[str]:
    """The methods of one kernel size's setting: its C-RBP and every partner the pair tables list."""
    return list(dict.fromkeys(name for table in (KERNEL_PAIRS, PENALTY_PAIRS) if size in table for name in table[size]))


# The wider-kernel settings run on request (``--kernel-size`` or ``--methods``), each in a summary of its own.
WIDER_KERNEL_METHODS = {name for k in WIDER_KERNELS for name in kernel_methods(k)}


def parse_args(argv=None) -> argparse.Namespace:
    p = training_parser(
        __doc__, os.path.join("output", "benchmark_long_contours"), list(METHODS), 3000,
        threads_help="torch threads in all (split between --jobs)",
        jobs_help="runs trained at once, each in a child process", rerun_help="retrain runs that already have a row.json",
        default_methods=[m for m in METHODS if m not in WIDER_KERNEL_METHODS],
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of C-RBP, RBP and BPTT at budget")
    p.add_argument("--control-seeds", type=int, nargs="+", default=[0], help="seeds of the other methods")
    p.add_argument("--train-set", default=TRAIN_SET, help="registered Pathfinder set to train and test on")
    p.add_argument("--test-sets", nargs="+", default=["pathfinder_cpu20"], help="longer-contour sets for generalisation")
    p.add_argument("--curve-steps", type=int, default=120, help="IoU is measured after every step up to this one")
    p.add_argument("--curve-images", type=int, default=250, help="test images of each set for the per-step IoU")
    p.add_argument("--report", action="store_true",
                   help="write the summary, figures and table of the finished runs only, training none")
    p.add_argument("--kernel-size", type=int, default=None, choices=WIDER_KERNELS,
                   help="run one wider-kernel setting: its C-RBP and partners (instead of --methods)")
    p.add_argument("--budget", default=None, help=argparse.SUPPRESS)  # a --jobs child: the parent's budget (JSON)
    args = p.parse_args(argv)
    if args.kernel_size is not None:
        if args.methods != p.get_default("methods"):
            p.error("--kernel-size chooses the methods itself: drop --methods, or drop --kernel-size.")
        args.methods = kernel_methods(args.kernel_size)
    return args


def method_cfg(name: str, seed: int, args, extra: list | tuple = ()) -> CfgNode:
    """The method's packaged config for ``--iters`` iterations, ``--train-set`` and ``seed``, then ``extra`` and ``--opts``."""
    overrides = [
        "DATASETS.TRAIN", (f"{args.train_set}_train",), "DATASETS.TEST", (f"{args.train_set}_test",),
        "SEED", seed, "OUTPUT_DIR", run_dir(args.output_dir, name, seed), *extra,
    ]
    return scaled_cfg(os.path.join(REPO, CONFIG_DIR, METHODS[name]), args.iters, overrides, args.opts)


def memory_budget(args) -> dict:
    """C-RBP's bytes saved per training iteration, BPTT's bytes per step, and the BPTT steps that fit."""
    budget = training_bytes(method_cfg("C-RBP", 0, args))
    one, two = (training_bytes(method_cfg(BUDGET_METHOD, 0, args, ["MODEL.RECURRENT.STEPS", k])) for k in (1, 2))
    per_step, base = two - one, 2 * one - two
    steps = max(1, math.floor((budget - base) / per_step))
    return {"crbp_bytes": budget, "bptt_bytes_per_step": per_step, "bptt_base_bytes": base, "bptt_steps": steps}


def run(name: str, seed: int, args, budget: dict) -> dict:
    extra = ["MODEL.RECURRENT.STEPS", budget["bptt_steps"]] if name in BUDGET_METHODS else []
    cfg = method_cfg(name, seed, args, extra)
    fresh = args.rerun and load_run(args.output_dir, name, seed) is not None
    row, trainer, results = train_measured(name, os.path.join(CONFIG_DIR, METHODS[name]), cfg, fresh=fresh)
    row["seed"] = seed
    row["iou"] = results["pathfinder"]["IoU"]
    row["inference"] = inference_description(cfg)
    row.update(evaluation(cfg, trainer.model, args))
    row["diagnostics"] = training_diagnostics(cfg.OUTPUT_DIR)
    logger.info(f"{name} seed {seed}: IoU {row['iou']:.3f}, generalisation {row['generalisation']}")
    save_run(args.output_dir, row, name, seed)
    return row


def training_diagnostics(output_dir: str) -> dict[str, list[tuple[int, float]]]:
    """The stability diagnostics a run logged (``DIAGNOSTICS.PERIOD``) and its LCP weight xi, over training."""
    out = {key.rsplit("/", 1)[-1]: values for key, values in metric_history(output_dir, "diagnostics/").items()
           if key != "diagnostics/time"}
    weight = metric_history(output_dir, "recurrent/penalty_weight").get("recurrent/penalty_weight")
    if weight:
        out["penalty_weight"] = weight
    return out


def evaluation(cfg: CfgNode, model: torch.nn.Module, args) -> dict:
    """IoU on the longer sets (the method's own test pass) and, for recurrent models, IoU after every step."""
    model.eval()
    generalisation = {}
    for test_set in args.test_sets:
        test_cfg = cfg.clone()
        test_cfg.defrost()
        test_cfg.DATASETS.TEST = (f"{test_set}_test",)
        generalisation[str(contour_length_of(test_set))] = Trainer.test(test_cfg, model)["pathfinder"]["IoU"]
    out = {"generalisation": generalisation}
    if cfg.MODEL.PATHFINDER.CORE == "recurrent":
        train_set = cfg.DATASETS.TEST[0].removesuffix("_test")
        out["step_ious"] = {
            str(contour_length_of(s)): [
                None if math.isnan(v) else float(v)
                for v in dataset_step_ious(model, cfg, f"{s}_test", args.curve_steps, args.curve_images)
            ]
            for s in (train_set, *args.test_sets)
        }
    return out


def child_job(name: str, seed: int, args, budget: dict) -> ChildJob:
    threads = max(1, args.threads // args.jobs)
    argv = [
        sys.executable, "-m", __name__, "--methods", name, "--seeds", str(seed), "--control-seeds", str(seed),
        "--row-only", "--budget", json.dumps(budget), "--iters", str(args.iters), "--train-set", args.train_set,
        "--test-sets", *args.test_sets,
        "--curve-steps", str(args.curve_steps), "--curve-images", str(args.curve_images), "--threads", str(threads),
        "--output-dir", args.output_dir,
        *(["--rerun"] if args.rerun else []), *args.opts,
    ]
    return ChildJob(f"{name} seed {seed}", argv, os.path.join(run_dir(args.output_dir, name, seed), "benchmark.log"), threads)


def planned_runs(args) -> list[tuple[str, int]]:
    """(method, seed) in training order: the compared methods' first seed, the controls, the other seeds, BPTT-60.

    BPTT-60 costs about as much as all the other controls together, so it trains last.
    """
    compared = [m for m in args.methods if m in COMPARED]
    controls = [m for m in args.methods if m not in COMPARED and m != "BPTT-60"]
    first, rest = args.seeds[:1], args.seeds[1:]
    last = [("BPTT-60", s) for s in args.control_seeds] if "BPTT-60" in args.methods else []
    return ([(m, s) for s in first for m in compared] + [(m, s) for s in args.control_seeds for m in controls]
            + [(m, s) for s in rest for m in compared] + last)


def summarise(rows: list[dict], budget: dict) -> list[dict]:
    """Per method: IoU spread over seeds, IoU on the longer sets, memory (and BPTT steps in the same bytes), time."""
    out = []
    for name in METHODS:
        runs = [r for r in rows if r["method"] == name]
        if not runs:
            continue
        lengths = list(runs[0]["generalisation"])
        out.append({
            "method": name,
            "config": runs[0]["config"],
            "steps": runs[0]["steps"],
            "mean_steps": None if runs[0]["mean_steps"] is None else float(np.mean([r["mean_steps"] for r in runs])),
            "seeds": [r["seed"] for r in runs],
            "iou": spread([r["iou"] for r in runs]),
            "generalisation": {n: spread([r["generalisation"][n] for r in runs]) for n in lengths},
            "saved_bytes": runs[0]["saved_bytes"],
            "bptt_steps_in_same_bytes": (runs[0]["saved_bytes"] - budget["bptt_base_bytes"]) / budget["bptt_bytes_per_step"],
            "sec_per_iter": float(np.mean([r["sec_per_iter"] for r in runs])),
        })
    return out


def mean_step_curves(rows: list[dict]) -> dict[str, tuple[dict[str, np.ndarray], dict[str, int]]]:
    """Per test contour length: each method's IoU after every step averaged over seeds, and its training steps."""
    out: dict[str, tuple[dict[str, np.ndarray], dict[str, int]]] = {}
    for r in rows:
        for length in r.get("step_ious", {}):
            curves, steps = out.setdefault(length, ({}, {}))
            runs = [x["step_ious"][length] for x in rows if x["method"] == r["method"] and x.get("step_ious")]
            curves[r["method"]] = np.nanmean(np.array(runs, dtype=float), axis=0)
            steps[r["method"]] = r["steps"]
    return out


def format_table(summary: list[dict]) -> str:
    lines = ["| method | steps | steps used | IoU (mean ± sd) | IoU per seed | " + " | ".join(
        f"IoU on {n} paddles" for n in (summary[0]["generalisation"] if summary else [])) + " | MiB saved | BPTT steps in the same memory | s / iter |"]
    lines.append("|" + "---|" * (8 + len(summary[0]["generalisation"] if summary else [])))
    for s in summary:
        used = "-" if s["mean_steps"] is None else f"{s['mean_steps']:.1f}"
        per_seed = ", ".join(f"{v:.3f}" for v in s["iou"]["runs"])
        gen = " | ".join(f"{g['mean']:.3f}" for g in s["generalisation"].values())
        lines.append(
            f"| {s['method']} | {s['steps']} | {used} | {s['iou']['mean']:.3f} ± {s['iou']['std']:.3f} | {per_seed} | {gen} | "
            f"{s['saved_bytes'] / 2**20:.1f} | {s['bptt_steps_in_same_bytes']:.1f} | {s['sec_per_iter']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    start_benchmark(args, args.train_set, args.test_sets, test_only_sets=True)
    budget = json.loads(args.budget) if args.budget else None
    if not args.row_only:  # the runs of earlier summaries were trained under their budget: it is not measured again
        summaries = adopt_previous(args, METHODS, args.train_set)
        budget = budget or next((s["budget"] for s in summaries if s.get("budget")), None)
    budget = budget or memory_budget(args)
    logger.info(f"memory budget: {json.dumps(budget)}")
    plan, finished = planned_runs(args), {"iters": args.iters}
    todo = [] if args.report else [(m, s) for m, s in plan
                                   if args.rerun or load_run(args.output_dir, m, s, match=finished) is None]
    if todo and args.jobs > 1:
        run_child_jobs([child_job(m, s, args, budget) for m, s in todo], args.jobs)
    else:
        for m, s in todo:
            run(m, s, args, budget)
    rows = [row for row in (load_run(args.output_dir, m, s, match=finished) for m, s in plan) if row is not None]
    if args.row_only:
        return rows
    if not rows:
        logger.info(f"No finished runs in {args.output_dir} for {args.methods}; nothing to report.")
        return rows
    summary = summarise(rows, budget)
    ious = {(r["method"], r["seed"]): r["iou"] for r in rows}
    payload = {
        "train_set": args.train_set, "iters": args.iters, "budget": budget, "summary": summary,
        "paired_iou_differences": [d for m, b in COMPARISONS if (d := paired_difference(ious, m, b)) is not None],
        "rows": rows,
    }
    out = args.output_dir
    json_path = os.path.join(out, "benchmark_long_contours.json")
    write_json_atomic(json_path, payload)
    figures = [
        plot_long_contours(os.path.join(out, "long_contours.png"), summary, budget),
        plot_training_diagnostics(
            os.path.join(out, "long_contours_diagnostics.png"),
            {f"{r['method']}, seed {r['seed']}": r["diagnostics"] for r in rows if r.get("diagnostics")},
        ),
    ]
    figures += [plot_iou_vs_step(os.path.join(out, f"long_contours_steps_{length}.png"), curves, steps)
                for length, (curves, steps) in mean_step_curves(rows).items()]
    if args.copy_to_docs:
        for path in figures:
            copy_to_docs(path)
    print(format_table(summary))
    for d in payload["paired_iou_differences"]:
        print(f"{d['model']} - {d['baseline']}: {d['mean']:+.3f} IoU (95% CI {d['ci95'][0]:+.3f}..{d['ci95'][1]:+.3f}, "
              f"seeds {d['seeds']})")
    print(f"Wrote {json_path} and {', '.join(figures)}")
    return rows


if __name__ == "__main__":  # a --jobs child (child_job)
    run_cli(main)

#!/usr/bin/env python
"""The README's main job (``make demo``): Pathfinder with a C-RBP hGRU on 2 CPU cores, within 15 minutes.

1. Generates the CPU-scale Pathfinder set ``pathfinder_cpu9`` once (kept when it already exists).
2. Times a few training iterations and one test batch on this machine and fits the schedule
   (iterations, learning-rate drop, checkpoints) into the time budget, so the whole run, evaluation
   included, stays under ``--minutes``.
3. Trains with rfpn's Detectron2 Trainer (the log shows losses, the fixed-point residual and an ETA),
   evaluates the pooled contour IoU on the test set, draws a few test images with the readout
   after selected steps, and prints where the checkpoint, the figure and the TensorBoard events are.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time

import torch
from detectron2.config import CfgNode
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

import rfpn  # noqa: F401  (registers the Pathfinder datasets and model)
from rfpn.analysis.readout_figure import draw_test_readouts
from rfpn.data.pathfinder import register_pathfinder
from rfpn.data.pathfinder_generator import main as prepare_pathfinder
from rfpn.engine import Trainer
from rfpn.utils.cli import load_config, run_cli, tool_parser
from rfpn.utils.files import write_json_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "Pathfinder", "cpu", "pfcpu9_hgru_crbp_demo.yaml")
logger = logging.getLogger("rfpn.demo")


def parse_args(argv=None) -> argparse.Namespace:
    # Two threads: on an idle 2-core Xeon a training iteration of the demo's model took 0.41 s with
    # two threads, 0.70 s with one, and 0.39 s as two one-thread processes (--num-gpus 2), which
    # gains too little to pay for a second process (docs/mixed_precision.md, "Both cores").
    p = tool_parser(__doc__, threads=2, opts=True)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, help="a CPU-scale Pathfinder config")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget for the whole demo")
    p.add_argument("--contour-length", type=int, default=9, help="target contour length of the generated set")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating the data")
    return p.parse_args(argv)


def build_cfg(args: argparse.Namespace, dataset: str) -> CfgNode:
    cfg = load_config(args.config_file, ["DATASETS.TRAIN", f"('{dataset}_train',)", "DATASETS.TEST", f"('{dataset}_test',)"])
    cfg.merge_from_list(args.opts)
    return cfg


# A residual-stopped forward pass (SOLVER iterate/anderson) stops after about 13 steps at
# initialisation and needs up to 20 as the model trains, so the mean iteration is slower than the
# first ones: 1.17x on a 2-core Xeon with two threads (0.514 vs 0.44 s), 1.37x on an AMD EPYC with
# one thread (1.03 vs 0.75 s). Planning with the first ones alone overran the 15-minute budget
# (19 minutes); planning for every pass at MAX_STEPS used only 8.4 of them.
RESIDUAL_STOPPED_SLOWDOWN = 1.25


def planning_seconds(cfg: CfgNode) -> tuple[float, float]:
    """Seconds per training iteration and per test image to plan the schedule with.

    Both are timed on a throwaway copy of the model. A residual-stopped pass (SOLVER or TEST_SOLVER
    iterate/anderson) is scaled by RESIDUAL_STOPPED_SLOWDOWN, since it needs more steps once trained.
    """
    model = Trainer.build_model(cfg)
    train = seconds_per_iteration(cfg, model)
    test = seconds_per_test_image(cfg, model)
    rc = cfg.MODEL.RECURRENT
    if rc.SOLVER != "fixed":
        train *= RESIDUAL_STOPPED_SLOWDOWN
    if (rc.TEST_SOLVER or rc.SOLVER) != "fixed":
        test *= RESIDUAL_STOPPED_SLOWDOWN
    return train, test


def seconds_per_iteration(cfg: CfgNode, model: torch.nn.Module, iterations: int = 5) -> float:
    """Median wall time of a training iteration of ``model`` on real batches (it is trained a little)."""
    optimizer = Trainer.build_optimizer(cfg, model)
    loader = iter(Trainer.build_train_loader(cfg))
    times = []
    for _ in range(iterations + 1):  # the first iteration warms up the allocator and the loader
        batch = next(loader)
        start = time.perf_counter()
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    del loader
    return sorted(times[1:])[len(times[1:]) // 2]


@torch.no_grad()
def seconds_per_test_image(cfg: CfgNode, model: torch.nn.Module) -> float:
    """Wall time per image of ``model``'s test pass, on one test batch (TEST.IMS_PER_BATCH images)."""
    batch = next(iter(Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])))
    model.eval()
    start = time.perf_counter()
    model(batch)
    elapsed = time.perf_counter() - start
    model.train()
    return elapsed / len(batch)


def steps_description(cfg: CfgNode) -> str:
    rc = cfg.MODEL.RECURRENT
    if rc.SOLVER == "fixed":
        return f"{rc.STEPS} steps"
    return f"{rc.SOLVER} to relative residual {rc.TOL:g}, at most {rc.MAX_STEPS} steps"


def fit_schedule(cfg: CfgNode, seconds_left: float, sec_per_iter: float, eval_seconds: float) -> CfgNode:
    """Scale MAX_ITER (and the LR drop, checkpoint and eval periods with it) to the time left."""
    cfg = cfg.clone()
    cfg.defrost()
    planned = cfg.SOLVER.MAX_ITER
    affordable = int((seconds_left - eval_seconds) / (sec_per_iter * 1.1))  # 10% for loading and logging
    if affordable < 20:
        raise RuntimeError(
            f"This machine trains at {sec_per_iter:.2f} s/iteration: {seconds_left / 60:.1f} minutes are not enough "
            "for a useful demo. Pass --minutes with a larger budget, or stop other jobs using the cores."
        )
    max_iter = min(planned, affordable)
    scale = max_iter / planned
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = tuple(max(1, int(s * scale)) for s in cfg.SOLVER.STEPS)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max_iter // 10)
    cfg.SOLVER.CHECKPOINT_PERIOD = max_iter
    cfg.TEST.EVAL_PERIOD = 0  # evaluate once, at the end
    cfg.freeze()
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    budget = args.minutes * 60
    torch.set_num_threads(args.threads)
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"Config file {args.config_file!r} does not exist.")
    dataset = f"pathfinder_cpu{args.contour_length}"
    cfg = build_cfg(args, dataset)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name in ("detectron2", "rfpn", "fvcore"):
        setup_logger(cfg.OUTPUT_DIR, name=name, abbrev_name="d2" if name == "detectron2" else name)

    logger.info(f"Step 1/3: the CPU-scale Pathfinder set {dataset} (generated once, then reused)")
    prepare_pathfinder(["--preset", "cpu", "--contour-length", str(args.contour_length), "--workers", str(args.workers)])
    register_pathfinder(dataset)

    logger.info("Step 2/3: timing a few training iterations to fit the schedule into the budget")
    cfg.freeze()
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)  # time the initialisation that will be trained
    sec_per_iter, sec_per_test_image = planning_seconds(cfg)
    num_test = len(Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0]).dataset)
    eval_seconds = sec_per_test_image * num_test * 1.1 + 10  # 10% and 10 s for loading and the evaluator
    cfg = fit_schedule(cfg, budget - (time.time() - start), sec_per_iter, eval_seconds)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    logger.info(
        f"{sec_per_iter:.2f} s/iteration here: training {cfg.SOLVER.MAX_ITER} iterations of batch "
        f"{cfg.SOLVER.IMS_PER_BATCH} ({cfg.MODEL.RECURRENT.GRAD}, {steps_description(cfg)}), "
        f"then evaluating {num_test} test images (about {eval_seconds / 60:.1f} minutes); "
        f"config: {os.path.join(cfg.OUTPUT_DIR, 'config.yaml')}"
    )

    logger.info("Step 3/3: training and evaluation")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()

    iou = results.get("pathfinder", {}).get("IoU", float("nan"))
    checkpoint = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    method = f"run_demo {os.path.splitext(os.path.basename(args.config_file))[0]}"
    write_json_atomic(os.path.join(cfg.OUTPUT_DIR, "row.json"), {  # what tools/publish_checkpoint.py ships
        "method": method, "iters": cfg.SOLVER.MAX_ITER, "batch": cfg.SOLVER.IMS_PER_BATCH, "iou": iou,
        "sec_per_iter": trainer.storage.history("time").global_avg(), "checkpoint": checkpoint})
    figure = draw_test_readouts(trainer.model, cfg, cfg.DATASETS.TEST[0], os.path.join(cfg.OUTPUT_DIR, "test_readouts.png"))
    events = sorted(glob.glob(os.path.join(cfg.OUTPUT_DIR, "events.out.tfevents.*")))
    logger.info(f"Pathfinder contour IoU on {cfg.DATASETS.TEST[0]} ({num_test} images): {iou:.4f}")
    logger.info(f"Checkpoint: {checkpoint}")
    logger.info(f"Figure: {figure} (test images, their labels and the readout after selected steps)")
    logger.info(f"TensorBoard events: {events[-1] if events else cfg.OUTPUT_DIR} (tensorboard --logdir {cfg.OUTPUT_DIR})")
    logger.info(f"Demo finished in {(time.time() - start) / 60:.1f} minutes (budget {args.minutes:.0f}).")
    return results


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

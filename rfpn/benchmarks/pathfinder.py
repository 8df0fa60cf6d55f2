"""Pathfinder benchmark of the gradient methods at CPU scale (a documented command, not a test).

Trains BPTT, C-BPTT, RBP, C-RBP and the feed-forward control (the default ``--methods``), or any of
the other gradient methods named with ``--methods`` (JFB, phantom gradients and their LCP variants,
C-RBP with the automatic LCP weight, the reversible couplings, BPTT and C-RBP with state momentum
and its damped control), with the same budget
(iterations, batch, data) and reports for each: test IoU (pooled contour IoU), recurrent steps, training memory
(bytes autograd saves for backward in one training iteration, counted with
``rfpn.recurrent.saved_tensor_bytes``), and seconds per training iteration. Then it tests the
BPTT and C-RBP models, trained on the short contours, on longer ones (generalisation).

The command line is ``tools/benchmark_pathfinder.py``. Writes ``<output-dir>/benchmark_pathfinder.json`` and ``.png``
(and ``momentum_pathfinder.png`` when state-momentum rows finished); ``--copy-to-docs`` also copies the
figures to ``docs/figures/``, the first one named after the output folder. Each method's result is kept in ``<output-dir>/<method>/row.json``:
a re-run (say, after an interruption) trains only the methods without one, each from its last
checkpoint if it has one (``--rerun`` retrains from scratch;
``--eval-only`` scores the saved checkpoints again with the configs' current test-time settings);
``--previous`` adds the runs of an earlier summary, so a committed one is extended by training only
the methods it lacks.
``--jobs 2`` trains two methods at a time in child processes with one thread each, which on a
2-core machine halves the wall time (one thread per process is as fast here as two). Example
(README, "Pathfinder")::

    python tools/benchmark_pathfinder.py --iters 3000 --prepare --jobs 2 --copy-to-docs
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

import rfpn  # noqa: F401  (registers datasets and models)
from rfpn.data.pathfinder import implied_preset, register_pathfinder
from rfpn.data.pathfinder_generator import main as prepare_pathfinder
from rfpn.engine import Trainer
from rfpn.engine.amp import resolve_precision
from rfpn.analysis.figures import plot_momentum_pathfinder, plot_pathfinder_benchmark, plot_penalty_weight_curves
from rfpn.config import training_steps
from rfpn.modeling.recurrent_core import penalty_weight_history, uses_state_momentum
from rfpn.recurrent import saved_tensor_bytes
from rfpn.utils import run_cli
from rfpn.utils.cli import load_config, tool_parser
from rfpn.utils.events import metric_history, metric_mean
from rfpn.utils.files import copy_to_docs, write_json_atomic
from rfpn.utils.jobs import ChildJob, run_child_jobs
from rfpn.utils.runs import adopt_rows, load_run, run_dir, save_run
from rfpn.utils.models import build_eval_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO, "configs", "Pathfinder", "cpu")
METHODS = {
    "BPTT": "pfcpu9_hgru_bptt.yaml",
    "C-BPTT": "pfcpu9_hgru_cbptt.yaml",
    "RBP": "pfcpu9_hgru_rbp.yaml",
    "C-RBP": "pfcpu9_hgru_crbp.yaml",
    "FF control": "pfcpu9_ff_control.yaml",
    "JFB": "pfcpu9_hgru_jfb.yaml",
    "Phantom": "pfcpu9_hgru_phantom.yaml",
    "C-JFB": "pfcpu9_hgru_cjfb.yaml",
    "C-Phantom": "pfcpu9_hgru_cphantom.yaml",
    "C-RBP auto": "pfcpu9_hgru_crbp_auto.yaml",
    "C-RBP bf16": "pfcpu9_hgru_crbp_bf16.yaml",
    "Reversible": "pfcpu9_hgru_reversible.yaml",
    "Reversible additive": "pfcpu9_hgru_reversible_additive.yaml",
    "convLSTM BPTT": "pfcpu9_convlstm_bptt.yaml",
    "convLSTM C-RBP": "pfcpu9_convlstm_crbp.yaml",
}
# state momentum (seed 003) with the step 0.6, and its control: the same step without momentum
MOMENTUM_METHODS = {
    f"{method} {variant}": f"pfcpu9_hgru_{prefix}_{suffix}.yaml"
    for method, prefix in (("BPTT", "bptt"), ("C-RBP", "crbp"))
    for variant, suffix in (("mu 0.3", "mu03"), ("mu 0.6", "mu06"), ("mu 0.9", "mu09"), ("damped", "damped"))
}
METHODS.update(MOMENTUM_METHODS)
# trained when --methods is not given: the README's table (about 2.5 hours on 2 cores with --jobs 2)
DEFAULT_METHODS = ("BPTT", "C-BPTT", "RBP", "C-RBP", "FF control")
GENERALISATION_METHODS = ("BPTT", "C-RBP")
# methods also tested with 3x their training steps: does the dynamics stay put past the steps it was trained for?
PAST_STEPS_METHODS = ("BPTT", "C-RBP", "Reversible", "Reversible additive", *MOMENTUM_METHODS)
logger = logging.getLogger("rfpn.benchmark_pathfinder")


def training_parser(description: str, output_dir: str, methods: list[str], iters: int, *, threads_help: str,
                    jobs_help: str, rerun_help: str, default_methods: list[str] | None = None) -> argparse.ArgumentParser:
    """The flags every Pathfinder training benchmark shares: threads, output directory, figures copied to
    ``docs/``, config overrides, methods (``default_methods`` or all of them), iterations, data
    preparation, parallel child jobs and reruns."""
    p = tool_parser(
        description, threads=2, output_dir=output_dir, copy_to_docs=True, opts=True,
        helps={"threads": threads_help, "copy_to_docs": "copy the figures to docs/figures/",
               "opts": "KEY VALUE config overrides for every method"},
    )
    defaults = list(default_methods or methods)
    p.add_argument("--methods", nargs="+", default=defaults, choices=list(methods), metavar="METHOD",
                   help=f"methods to train (default: {', '.join(defaults)}); choices: {', '.join(methods)}")
    p.add_argument("--iters", type=int, default=iters, help="training iterations of every run (equal budget)")
    p.add_argument("--prepare", action="store_true", help="generate the pathfinder_cpuN sets named (kept if present)")
    p.add_argument("--jobs", type=int, default=1, help=jobs_help)
    p.add_argument("--rerun", action="store_true", help=rerun_help)
    p.add_argument("--previous", action="append", default=[], metavar="JSON",
                   help="an earlier summary of this benchmark (e.g. a committed one in benchmarks/results/; repeatable): "
                        "its runs with the same --iters and training set count as finished")
    p.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: no summary
    return p


def adopt_previous(args: argparse.Namespace, methods: list[str] | dict, train_set: str) -> list[dict]:
    """Keep the runs of the ``--previous`` summaries as finished runs of ``--output-dir``; return the summaries.

    Only rows of ``methods`` with the same ``--iters``, from summaries of ``train_set``, are taken, and a
    run that finished here keeps its own row, so a summary can be rebuilt or extended without training
    again what the repository already reports.
    """
    summaries = []
    for path in args.previous:
        with open(path) as f:
            summary = json.load(f)
        if summary.get("train_set", train_set) != train_set:
            logger.warning(f"{path} was trained on {summary['train_set']}, not {train_set}: not used")
            continue
        rows = [row for row in summary.get("rows", []) if row["method"] in methods]
        adopt_rows(args.output_dir, rows, "method", {"iters": args.iters}, source=path)
        summaries.append(summary)
    return summaries


def start_benchmark(args: argparse.Namespace, train_set: str, test_sets: list[str], test_only_sets: bool) -> None:
    """Threads, loggers and output directory; then the sets: generated with ``--prepare`` (the
    ``pathfinder_cpuN`` ones; ``test_only_sets``: no training images for the test sets), else registered."""
    torch.set_num_threads(args.threads)
    setup_logger()
    setup_logger(name="rfpn")
    os.makedirs(args.output_dir, exist_ok=True)
    for name in dict.fromkeys([train_set, *test_sets]):
        preset = implied_preset(name)
        if args.prepare and preset is not None and preset[0] == "cpu":
            no_train = ["--num-train", "0"] if test_only_sets and name != train_set else []
            prepare_pathfinder(["--preset", "cpu", "--contour-length", str(preset[1]), *no_train])
            register_pathfinder(name)  # again, with the metadata of the set on disk
        elif f"{name}_test" not in DatasetCatalog.list():
            register_pathfinder(name)


def parse_args(argv=None) -> argparse.Namespace:
    p = training_parser(
        __doc__, os.path.join("output", "benchmark_pathfinder"), list(METHODS), 1500,
        threads_help="torch threads per training process",
        jobs_help="methods trained at once, each in a child process with --threads // --jobs threads",
        rerun_help="retrain methods that already have a row.json", default_methods=list(DEFAULT_METHODS),
    )
    p.add_argument("--train-set", default="pathfinder_cpu9", help="registered Pathfinder set to train and test on")
    p.add_argument("--test-sets", nargs="+", default=["pathfinder_cpu9", "pathfinder_cpu12", "pathfinder_cpu14"],
                   help="sets (longer contours) to test the BPTT and C-RBP models on")
    p.add_argument("--eval-only", action="store_true",
                   help="score the named methods' saved checkpoints again with their current config (test-time "
                        "settings such as TEST_SOLVER / TEST_STEPS), keeping the training measurements")
    return p.parse_args(argv)


def scaled_cfg(config_path: str, iters: int, overrides: list, opts) -> CfgNode:
    """A packaged config trained for ``iters`` (LR steps scaled, checkpoints every 500, no periodic
    evaluation), then ``overrides``, then the user's ``opts``; frozen."""
    cfg = load_config(config_path)
    scale = iters / cfg.SOLVER.MAX_ITER
    cfg.merge_from_list(
        [
            "SOLVER.MAX_ITER", iters,
            "SOLVER.STEPS", tuple(max(1, int(s * scale)) for s in cfg.SOLVER.STEPS),
            "SOLVER.CHECKPOINT_PERIOD", min(iters, 500),  # CPU checkpoints are kilobytes; an interrupted run resumes
            "TEST.EVAL_PERIOD", 0,
            *overrides,
        ]
    )
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def method_cfg(config_file: str, train_set: str, test_set: str, iters: int, output_dir: str, opts) -> CfgNode:
    """The method's packaged config, trained for ``iters`` on ``train_set``, then ``opts``."""
    overrides = ["DATASETS.TRAIN", (f"{train_set}_train",), "DATASETS.TEST", (f"{test_set}_test",), "OUTPUT_DIR", output_dir]
    return scaled_cfg(os.path.join(CONFIG_DIR, config_file), iters, overrides, opts)


def training_bytes(cfg: CfgNode) -> int:
    """Bytes saved for backward by one training iteration (forward + loss) of a fresh model, in its precision."""
    model = Trainer.build_model(cfg)
    batch = next(iter(Trainer.build_train_loader(cfg)))
    with saved_tensor_bytes() as counter, resolve_precision(cfg).autocast():
        loss = sum(model(batch).values())
    loss.backward()
    return counter.forward_bytes


def contour_length_of(test_set: str) -> int | str:
    """The contour length of a registered Pathfinder set (its name when the metadata lacks it)."""
    return MetadataCatalog.get(f"{test_set}_test").get("contour_length", None) or test_set


def train_measured(name: str, config: str, cfg: CfgNode, fresh: bool) -> tuple[dict, Trainer, dict]:
    """Train ``cfg`` and measure it: the row of training measurements, the trainer, its final evaluation.

    ``fresh`` retrains from scratch; otherwise the run goes on from its last checkpoint (an interrupted
    run). Time per iteration and the steps used come from the run's ``metrics.json``, so they cover
    the whole run even when it was resumed; ``config`` is the config file the row names.
    """
    iters = cfg.SOLVER.MAX_ITER
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    memory = training_bytes(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=not fresh)
    start = time.perf_counter()
    results = trainer.train()
    elapsed = time.perf_counter() - start
    sec_per_iter = metric_mean(cfg.OUTPUT_DIR, "time") or elapsed / max(iters - trainer.start_iter, 1)
    rc = cfg.MODEL.RECURRENT
    recurrent = cfg.MODEL.PATHFINDER.CORE == "recurrent"
    steps_key = next((k for k in metric_history(cfg.OUTPUT_DIR, "recurrent/") if k.endswith("/steps")), None)
    row = {
        "method": name,
        "config": config,
        "grad": rc.GRAD if recurrent else "feedforward",
        "solver": rc.SOLVER if recurrent else "-",
        "steps": training_steps(cfg) if recurrent else cfg.MODEL.PATHFINDER.FF_LAYERS,
        # cell evaluations per forward pass, averaged over the last 20% of training
        "mean_steps": metric_mean(cfg.OUTPUT_DIR, steps_key, iters - max(1, iters // 5)) if steps_key else None,
        "iters": iters,
        "batch": cfg.SOLVER.IMS_PER_BATCH,
        "precision": resolve_precision(cfg).name,
        "saved_bytes": memory,
        "sec_per_iter": sec_per_iter,
        "checkpoint": os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
    }
    if recurrent and uses_state_momentum(rc):
        row["momentum"] = {"mu": rc.MOMENTUM, "step": rc.MOMENTUM_STEP}
    if trainer.start_iter > 0:
        row["resumed_from_iter"] = trainer.start_iter
    row.update(penalty_weight_history(trainer.storage, "recurrent", iters))
    return row, trainer, results


def run_method(name: str, args, out_root: str) -> dict:
    out = run_dir(out_root, name)
    cfg = method_cfg(METHODS[name], args.train_set, args.train_set, args.iters, out, args.opts)
    # a run without a row was interrupted: go on from its last checkpoint; one with a row is retrained (--rerun)
    row, trainer, results = train_measured(
        name, os.path.join("configs", "Pathfinder", "cpu", METHODS[name]), cfg, fresh=load_run(out_root, name) is not None
    )
    row.update(evaluation(name, args, cfg, trainer.model, results["pathfinder"]["IoU"]))
    logger.info(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'checkpoint'})}")
    save_run(out_root, row, name)
    return row


def evaluation(name: str, args, cfg: CfgNode, model: torch.nn.Module, iou: float | None = None) -> dict:
    """Test IoU on the training length and, for the generalisation methods, on the longer test sets.

    Inference follows ``cfg`` (the method's config as loaded for training, so a config file edited
    while a long run trains cannot change or break its evaluation); ``iou`` is the training run's
    own evaluation on the training length, when there is one.
    """
    def test_iou(test_set: str) -> float:
        test_cfg = cfg.clone()
        test_cfg.defrost()
        test_cfg.DATASETS.TEST = (f"{test_set}_test",)
        return Trainer.test(test_cfg, model)["pathfinder"]["IoU"]

    iou = test_iou(args.train_set) if iou is None else iou
    lengths = args.test_sets if name in GENERALISATION_METHODS else []
    generalisation = {
        str(contour_length_of(t)): iou if t == args.train_set else test_iou(t) for t in lengths
    }
    result = {"iou": iou, "generalisation": generalisation, "inference": inference_description(cfg)}
    if name in PAST_STEPS_METHODS and cfg.MODEL.RECURRENT.SOLVER == "fixed":
        rc = cfg.MODEL.RECURRENT
        past = 3 * rc.STEPS
        past_cfg = cfg.clone()
        past_cfg.defrost()
        past_cfg.MODEL.RECURRENT.TEST_SOLVER, past_cfg.MODEL.RECURRENT.TEST_STEPS = "fixed", past
        past_cfg.DATASETS.TEST = (f"{args.train_set}_test",)
        past_model = build_eval_model(past_cfg, weights="")  # the test steps are fixed when the model is built
        past_model.load_state_dict(model.state_dict())
        result["iou_past_training_steps"] = {"steps": past, "iou": Trainer.test(past_cfg, past_model)["pathfinder"]["IoU"]}
    return result


def inference_description(cfg: CfgNode) -> str:
    """How a method's test pass runs, e.g. ``fixed, 60 steps`` or ``anderson, tol 0.001, <= 40 steps``."""
    if cfg.MODEL.PATHFINDER.CORE != "recurrent":
        return f"{cfg.MODEL.PATHFINDER.FF_LAYERS} layers"
    rc = cfg.MODEL.RECURRENT
    solver = rc.TEST_SOLVER or rc.SOLVER
    if solver == "fixed":
        return f"fixed, {rc.TEST_STEPS or rc.STEPS} steps"
    return f"{solver}, tol {rc.TOL:g}, <= {rc.MAX_STEPS} steps"


def reevaluate(name: str, args, out_root: str) -> dict:
    """Score a finished method's checkpoint again with the current config; training numbers are kept."""
    row = load_run(out_root, name, match={"iters": args.iters})
    if row is None or not os.path.isfile(row["checkpoint"]):
        raise FileNotFoundError(
            f"{name} has no finished run of {args.iters} iterations in {run_dir(out_root, name)}; train it first "
            "(drop --eval-only)."
        )
    cfg = method_cfg(METHODS[name], args.train_set, args.train_set, args.iters, run_dir(out_root, name), args.opts)
    model = build_eval_model(cfg, row["checkpoint"])
    row.update(evaluation(name, args, cfg, model))
    logger.info(f"{name} re-evaluated: {json.dumps({k: row[k] for k in ('iou', 'generalisation', 'inference')})}")
    save_run(out_root, row, name)
    return row


def child_job(name: str, args) -> ChildJob:
    """One method trained in a child process running this module (its log: ``<method>/benchmark.log``)."""
    threads = max(1, args.threads // args.jobs)
    argv = [
        sys.executable, "-m", __name__, "--methods", name, "--rerun", "--row-only",
        "--iters", str(args.iters), "--train-set", args.train_set, "--test-sets", *args.test_sets,
        "--threads", str(threads), "--output-dir", args.output_dir, *args.opts,
    ]
    return ChildJob(name, argv, os.path.join(run_dir(args.output_dir, name), "benchmark.log"), threads)


def _past_steps(row: dict) -> str:
    past = row.get("iou_past_training_steps")
    return f"{past['iou']:.3f} ({past['steps']} steps)" if past else "-"


def _steps_used(row: dict) -> str:
    return "-" if row.get("mean_steps") is None else f"{row['mean_steps']:.1f}"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    start_benchmark(args, args.train_set, args.test_sets, test_only_sets=False)
    if not args.row_only:
        adopt_previous(args, METHODS, args.train_set)
    finished = {"iters": args.iters}
    todo = [n for n in args.methods if args.rerun or load_run(args.output_dir, n, match=finished) is None]
    if args.eval_only:
        for name in args.methods:
            reevaluate(name, args, args.output_dir)
    elif todo and args.jobs > 1:
        run_child_jobs([child_job(n, args) for n in todo], args.jobs)
    else:
        for name in todo:
            run_method(name, args, args.output_dir)
    rows = [row for row in (load_run(args.output_dir, n, match=finished) for n in METHODS) if row is not None]  # all finished
    if args.row_only:
        return rows
    json_path = os.path.join(args.output_dir, "benchmark_pathfinder.json")
    write_json_atomic(json_path, {"train_set": args.train_set, "iters": args.iters, "threads": args.threads,
                                  "opts": list(args.opts), "rows": rows})
    png_path = os.path.join(args.output_dir, "benchmark_pathfinder.png")
    plot_pathfinder_benchmark(png_path, rows, args.train_set)
    curves = {r["method"]: r["curves"] for r in rows if r.get("curves")}
    if curves:
        plot_penalty_weight_curves(os.path.join(args.output_dir, "penalty_weight.png"), curves, lam=0.9)
    if args.copy_to_docs:  # named after the output folder, so a run of other methods keeps the README's figure
        copy_to_docs(png_path, f"{os.path.basename(os.path.normpath(args.output_dir))}.png")
    momentum = [r for r in rows if r["method"] in MOMENTUM_METHODS]
    if len(momentum) > 1:
        baselines = {r["method"]: r["iou"] for r in rows if r["method"] in ("BPTT", "C-RBP")}
        momentum_png = plot_momentum_pathfinder(os.path.join(args.output_dir, "momentum_pathfinder.png"), momentum, baselines)
        if args.copy_to_docs:
            copy_to_docs(momentum_png, "momentum_pathfinder.png")
    lengths = sorted({n for r in rows for n in r["generalisation"]}, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    print("| method | config | steps (max) | steps used | test pass | IoU | IoU at 3x steps | MiB saved for backward | s / iter | "
          + "".join(f"IoU, {n} paddles | " for n in lengths))
    print("|" + "---|" * (9 + len(lengths)))
    for r in rows:
        gen = "".join(f"{r['generalisation'][n]:.3f} | " if n in r["generalisation"] else "- | " for n in lengths)
        print(
            f"| {r['method']} | `{r['config']}` | {r['steps']} | {_steps_used(r)} | {r.get('inference', '-')} | {r['iou']:.3f} | "
            f"{_past_steps(r)} | {r['saved_bytes'] / 2**20:.1f} | {r['sec_per_iter']:.2f} | {gen}"
        )
    print(f"Wrote {json_path} and {png_path}")
    return rows


if __name__ == "__main__":  # a --jobs child (child_job)
    run_cli(main)

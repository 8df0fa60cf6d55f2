#!/usr/bin/env python
"""Train or evaluate any rfpn model (Pathfinder segmentors, R-FPN) with Detectron2's tooling.

Usage, as with Detectron2's own ``tools/train_net.py``::

    python tools/train_net.py --config-file configs/Pathfinder/cpu/pfcpu9_hgru_crbp.yaml
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
    python tools/train_net.py --config-file ... --resume          # continue from the last checkpoint
    python tools/train_net.py --config-file ... --num-gpus 2 SOLVER.MAX_ITER 500   # overrides last

``--num-gpus N`` starts N processes through Detectron2's ``launch``: one per GPU with NCCL, or, on a
machine without CUDA, N CPU processes with GLOO. ``SOLVER.IMS_PER_BATCH`` is the total batch over
all processes. On a machine with GPUs, ``CUDA_VISIBLE_DEVICES=`` forces CPU processes. Several
machines: run the same command on each with ``--num-machines M``,
``--machine-rank 0..M-1`` and the same ``--dist-url tcp://<rank-0 host>:<port>``.
"""
from __future__ import annotations

import os

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import rfpn  # noqa: F401  (registers rfpn's models and datasets)
from rfpn.config import (
    validate_pathfinder_config,
    validate_recurrent_config,
    validate_run_config,
    validate_training_safety_config,
)
from rfpn.engine import Trainer
from rfpn.engine.checkpoint import CheckedCheckpointer
from rfpn.engine.ddp import distributed_main
from rfpn.utils.cli import UsageError, check_registered_datasets, load_config, run_cli


def setup(args) -> CfgNode:
    """Config from rfpn defaults + the YAML file + command-line overrides, checked, then Detectron2's setup.

    A missing config file, an unknown key or dataset, or a bad value raises ``UsageError`` naming it.
    """
    cfg = checked_config(args)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def checked_config(args) -> CfgNode:
    """The merged config, after every check that needs no model; raises ``UsageError`` naming the problem."""
    processes = args.num_gpus * args.num_machines

    def run_settings(cfg: CfgNode) -> None:
        validate_run_config(cfg, processes, training=not args.eval_only)

    validators = [validate_recurrent_config, validate_pathfinder_config, validate_training_safety_config, run_settings]
    cfg = load_config(args.config_file, args.opts, validators=validators)
    check_registered_datasets(cfg)
    if args.eval_only and not cfg.MODEL.WEIGHTS and not getattr(args, "allow_random_weights", False):
        last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
        if not (args.resume and os.path.isfile(last)):
            raise UsageError(
                "--eval-only needs weights: add MODEL.WEIGHTS <checkpoint> (or --resume with an OUTPUT_DIR that holds "
                "one); pass --allow-random-weights to evaluate an untrained model on purpose."
            )
    return cfg


def check_and_launch(args) -> None:
    """Check the command line in this process, then start the workers: misuse ends before any worker starts."""
    if args.num_gpus < 1 or args.num_machines < 1 or not 0 <= args.machine_rank < args.num_machines:
        raise UsageError(
            f"--num-gpus {args.num_gpus} --num-machines {args.num_machines} --machine-rank {args.machine_rank}: "
            "use --num-gpus >= 1 (processes per machine), --num-machines >= 1 and 0 <= --machine-rank < --num-machines."
        )
    if args.dist_url == "auto" and args.num_machines > 1:
        raise UsageError("--dist-url auto works on one machine only; give every machine tcp://<rank-0 host>:<port>.")
    cfg = checked_config(args)
    processes = args.num_gpus * args.num_machines
    if processes > 1 and torch.cuda.is_available():
        if cfg.MODEL.DEVICE == "cpu":
            raise UsageError(
                "With CUDA present, --num-gpus starts one NCCL worker per GPU, and NCCL needs the model on its GPU: "
                "add MODEL.DEVICE cuda, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train in CPU processes."
            )
        if args.num_gpus > torch.cuda.device_count():
            raise UsageError(
                f"--num-gpus {args.num_gpus} but this machine has {torch.cuda.device_count()} GPU(s); use at most that many."
            )
    if processes > 1:  # a dataset that is registered but missing or damaged fails here, not in every worker
        for name in (*([] if args.eval_only else cfg.DATASETS.TRAIN), *cfg.DATASETS.TEST):
            DatasetCatalog.get(name)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


@distributed_main
def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = CheckedCheckpointer(model, save_dir=cfg.OUTPUT_DIR, partial=cfg.MODEL.ALLOW_PARTIAL_WEIGHTS)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    """Detectron2's parser plus ``--allow-random-weights`` (``--eval-only`` of an untrained model)."""
    parser = default_argument_parser()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="with --eval-only: evaluate without MODEL.WEIGHTS (random initialisation)")
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    run_cli(check_and_launch, args)


if __name__ == "__main__":
    invoke_main()

#!/usr/bin/env python
"""Train or evaluate any rfpn model (Pathfinder segmentors, R-FPN) with Detectron2's tooling.

Usage, as with Detectron2's own ``tools/train_net.py``::

    python tools/train_net.py --config-file configs/Pathfinder/cpu/pfcpu9_hgru_crbp.yaml
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/.../model_final.pth
    python tools/train_net.py --config-file ... --resume          # continue from the last checkpoint
    python tools/train_net.py --config-file ... --num-gpus 2 SOLVER.MAX_ITER 500   # overrides last
"""
from __future__ import annotations

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import rfpn  # noqa: F401  (registers rfpn's models and datasets)
from rfpn.config import validate_pathfinder_config, validate_recurrent_config
from rfpn.engine import Trainer
from rfpn.engine.ddp import distributed_main
from rfpn.utils.cli import check_registered_datasets, load_config, run_cli


def setup(args) -> CfgNode:
    """Config from rfpn defaults + the YAML file + command-line overrides, checked, then Detectron2's setup.

    A missing config file, an unknown key or dataset, or a bad value raises ``UsageError`` naming it.
    """
    cfg = load_config(args.config_file, args.opts, validators=[validate_recurrent_config, validate_pathfinder_config])
    check_registered_datasets(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


@distributed_main
def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    run_cli(
        lambda: launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    )


if __name__ == "__main__":
    invoke_main()

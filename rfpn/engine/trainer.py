"""``Trainer``: the trainer of both rfpn tasks (``tools/train_net.py``), a Detectron2 ``DefaultTrainer``.

It extends :class:`~rfpn.engine.defaults.ResilientTrainer` (CPU-capable DDP, non-finite guard,
Neumann cap logging) with the stability diagnostics hook (``DIAGNOSTICS.PERIOD``), the
``SOLVER.OPTIMIZER`` choice, and task-aware loaders and evaluators. The dataset's metadata
``evaluator_type`` decides:

- ``"pathfinder"``: the :class:`~rfpn.data.pathfinder_mapper.PathfinderDatasetMapper` for both
  loaders and the pooled-IoU :class:`~rfpn.evaluation.PathfinderEvaluator`;
- ``"coco_panoptic_seg"``: Detectron2's default mapper (wrapped so a damaged image or PNG is named
  with the command that makes it again) and the evaluators its own ``tools/train_net.py`` builds for
  Panoptic FPN (semantic, COCO instance, panoptic);
- other types fall back to Detectron2's standard ones (``sem_seg``, ``coco``).
"""
from __future__ import annotations

import logging
import os

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import HookBase, hooks
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from rfpn.config import validate_pathfinder_config
from rfpn.data.panoptic_registration import checked_mapper
from rfpn.evaluation import PathfinderEvaluator

from .defaults import ResilientTrainer
from .diagnostics_hook import build_diagnostics_hook

__all__ = ["Trainer", "is_pathfinder_dataset"]


def is_pathfinder_dataset(dataset_name: str) -> bool:
    """True when the registered dataset's metadata says it is evaluated as Pathfinder."""
    return MetadataCatalog.get(dataset_name).get("evaluator_type", None) == "pathfinder"


def _pathfinder_mapper(cfg: CfgNode, is_train: bool):
    from rfpn.data.pathfinder_mapper import PathfinderDatasetMapper

    return PathfinderDatasetMapper(cfg, is_train)


class Trainer(ResilientTrainer):
    """rfpn's DefaultTrainer: task-aware loaders and evaluators, ``SOLVER.OPTIMIZER``, diagnostics."""

    def build_hooks(self) -> list[HookBase | None]:
        """The default hooks plus the diagnostics hook, placed before the writer so its values print."""
        hook_list = super().build_hooks()
        diagnostics = build_diagnostics_hook(self.cfg)
        if diagnostics is not None:
            writer_at = next(
                (i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicWriter)), len(hook_list)
            )
            hook_list.insert(writer_at, diagnostics)
        return hook_list

    def train(self) -> dict:
        """Train, then return the last evaluation's results (``{}`` if none ran)."""
        super().train()
        return getattr(self, "_last_eval_results", None) or {}

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        meta = MetadataCatalog.get(dataset_name)
        evaluator_type = meta.get("evaluator_type", None)
        if evaluator_type == "pathfinder":
            return PathfinderEvaluator(dataset_name, ignore_label=meta.get("ignore_label", 255))
        if evaluator_type == "coco_panoptic_seg":
            return DatasetEvaluators(
                [
                    SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder),
                    COCOEvaluator(dataset_name, output_dir=output_folder),
                    COCOPanopticEvaluator(dataset_name, output_folder),
                ]
            )
        if evaluator_type == "sem_seg":
            return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        if evaluator_type == "coco":
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} (metadata evaluator_type={evaluator_type!r}); "
            "supported: pathfinder, coco_panoptic_seg, sem_seg, coco."
        )

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        names = list(cfg.DATASETS.TRAIN)
        if not names:
            raise ValueError("DATASETS.TRAIN is empty: name at least one registered training dataset.")
        kinds = {is_pathfinder_dataset(n) for n in names}
        if len(kinds) > 1:
            raise ValueError(f"DATASETS.TRAIN={names} mixes Pathfinder and other datasets; train on one kind.")
        if kinds.pop():
            return build_detection_train_loader(cfg, mapper=_pathfinder_mapper(cfg, True))
        return build_detection_train_loader(cfg, mapper=checked_mapper(cfg, True, names))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        if is_pathfinder_dataset(dataset_name):
            return build_detection_test_loader(
                cfg, dataset_name, mapper=_pathfinder_mapper(cfg, False), batch_size=cfg.TEST.IMS_PER_BATCH
            )
        return build_detection_test_loader(cfg, dataset_name, mapper=checked_mapper(cfg, False, [dataset_name]))

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        """SGD with momentum (Detectron2's default), Adam or AdamW, chosen by ``SOLVER.OPTIMIZER``."""
        validate_pathfinder_config(cfg)
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        kind = cfg.SOLVER.OPTIMIZER
        if kind == "SGD":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params,
                lr=cfg.SOLVER.BASE_LR,
                momentum=cfg.SOLVER.MOMENTUM,
                nesterov=cfg.SOLVER.NESTEROV,
                weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            )
        else:
            adam = torch.optim.Adam if kind == "ADAM" else torch.optim.AdamW
            optimizer = adam(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        logging.getLogger(__name__).info(f"Optimizer: {kind}, base lr {cfg.SOLVER.BASE_LR}")
        return maybe_add_gradient_clipping(cfg, optimizer)

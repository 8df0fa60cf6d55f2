"""``ResilientTrainer``: Detectron2's ``DefaultTrainer`` made to scale out on CPUs and to survive divergence.

Differences from ``DefaultTrainer`` (everything else, including ``--resume``, is Detectron2's own):

- the model is wrapped by :func:`rfpn.engine.ddp.create_ddp_model`, so multi-process training
  works on the CPU (GLOO) as well as on GPUs (NCCL);
- the step runs in :class:`~rfpn.engine.train_loop.NonFiniteGuardTrainer`, which stops with a
  message naming the iteration and the failing loss term / recurrent step / parameter, or skips
  the batch, as ``SOLVER.NONFINITE`` says;
- ``SOLVER.AMP.ENABLED`` works on the CPU too (bf16 autocast; ``SOLVER.AMP.PRECISION``, see
  :mod:`rfpn.engine.amp`), in training and in evaluation (Detectron2's ``AMPTrainer`` needs CUDA);
- checkpoints are written atomically (:class:`~rfpn.engine.checkpoint.AtomicCheckpointer`), so a run
  killed at any moment resumes from its last complete checkpoint, and weights load strictly (a file
  that is missing, truncated or of another model is a one-line error; ``MODEL.ALLOW_PARTIAL_WEIGHTS``);
- :class:`~rfpn.engine.hooks.BackwardCapHook` logs how often an implicit backward hit its norm cap;
- with several processes, :class:`~rfpn.engine.hooks.PenaltyWeightSyncHook` keeps the automatic LCP
  weights (``MODEL.RECURRENT.LCP_WEIGHT_AUTO``) equal on every rank;
- a multi-process run ends by checking that every rank holds the same weights.
"""
from __future__ import annotations

import logging
import weakref

import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, HookBase, TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from rfpn.config import validate_training_safety_config

from .amp import resolve_precision
from .checkpoint import AtomicCheckpointer
from .ddp import check_replicas_in_sync, create_ddp_model
from .hooks import BackwardCapHook, PenaltyWeightSyncHook, find_dynamics
from .train_loop import NonFiniteGuardTrainer

__all__ = ["AtomicCheckpointer", "ResilientTrainer"]  # AtomicCheckpointer: re-exported from .checkpoint


class ResilientTrainer(DefaultTrainer):
    """``DefaultTrainer`` with a CPU-capable DDP wrapper, a non-finite guard and Neumann cap logging."""

    def __init__(self, cfg: CfgNode):
        # The body of DefaultTrainer.__init__, in its order, with rfpn's DDP wrapper and step guard.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        if not logging.getLogger("rfpn").handlers:  # rfpn's warnings (skips, cap hits) go to the run's log too
            setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="rfpn", abbrev_name="rfpn")
            logging.getLogger("rfpn").propagate = True  # setup_logger cuts it; keep root handlers (pytest) working
        validate_training_safety_config(cfg)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = NonFiniteGuardTrainer(
            model,
            data_loader,
            optimizer,
            nonfinite=cfg.SOLVER.NONFINITE,
            precision=resolve_precision(cfg),
            max_skipped=int(cfg.SOLVER.NONFINITE_MAX_FRACTION * cfg.SOLVER.MAX_ITER),
        )

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(
            model, cfg.OUTPUT_DIR, partial=cfg.MODEL.ALLOW_PARTIAL_WEIGHTS, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> list[HookBase | None]:
        """Detectron2's default hooks, with :class:`BackwardCapHook` first when the model has recurrent dynamics.

        First, so that the checkpointer and the writers that follow see this step's count.
        """
        hooks = super().build_hooks()
        dynamics = find_dynamics(self.model)
        if dynamics:
            hooks.insert(0, BackwardCapHook())
        if comm.get_world_size() > 1 and any(d.penalty_options.auto for d in dynamics.values()):
            hooks.insert(0, PenaltyWeightSyncHook())
        return hooks

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):
        """Detectron2's evaluation, under the autocast of ``SOLVER.AMP`` (full precision when it is off)."""
        with resolve_precision(cfg).autocast():
            return super().test(cfg, model, evaluators)

    def train(self):
        """Detectron2's training loop; then check the replicas stayed identical and log the skipped batches."""
        results = super().train()
        if comm.get_world_size() > 1:
            check_replicas_in_sync(self.model)
        skipped, overflows = self._trainer.skipped_batches, self._trainer.overflow_steps
        logging.getLogger("rfpn").info(
            f"Training finished: {skipped} of {self.max_iter - self.start_iter} batches skipped for non-finite values"
            + (f", {overflows} fp16 steps skipped by the gradient scaler." if self._trainer.grad_scaler else ".")
        )
        return results

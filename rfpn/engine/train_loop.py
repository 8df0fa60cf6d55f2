"""A Detectron2 ``SimpleTrainer`` that stops or skips a step when the loss, state or gradients stop being finite.

Detectron2's ``SimpleTrainer`` notices a NaN loss only after ``backward`` and the optimizer
step are under way (in ``write_metrics``, on the main process), so the weights of that step are
already damaged and the message does not say which loss term failed. Here every step is
checked before the weights change:

1. the forward pass: the recurrent core raises ``FloatingPointError`` naming the step at which
   its state stopped being finite;
2. every loss term;
3. after ``backward``, every gradient (an implicit backward can fail on a finite loss).

With mixed precision (``precision``, :mod:`rfpn.engine.amp`) the forward pass runs under autocast;
for fp16 a gradient scaler scales the loss, and a step whose unscaled gradients overflow is
skipped by the scaler (which lowers its scale) and counted as ``amp/overflow_steps``, not as
divergence: fp16 overflow is the scaler's normal way of finding its scale.

``nonfinite="raise"`` stops training with a ``FloatingPointError`` naming the iteration and the
loss term, recurrent step or parameter. ``nonfinite="skip"`` drops the batch instead: no optimizer
step, a warning in the log, and the running count ``nonfinite/skipped_batches`` in the event
storage; once more than ``max_skipped`` batches were dropped, training stops as in ``raise`` mode
(a run that skips most of its batches is diverging, not unlucky). In multi-process runs the ranks agree on skipping (one small all-reduce per step, only in
``skip`` mode), so their weights stay identical; gradients are already averaged by DDP, so their
check needs no extra communication.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Mapping

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from rfpn.config import NONFINITE_MODES

from .amp import Precision

__all__ = ["NonFiniteGuardTrainer"]

_FIX = (
    "Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS, raise MODEL.RECURRENT.LCP_WEIGHT, or set "
    "SOLVER.NONFINITE skip to drop such batches."
)

logger = logging.getLogger(__name__)


def _nonfinite_terms(loss_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """``name=value`` of every loss term that is NaN or infinite."""
    bad = []
    for name, value in loss_dict.items():
        v = float(value.detach())
        if not math.isfinite(v):
            bad.append(f"{name}={v}")
    return bad


def _nonfinite_grads(model: torch.nn.Module, limit: int = 3) -> list[str]:
    """Names of (at most ``limit``) parameters whose gradient holds NaN or inf."""
    bad = []
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


class NonFiniteGuardTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose step fails with a precise message, or is skipped, on non-finite values.

    Args:
        model, data_loader, optimizer, kwargs: as for ``SimpleTrainer``.
        nonfinite: ``"raise"`` (stop training) or ``"skip"`` (drop the batch, count it).
        precision: the arithmetic (default full precision); fp16 brings a gradient scaler.
        max_skipped: in ``skip`` mode, stop once more batches than this were dropped (None: no limit).
        grad_scaler: the scaler to use for fp16 (default: ``precision.grad_scaler()``).
    """

    def __init__(self, model: torch.nn.Module, data_loader, optimizer: torch.optim.Optimizer,
                 nonfinite: str = "raise", precision: Precision | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None, max_skipped: int | None = None, **kwargs: Any):
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite={nonfinite!r} is not valid; allowed values: {', '.join(NONFINITE_MODES)}.")
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.nonfinite = nonfinite
        self.skipped_batches = 0
        self.max_skipped = max_skipped
        self.precision = precision or Precision(next(model.parameters()).device.type)
        self.grad_scaler = grad_scaler or self.precision.grad_scaler()
        self.overflow_steps = 0

    def run_step(self) -> None:
        assert self.model.training, "[NonFiniteGuardTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        self.optimizer.zero_grad()

        problem = None
        try:
            with self.precision.autocast():
                loss_dict = self.model(data)
        except FloatingPointError as e:  # the recurrent core names the step whose state diverged
            loss_dict, problem = None, f"the forward pass failed: {e}"
        if loss_dict is not None:
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            bad = _nonfinite_terms(loss_dict)
            if bad:
                problem = f"non-finite loss term(s) {', '.join(bad)}"
        if self._any_rank_failed(problem is not None):
            self._handle(problem or "another rank met a non-finite loss or state")
            return

        losses = sum(loss_dict.values())
        (self.grad_scaler.scale(losses) if self.grad_scaler else losses).backward()
        self.after_backward()
        if self.grad_scaler:
            self.grad_scaler.unscale_(self.optimizer)
        bad = _nonfinite_grads(self.model)
        if bad and self.grad_scaler:  # fp16 overflow: the scaler skips the step and lowers its scale
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            self.overflow_steps += 1
            get_event_storage().put_scalar("amp/overflow_steps", self.overflow_steps, smoothing_hint=False)
            return
        if bad:  # DDP has averaged the gradients: every rank sees the same ones and decides alike
            self._handle(f"non-finite gradient of {', '.join(bad)} after a finite loss")
            return

        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        if self.grad_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            get_event_storage().put_scalar("amp/loss_scale", self.grad_scaler.get_scale(), smoothing_hint=False)
        else:
            self.optimizer.step()

    def _any_rank_failed(self, failed: bool) -> bool:
        """``failed`` of this rank, OR-ed over all ranks in ``skip`` mode (``raise`` mode stops locally)."""
        if self.nonfinite == "raise" or comm.get_world_size() == 1:
            return failed
        device = next(self.model.parameters()).device
        flag = torch.tensor([float(failed)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _handle(self, problem: str) -> None:
        """Raise, or skip this batch: zero the gradients, count and log the skip."""
        message = f"Iteration {self.iter}: {problem}."
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{message} Training stopped. {_FIX}")
        self.optimizer.zero_grad()
        self.skipped_batches += 1
        if self.max_skipped is not None and self.skipped_batches > self.max_skipped:
            raise FloatingPointError(
                f"{message} Training stopped: {self.skipped_batches} batches were skipped, more than the "
                f"{self.max_skipped} that SOLVER.NONFINITE_MAX_FRACTION allows. {_FIX.split(', or set')[0]}."
            )
        get_event_storage().put_scalar("nonfinite/skipped_batches", self.skipped_batches, smoothing_hint=False)
        logger.warning(f"{message} Skipped this batch (SOLVER.NONFINITE=skip); {self.skipped_batches} skipped so far.")

    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["skipped_batches"] = self.skipped_batches
        ret["overflow_steps"] = self.overflow_steps
        if self.grad_scaler:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.skipped_batches = state_dict.get("skipped_batches", 0)
        self.overflow_steps = state_dict.get("overflow_steps", 0)
        if self.grad_scaler and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

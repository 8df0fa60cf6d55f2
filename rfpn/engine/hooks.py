"""Training hooks that report how the recurrent models' implicit backward behaves."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from rfpn.recurrent import RecurrentDynamics

__all__ = ["BackwardCapHook", "PenaltyWeightSyncHook", "find_dynamics", "sync_penalty_weights"]

logger = logging.getLogger(__name__)


def find_dynamics(model: torch.nn.Module) -> dict[str, RecurrentDynamics]:
    """Every ``RecurrentDynamics`` inside ``model`` (DDP wrappers included), by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RecurrentDynamics)}


class BackwardCapHook(HookBase):
    """Count the implicit backward solves that ended on a safeguard, in the event storage.

    An RBP / C-RBP backward stops its Neumann series (or Anderson solve) early when the running
    sum would pass ``MODEL.RECURRENT.NEUMANN_NORM_CAP`` times the incoming gradient, or turns
    non-finite; the gradient is then truncated. Each ``RecurrentDynamics`` counts those events in
    ``backward_stats.cap_hits``. After every step this hook writes the total over all dynamics
    modules as ``recurrent/neumann_cap_hits_total`` and logs a warning naming the iteration, the
    module and the stop reason whenever the count grows. The total is checkpointed, so it keeps
    counting across ``--resume``. In multi-process runs it counts this process's solves.
    """

    def __init__(self) -> None:
        self._dynamics: dict[str, RecurrentDynamics] = {}
        self._start: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        self._offset = 0  # cap hits of earlier runs, restored from a checkpoint

    def before_train(self) -> None:
        self._dynamics = find_dynamics(self.trainer.model)
        self._start = {name: dyn.backward_stats.cap_hits for name, dyn in self._dynamics.items()}
        self._seen = dict(self._start)

    def after_step(self) -> None:
        if not self._dynamics:
            return
        for name, dyn in self._dynamics.items():
            stats = dyn.backward_stats
            if stats.cap_hits > self._seen[name]:
                logger.warning(
                    f"Iteration {self.trainer.iter}: the {stats.solver} backward of {name or 'the model'} stopped on a "
                    f"safeguard ({stats.stop_reason} after {stats.terms} terms), so its gradient is truncated. Frequent "
                    "hits mean the dynamics are not contractive: raise MODEL.RECURRENT.LCP_WEIGHT or lower the "
                    "learning rate."
                )
                self._seen[name] = stats.cap_hits
        self.trainer.storage.put_scalar("recurrent/neumann_cap_hits_total", self.total(), smoothing_hint=False)

    def total(self) -> int:
        """Cap hits counted so far, those of the run a training resumed from included."""
        return self._offset + sum(self._seen.values()) - sum(self._start.values())

    def state_dict(self) -> dict:
        return {"cap_hits": self.total()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._offset = int(state_dict.get("cap_hits", 0))


def sync_penalty_weights(dynamics: list[RecurrentDynamics]) -> None:
    """Set every rank's automatic penalty weights to their maximum over the ranks (a collective).

    Each rank adapts its weight to the constraint measured on its own batch; taking the largest
    keeps the ranks identical and the constraint held on all of them. No-op in one process.
    """
    if comm.get_world_size() == 1 or not dynamics:
        return
    weights = torch.stack([d.auto_penalty_weight for d in dynamics])
    dist.all_reduce(weights, op=dist.ReduceOp.MAX)
    for d, w in zip(dynamics, weights):
        d.auto_penalty_weight.copy_(w)


class PenaltyWeightSyncHook(HookBase):
    """After every step, :func:`sync_penalty_weights` over the model's dynamics with ``LCP_WEIGHT_AUTO``."""

    def before_train(self) -> None:
        self._dynamics = [d for d in find_dynamics(self.trainer.model).values() if d.penalty_options.auto]

    def after_step(self) -> None:
        sync_penalty_weights(self._dynamics)

"""A training hook that writes the stability of every recurrent core to the event storage.

Every ``DIAGNOSTICS.PERIOD`` iterations, for each :class:`~rfpn.recurrent.RecurrentDynamics`
in the model (the Pathfinder core, the R-FPN mask head's hGRU, ...), it takes the drive that
module saw in that iteration (at most ``DIAGNOSTICS.MAX_SAMPLES`` samples), runs the
dynamics to the state C-RBP takes its gradient at, and writes under
``diagnostics/<module name>/``: ``spectral_norm`` (power-iteration ``||dF/dh||_2``; below 1 means
locally contractive), ``lcp`` (the Lipschitz penalty's value there), ``max_column_sum`` of
``1^T J``, ``relative_residual`` (``|h_N - h_{N-1}| / |h_N|``: how far from a fixed point), and,
for the implicit methods (``rbp``/``crbp``), ``neumann_terms`` and ``neumann_cap_hits`` of the iteration's backward.
TensorBoard shows them through Detectron2's usual writers. The numbers describe the weights
after the iteration's optimizer step on that iteration's drive.
"""
from __future__ import annotations

import logging
import time

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.utils import comm

from rfpn.config import validate_diagnostics_config
from rfpn.recurrent import RecurrentDynamics
from rfpn.recurrent.diagnostics import fixed_point_diagnostics

__all__ = ["RecurrentDiagnosticsHook", "build_diagnostics_hook"]


class RecurrentDiagnosticsHook(HookBase):
    """Write stability diagnostics of every ``RecurrentDynamics`` module every ``period`` iterations."""

    def __init__(self, period: int, power_iters: int = 20, max_samples: int = 4):
        if period < 1 or power_iters < 1 or max_samples < 0:
            raise ValueError(
                f"period and power_iters must be >= 1 and max_samples >= 0 (0: whole batch); got "
                f"{period}, {power_iters}, {max_samples}."
            )
        self.period = period
        self.power_iters = power_iters
        self.max_samples = max_samples
        self._armed = False
        self._drives: dict[str, torch.Tensor] = {}
        self._modules: dict[str, RecurrentDynamics] = {}
        self._handles: list = []

    def before_train(self) -> None:
        model = self.trainer.model
        for name, module in model.named_modules():
            if isinstance(module, RecurrentDynamics):
                key = name.removeprefix("module.") or "dynamics"
                self._modules[key] = module
                self._handles.append(module.register_forward_pre_hook(self._capture(key)))
        if not self._modules:
            logging.getLogger(__name__).warning(
                "RecurrentDiagnosticsHook: the model has no RecurrentDynamics module; nothing to diagnose."
            )

    def _capture(self, key: str):
        def hook(module, args):
            if self._armed and args:
                drive = args[0].detach()
                self._drives[key] = drive[: self.max_samples] if self.max_samples else drive

        return hook

    def before_step(self) -> None:
        self._armed = comm.is_main_process() and (self.trainer.iter + 1) % self.period == 0

    def after_step(self) -> None:
        if not self._armed:
            return
        self._armed = False
        storage = self.trainer.storage
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(self.trainer.iter)
        for key, drive in self._drives.items():
            dyn = self._modules[key]
            if drive.shape[0] == 0:
                continue
            diag = fixed_point_diagnostics(dyn, drive, power_iters=self.power_iters, generator=gen)
            scalars = {
                f"diagnostics/{key}/{name}": diag[name]
                for name in ("spectral_norm", "lcp", "max_column_sum", "relative_residual")
            }
            if dyn.method.implicit:
                scalars[f"diagnostics/{key}/neumann_terms"] = dyn.backward_stats.terms
                scalars[f"diagnostics/{key}/neumann_cap_hits"] = dyn.backward_stats.cap_hits
            storage.put_scalars(**scalars, smoothing_hint=False)
        self._drives.clear()
        storage.put_scalar("diagnostics/time", time.perf_counter() - start, smoothing_hint=False)

    def after_train(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def build_diagnostics_hook(cfg: CfgNode) -> RecurrentDiagnosticsHook | None:
    """The hook configured by ``DIAGNOSTICS.*``, or None when ``DIAGNOSTICS.PERIOD`` is 0."""
    validate_diagnostics_config(cfg)
    d = cfg.DIAGNOSTICS
    if d.PERIOD == 0:
        return None
    return RecurrentDiagnosticsHook(d.PERIOD, d.POWER_ITERS, d.MAX_SAMPLES)

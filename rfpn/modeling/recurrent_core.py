"""Build the shared recurrent core (cell + dynamics) from ``cfg.MODEL.RECURRENT``."""
from __future__ import annotations

from typing import Any

import torch

from detectron2.config import CfgNode
from detectron2.utils.events import get_event_storage

from rfpn.config import recurrent_settings, validate_recurrent_config
from rfpn.recurrent import AdditiveCouplingCell, ConvLSTMCell, HGRUCell, RecurrentDynamics, StateMomentumCell


def uses_state_momentum(rc: CfgNode) -> bool:
    """Whether ``MODEL.RECURRENT`` wraps the cell with state momentum (``MOMENTUM > 0`` or ``MOMENTUM_STEP < 1``)."""
    return rc.MOMENTUM > 0 or rc.MOMENTUM_STEP < 1


def build_recurrent_dynamics(cfg: CfgNode, channels: int | None = None) -> RecurrentDynamics:
    """Cell and dynamics as configured; ``channels`` overrides ``MODEL.RECURRENT.CHANNELS``."""
    validate_recurrent_config(cfg)
    settings = recurrent_settings(cfg)
    rc = cfg.MODEL.RECURRENT
    channels = channels or rc.CHANNELS

    def make_cell(width: int) -> torch.nn.Module:
        if rc.CELL == "hgru":
            return HGRUCell(width, rc.KERNEL_SIZE, norm=rc.NORM, timesteps=rc.STEPS, gate=rc.GATE)
        return ConvLSTMCell(width, rc.KERNEL_SIZE)

    if settings.backward.coupling == "additive" and settings.grad.endswith("reversible"):
        cell = AdditiveCouplingCell(make_cell, channels)
    else:
        cell = make_cell(channels)
    if uses_state_momentum(rc):
        cell = StateMomentumCell(cell, rc.MOMENTUM, rc.MOMENTUM_STEP)
    return RecurrentDynamics(
        cell,
        steps=settings.steps,
        grad=settings.grad,
        forward_options=settings.forward,
        backward_options=settings.backward,
        penalty_options=settings.penalty,
    )


def penalty_losses(dynamics: RecurrentDynamics, aux: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"loss_lcp" or "loss_jacobian": weight * penalty}`` for a dynamics with a penalty, else ``{}``."""
    if not dynamics.uses_penalty:
        return {}
    return {f"loss_{dynamics.penalty_kind}": aux["penalty_weight"] * aux["penalty"]}


def log_recurrent_stats(aux: dict[str, Any], prefix: str, dynamics: RecurrentDynamics) -> None:
    """Write a training step's fixed-point statistics to the active EventStorage (no-op without one).

    ``<prefix>/steps`` (cell evaluations), ``residual`` (mean |h_N - h_{N-1}|),
    ``relative_residual`` (|h_N - h_{N-1}| / |h_N|); with a penalty, ``<kind>_penalty`` and
    ``penalty_weight`` (xi, adapted with ``LCP_WEIGHT_AUTO``); with the LCP, ``max_column_sum``
    (the constraint value ``max 1^T J``); for implicit methods, the terms and cap hits of the most
    recent implicit backward (the previous iteration's).
    """
    try:
        storage = get_event_storage()
    except AssertionError:
        return
    scalars = {"steps": aux["steps"], "residual": aux["residual"]}
    if dynamics.uses_penalty:
        scalars[f"{dynamics.penalty_kind}_penalty"] = float(aux["penalty"].detach())
        scalars["penalty_weight"] = aux["penalty_weight"]
    if dynamics.uses_lcp and aux.get("max_column_sum") is not None:
        scalars["max_column_sum"] = aux["max_column_sum"]
    if "relative_residual" in aux:
        scalars["relative_residual"] = aux["relative_residual"]
    if dynamics.method.implicit:
        stats = dynamics.backward_stats
        scalars.update(neumann_terms=stats.terms, neumann_cap_hits=stats.cap_hits)
    storage.put_scalars(**{f"{prefix}/{k}": v for k, v in scalars.items()}, smoothing_hint=False)


def penalty_weight_history(storage, prefix: str, iters: int, points: int = 300) -> dict[str, Any]:
    """What :func:`log_recurrent_stats` wrote of the LCP's constraint and weight, summarised.

    For ``max_column_sum`` and ``penalty_weight`` under ``<prefix>/``: the mean and max over the last
    20% of ``iters`` training iterations (``<key>_last20pct_mean``, ``<key>_last20pct_max``) and
    ``curves[key]``, at most ``points`` ``(iteration, value)`` pairs. Empty when the run had no LCP.
    """
    tail = max(1, iters // 5)
    out: dict[str, Any] = {}
    for key in ("max_column_sum", "penalty_weight"):
        name = f"{prefix}/{key}"
        if name not in storage.histories():
            continue
        values = [(int(it), float(v)) for v, it in storage.history(name).values()]
        last = [v for _, v in values[-tail:]]
        out[f"{key}_last20pct_mean"] = sum(last) / len(last)
        out[f"{key}_last20pct_max"] = max(last)
        out.setdefault("curves", {})[key] = values[:: max(1, len(values) // points)]
    return out

"""Build the shared recurrent core (cell + dynamics) from ``cfg.MODEL.RECURRENT``."""
from __future__ import annotations

from typing import Any

from detectron2.config import CfgNode
from detectron2.utils.events import get_event_storage

from rfpn.config import validate_recurrent_config
from rfpn.recurrent import ConvLSTMCell, HGRUCell, RecurrentDynamics


def build_recurrent_dynamics(cfg: CfgNode, channels: int | None = None) -> RecurrentDynamics:
    """Cell and dynamics as configured; ``channels`` overrides ``MODEL.RECURRENT.CHANNELS``."""
    validate_recurrent_config(cfg)
    rc = cfg.MODEL.RECURRENT
    channels = channels or rc.CHANNELS
    if rc.CELL == "hgru":
        cell = HGRUCell(channels, rc.KERNEL_SIZE, norm=rc.NORM, timesteps=rc.STEPS, gate=rc.GATE)
    else:
        cell = ConvLSTMCell(channels, rc.KERNEL_SIZE)
    return RecurrentDynamics(
        cell,
        steps=rc.STEPS,
        grad=rc.GRAD,
        neumann_steps=rc.NEUMANN_STEPS,
        lcp_lambda=rc.LCP_LAMBDA,
        test_steps=rc.TEST_STEPS or None,
        eps=rc.EPS,
        neumann_norm_cap=rc.NEUMANN_NORM_CAP,
        neumann_tol=rc.NEUMANN_TOL,
        solver=rc.SOLVER,
        test_solver=rc.TEST_SOLVER or None,
        tol=rc.TOL,
        max_steps=rc.MAX_STEPS,
        anderson_m=rc.ANDERSON_M,
        backward_solver=rc.BACKWARD_SOLVER,
        backward_tol=rc.BACKWARD_TOL,
        backward_max_steps=rc.BACKWARD_MAX_STEPS,
    )


def log_recurrent_stats(aux: dict[str, Any], prefix: str, grad: str) -> None:
    """Write a training step's fixed-point statistics to the active EventStorage (no-op without one).

    ``<prefix>/steps`` (cell evaluations), ``residual`` (mean |h_N - h_{N-1}|),
    ``relative_residual`` (|h_N - h_{N-1}| / |h_N|), ``lcp_penalty`` for cbptt/crbp and, for
    rbp/crbp, the terms and cap hits of the most recent implicit backward (the previous iteration's).
    """
    try:
        storage = get_event_storage()
    except AssertionError:
        return
    scalars = {"steps": aux["steps"], "residual": aux["residual"]}
    if grad in ("cbptt", "crbp"):
        scalars["lcp_penalty"] = float(aux["penalty"].detach())
    if "relative_residual" in aux:
        scalars["relative_residual"] = aux["relative_residual"]
    stats = aux.get("neumann_stats")
    if stats is not None and grad in ("rbp", "crbp"):
        scalars.update(neumann_terms=stats.terms, neumann_cap_hits=stats.cap_hits)
    storage.put_scalars(**{f"{prefix}/{k}": v for k, v in scalars.items()}, smoothing_hint=False)

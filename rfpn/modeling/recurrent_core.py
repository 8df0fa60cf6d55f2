"""Build the shared recurrent core (cell + dynamics) from ``cfg.MODEL.RECURRENT``."""
from __future__ import annotations

from detectron2.config import CfgNode

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
        tol=rc.TOL,
        max_steps=rc.MAX_STEPS,
        anderson_m=rc.ANDERSON_M,
        backward_solver=rc.BACKWARD_SOLVER,
        backward_tol=rc.BACKWARD_TOL,
        backward_max_steps=rc.BACKWARD_MAX_STEPS,
    )

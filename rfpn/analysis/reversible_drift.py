"""How exact are reversible recurrences in float32? Reconstruction drift and gradient agreement with BPTT.

A reversible backward rebuilds every state with the inverse step. In float32 the rebuilt states
drift from the forward ones (the momentum inverse divides by ``gamma`` each step; the additive
one only adds rounding), and the gradient drifts with them. :func:`drift_report` measures both
on a randomly initialised hGRU at Pathfinder-like shapes: the reconstruction error after
``k`` inversions, and the cosine between the reversible gradient and BPTT's through the same
coupled dynamics (float and exact mode), at several step counts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rfpn.recurrent import AdditiveCouplingCell, HGRUCell, MomentumCoupling, RecurrentDynamics, StateMomentumCell
from rfpn.recurrent.reversible import reconstruction_error

__all__ = ["DriftSettings", "drift_report", "gradient_cosine", "reconstruction_curve"]


@dataclass
class DriftSettings:
    """Shapes of the probe (the CPU Pathfinder hGRU by default)."""

    channels: int = 8
    kernel: int = 7
    size: int = 32
    batch: int = 2
    seed: int = 0


def _cell(settings: DriftSettings, coupling: str) -> nn.Module:
    def make(width: int) -> nn.Module:
        return HGRUCell(width, settings.kernel, norm="gn")

    torch.manual_seed(settings.seed)
    return AdditiveCouplingCell(make, settings.channels) if coupling == "additive" else make(settings.channels)


def _drive(settings: DriftSettings) -> torch.Tensor:
    gen = torch.Generator().manual_seed(settings.seed + 1)
    return torch.rand(settings.batch, settings.channels, settings.size, settings.size, generator=gen)


def reconstruction_curve(settings: DriftSettings, coupling: str, steps: int, gamma: float = 0.9) -> list[float]:
    """Float32 reconstruction error after ``k = 1..steps`` inversions (see ``reconstruction_error``)."""
    cell, x = _cell(settings, coupling), _drive(settings)
    if coupling == "additive":
        a0 = cell.init_state(x)
        return reconstruction_error(cell, x, *cell.split(a0), steps)
    h0 = cell.init_state(x)
    return reconstruction_error(MomentumCoupling(cell, gamma), x, h0, torch.zeros_like(h0), steps)


def _flat_grad(dynamics: RecurrentDynamics, x: torch.Tensor, weight: torch.Tensor, params: list) -> torch.Tensor:
    x = x.clone().requires_grad_()
    h, _ = dynamics.train()(x)
    grads = torch.autograd.grad((h * weight).sum(), [x, *params], allow_unused=True)
    return torch.cat([g.flatten() for g in grads if g is not None])


def gradient_cosine(settings: DriftSettings, coupling: str, steps: int, gamma: float = 0.9, exact: bool = False) -> float:
    """Cosine between the reversible gradient and BPTT's through the same coupled dynamics (float32)."""
    cell, x = _cell(settings, coupling), _drive(settings)
    weight = torch.randn(x.shape[0], x.shape[1], *x.shape[2:], generator=torch.Generator().manual_seed(settings.seed + 2))
    reversible = RecurrentDynamics(cell, steps, grad="reversible", coupling=coupling, reversible_gamma=gamma,
                                   reversible_exact=exact)
    coupled = cell if coupling == "additive" else StateMomentumCell(cell, reversible.cell.mu, reversible.cell.s)
    params = [p for p in cell.parameters() if p.requires_grad]
    g_rev = _flat_grad(reversible, x, weight, params)
    g_bptt = _flat_grad(RecurrentDynamics(coupled, steps, grad="bptt"), x, weight, params)
    return float(torch.nn.functional.cosine_similarity(g_rev.double(), g_bptt.double(), dim=0))


def drift_report(settings: DriftSettings, steps: int = 80, cosine_steps: tuple[int, ...] = (20, 80),
                 gammas: tuple[float, ...] = (0.9, 0.8, 0.5)) -> dict[str, Any]:
    """Reconstruction curves (momentum at each ``gamma``, additive) and gradient cosines with BPTT."""
    curves = {f"momentum gamma={g}": reconstruction_curve(settings, "momentum", steps, g) for g in gammas}
    curves["additive"] = reconstruction_curve(settings, "additive", steps)
    cosines = []
    probes = [("momentum", g) for g in gammas] + [("additive", None)]
    for coupling, gamma in probes:
        for exact in (False, True):
            for n in cosine_steps:
                cosine = gradient_cosine(settings, coupling, n, gamma or 0.9, exact)
                cosines.append({"coupling": coupling, "gamma": gamma, "exact": exact, "steps": n, "cosine": cosine,
                                "one_minus_cosine": 1.0 - cosine})
    return {"settings": asdict(settings), "steps": steps, "reconstruction_error": curves, "gradient_cosine": cosines}


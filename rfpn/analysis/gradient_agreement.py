"""How close each gradient method's gradient is to the exact implicit gradient, on one batch.

The reference is the implicit-function-theorem gradient taken where it is exact: the forward
pass solved to a tight tolerance (Anderson, relative residual 1e-6) and the backward linear
system ``(I - J^T) u = g`` solved to 1e-10. Each method then runs with the forward solver the
model was trained with, on the same cell, drive and loss, and is compared on the gradient of the
cell's parameters (where the methods differ): cosine and relative error. Pure PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from rfpn.recurrent import BackwardOptions, PenaltyOptions, RecurrentDynamics

__all__ = ["REFERENCE_FORWARD", "REFERENCE_BACKWARD", "GradientAgreement", "method_gradient", "gradient_agreement"]

REFERENCE_FORWARD = {"solver": "anderson", "tol": 1e-6, "max_steps": 300}
REFERENCE_BACKWARD = {"solver": "anderson", "tol": 1e-10, "max_steps": 500}
LossFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GradientAgreement:
    """One method's cell-parameter gradient against the reference: cosine, relative error, steps run."""

    method: str
    cosine: float
    relative_error: float
    steps: int


def method_gradient(
    dynamics: RecurrentDynamics, grad: str, x: torch.Tensor, loss_fn: LossFn, forward=None, backward=None
) -> tuple[torch.Tensor, dict]:
    """Flattened gradient of ``loss_fn(readout)`` w.r.t. the cell's parameters under method ``grad``.

    ``dynamics`` supplies the cell and its option groups; ``forward``/``backward`` override fields
    (dicts). No penalty: only the task gradient is compared. ``bptt`` runs plain iteration with the
    model's tolerance and cap when the model solves with Anderson (which BPTT cannot traverse).
    """
    fwd = replace(dynamics.forward_options, **(forward or {}))
    if grad == "bptt" and fwd.solver == "anderson":
        fwd = replace(fwd, solver="iterate")
    bwd: BackwardOptions = replace(dynamics.backward_options, **(backward or {}))
    probe = RecurrentDynamics(
        dynamics.cell, dynamics.steps, grad, forward_options=fwd, backward_options=bwd,
        penalty_options=PenaltyOptions(kind="none"),
    ).train()
    params = [p for p in dynamics.cell.parameters() if p.requires_grad]
    with torch.enable_grad():
        out, aux = probe(x.detach())
        grads = torch.autograd.grad(loss_fn(out), params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return flat.double(), aux


def gradient_agreement(
    dynamics: RecurrentDynamics, x: torch.Tensor, loss_fn: LossFn, methods: Sequence[str] = ("bptt", "rbp", "jfb", "phantom")
) -> tuple[list[GradientAgreement], dict]:
    """Compare ``methods`` with the exact implicit gradient; returns the rows and the reference's solve info."""
    reference, ref_aux = method_gradient(dynamics, "rbp", x, loss_fn, REFERENCE_FORWARD, REFERENCE_BACKWARD)
    stats = ref_aux["backward_stats"]
    info = {
        "steps": ref_aux["steps"],
        "forward_stop": ref_aux["solver_stop"],
        "relative_residual": ref_aux["relative_residual"],
        "backward_stop": stats.stop_reason,
        "backward_residual": stats.residual,
        "forward": REFERENCE_FORWARD,
        "backward": REFERENCE_BACKWARD,
    }
    rows = []
    for grad in methods:
        g, aux = method_gradient(dynamics, grad, x, loss_fn)
        cosine = float(torch.dot(g, reference) / (g.norm() * reference.norm()).clamp_min(1e-300))
        rel = float((g - reference).norm() / reference.norm().clamp_min(1e-300))
        rows.append(GradientAgreement(grad, cosine, rel, int(aux["steps"])))
    return rows, info

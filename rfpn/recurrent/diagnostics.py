"""Stability diagnostics of a recurrent map at a state: Jacobian spectral norm, LCP, residual.

C-RBP's gradient is only right when ``F`` contracts near its fixed point, i.e. when the
Jacobian ``J = dF/dh`` there has spectral norm below 1. :func:`jacobian_spectral_norm`
estimates ``||J||_2`` by power iteration on ``J^T J`` without forming ``J``: each iteration
is one Jacobian-vector product (JVP) and one vector-Jacobian product (VJP). The JVP is
taken with the double-backward trick (``J v = d/dw <J^T w, v>``), which needs only what the
LCP already needs (twice-differentiable cells), so it works for every cell in this package.
:func:`fixed_point_diagnostics` runs :class:`~rfpn.recurrent.RecurrentDynamics` and reports
these numbers at the last state it reached. Pure PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .penalty import column_sums
from .solvers import relative_residual

__all__ = ["SpectralNormEstimate", "jacobian_spectral_norm", "fixed_point_diagnostics", "capture_last_step"]


@dataclass
class SpectralNormEstimate:
    """Result of :func:`jacobian_spectral_norm`.

    ``value``: the estimate of ``||J||_2`` over the whole batch map; ``per_sample``: one
    estimate per sample (exact block norms only when samples do not interact, e.g. no
    batch-statistics norm in the cell); ``iterations`` run; ``converged``: the relative
    change of ``value`` fell below ``tol``.
    """

    value: float
    per_sample: torch.Tensor
    iterations: int
    converged: bool


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def jacobian_spectral_norm(
    f: Callable[[torch.Tensor], torch.Tensor],
    h: torch.Tensor,
    iters: int = 30,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> SpectralNormEstimate:
    """Power-iteration estimate of the spectral norm of ``J = df/dh`` at ``h``.

    ``f`` maps a state to a tensor of the same shape (e.g. ``lambda s: cell(x, s)``). Each
    sample's slice of the iterate is normalised on its own, so for maps that act on samples
    independently the per-sample estimates converge to each sample's block norm and ``value``
    (the max of the per-sample estimates, the norm of a block-diagonal ``J``) to ``||J||_2``.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1; got {iters}.")
    if h.dim() < 2:
        raise ValueError(f"h must have a batch dimension, shape (B, ...); got shape {tuple(h.shape)}.")
    with torch.enable_grad():
        h_in = h.detach().requires_grad_()
        out = f(h_in)
        if out.shape != h_in.shape:
            raise ValueError(
                f"f must map a state to a tensor of the same shape; got {tuple(out.shape)} from {tuple(h_in.shape)}."
            )
        w = torch.zeros_like(out, requires_grad=True)
        (jt_w,) = torch.autograd.grad(out, h_in, w, create_graph=True)  # J^T w, linear in w

        def jvp(v: torch.Tensor) -> torch.Tensor:
            (jv,) = torch.autograd.grad(jt_w, w, v, retain_graph=True)
            return jv

        def vjp(u: torch.Tensor) -> torch.Tensor:
            (ju,) = torch.autograd.grad(out, h_in, u, retain_graph=True)
            return ju

        v = torch.randn(h.shape, generator=generator, dtype=h.dtype).to(h.device)
        v = v / _per_sample_norm(v).clamp_min(1e-12)
        sigma = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        converged = False
        it = 0
        for it in range(1, iters + 1):
            jtjv = vjp(jvp(v))
            # ||J^T J v|| -> sigma^2 for the top singular vector v.
            norms = _per_sample_norm(jtjv)
            new_sigma = norms.flatten().sqrt()
            v = jtjv / norms.clamp_min(1e-30)
            change = float(((new_sigma - sigma).abs() / new_sigma.clamp_min(1e-30)).max())
            sigma = new_sigma.detach()
            if change < tol:
                converged = True
                break
        # Rayleigh quotient ||J v|| with the final unit vector: a lower bound that is exact at convergence.
        sigma = _per_sample_norm(jvp(v)).flatten().detach()
    return SpectralNormEstimate(value=float(sigma.max()), per_sample=sigma, iterations=it, converged=converged)


class capture_last_step:
    """Context manager recording the drive and input state of a cell's most recent call.

    Used to get the state a :class:`~rfpn.recurrent.RecurrentDynamics` run ended at (the full
    cell state, not only its readout) without re-implementing the step loop.
    """

    def __init__(self, cell: nn.Module):
        self.cell = cell
        self.drive: torch.Tensor | None = None
        self.state: torch.Tensor | None = None
        self.image: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args, output) -> None:
        self.drive, self.state = args[0].detach(), args[1].detach()
        self.image = output.detach()

    def __enter__(self) -> "capture_last_step":
        self._handle = self.cell.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@torch.no_grad()
def fixed_point_diagnostics(
    dynamics: nn.Module,
    x: torch.Tensor,
    steps: int | None = None,
    power_iters: int = 30,
    power_tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run ``dynamics`` on drive ``x`` without a graph and describe the map at the last state.

    ``steps`` defaults to the training step count for the fixed solver (the state C-RBP takes
    its gradient at) and to the solver's cap otherwise. Returns floats: ``spectral_norm``
    (power-iteration ``||J||_2``), ``lcp`` (the LCP value ``mean relu(1^T J - lambda)^2``),
    ``max_column_sum`` and ``mean_column_sum`` of ``1^T J``, ``residual`` (mean ``|h_N - h_{N-1}|``),
    ``relative_residual`` and ``steps``. Module modes are left untouched.
    """
    if steps is None:
        steps = dynamics.steps if dynamics.solver == "fixed" else None
    with capture_last_step(dynamics.cell) as cap:
        _, aux = dynamics(x, steps=steps, eps=0.0)
    h_in, drive = cap.state, cap.drive

    def step(s: torch.Tensor) -> torch.Tensor:
        return dynamics.cell(drive, s)

    with torch.enable_grad():
        h_req = h_in.detach().requires_grad_()
        out = step(h_req)
        sums = column_sums(out, h_req, create_graph=False).detach()
    lam = float(dynamics.lcp_lambda)
    spectral = jacobian_spectral_norm(step, h_in, power_iters, power_tol, generator)
    return {
        "spectral_norm": spectral.value,
        "spectral_norm_converged": float(spectral.converged),
        "lcp": float((sums - lam).clamp_min(0).pow(2).mean()),
        "max_column_sum": float(sums.max()),
        "mean_column_sum": float(sums.mean()),
        "residual": float((out.detach() - h_in).abs().mean()),
        "relative_residual": float(relative_residual(out.detach(), h_in).mean()),
        "steps": float(aux["steps"]),
    }

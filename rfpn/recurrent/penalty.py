"""Stability penalties on the recorded step ``f_out = F(x, h_in)``, and their automatic weight.

- The Lipschitz Coefficient Penalty (LCP, paper Eq. 6): ``v = 1^T J`` with ``J = dF/dh`` is
  one vector-Jacobian product with a ones vector; its entry ``i`` is the sum of column ``i`` of
  the Jacobian, an estimate that bounds how much the map can stretch a perturbation of state
  element ``i``. The penalty rectifies the excess over ``lambda`` and squares it.
- The Jacobian regulariser (as in torchdeq and the DEQ papers): a Hutchinson estimate of
  ``||J||_F^2`` from Gaussian probes ``e``, ``E ||e^T J||^2 = ||J||_F^2``.

Both VJPs are built with ``create_graph=True`` so minimising the penalty trains the weights
(double backward). Both are normalised by the number of state elements, so the weight does
not depend on image size or batch.

Automatic weight (:func:`dual_ascent_step`): the LCP's purpose is the constraint
``max_i (1^T J)_i <= lambda``. Treating the weight as its Lagrange multiplier, dual ascent
raises it while the constraint is violated and lowers it while it holds. The step is taken
on ``log(weight)`` and scaled by the distance to non-expansiveness ``1 - lambda``, so the
same rate works whatever the scale of the task loss (the hand-set weights of the paper's
tasks differ by four orders of magnitude).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUTO_WEIGHT_BOUNDS = (1e-6, 1e6)


def column_sums(f_out: torch.Tensor, h_in: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """``1^T J`` where ``J = d f_out / d h_in``; same shape as ``h_in``."""
    if not h_in.requires_grad:
        raise ValueError("column_sums needs h_in to require grad (it is the input of the recurrent step).")
    (v,) = torch.autograd.grad(f_out, h_in, torch.ones_like(f_out), create_graph=create_graph, retain_graph=True)
    return v


def lcp_from_column_sums(sums: torch.Tensor, lam: float) -> torch.Tensor:
    """Mean over state elements of ``relu(sums - lam)^2``."""
    return F.relu(sums - lam).pow(2).mean()


def lcp_penalty(f_out: torch.Tensor, h_in: torch.Tensor, lam: float = 0.9) -> torch.Tensor:
    """Mean over state elements of ``relu(1^T J - lam)^2``.

    This is ``||(1^T J - lam)^+||_2^2`` divided by the number of state elements. Zero when
    every column sum is below ``lam``; differentiable with respect to the parameters of the
    step that made ``f_out`` from ``h_in``.
    """
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lcp lambda must lie in [0, 1); got {lam}.")
    return lcp_from_column_sums(column_sums(f_out, h_in), lam)


def jacobian_frobenius_penalty(
    f_out: torch.Tensor,
    h_in: torch.Tensor,
    probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> torch.Tensor:
    """Hutchinson estimate of ``||J||_F^2`` divided by the number of state elements.

    Each probe ``e ~ N(0, I)`` costs one VJP; ``||e^T J||^2`` is unbiased for ``||J||_F^2``
    and the mean over ``probes`` has variance falling as ``1 / probes``.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1; got {probes}.")
    if not h_in.requires_grad:
        raise ValueError("jacobian_frobenius_penalty needs h_in to require grad.")
    total = f_out.new_zeros(())
    for _ in range(probes):
        e = (
            torch.randn_like(f_out)
            if generator is None
            else torch.randn(f_out.shape, generator=generator, dtype=f_out.dtype, device=generator.device).to(f_out.device)
        )
        (ej,) = torch.autograd.grad(f_out, h_in, e, create_graph=create_graph, retain_graph=True)
        total = total + ej.pow(2).sum()
    return total / (probes * h_in.numel())


def dual_ascent_step(weight: float, max_column_sum: float, lam: float, rate: float) -> float:
    """The next multiplier: ``log w += rate * clamp((max_column_sum - lam) / (1 - lam), -1, 1)``.

    Grows while ``max_column_sum > lam`` (at most by ``exp(rate)`` per step), shrinks toward 0
    while it holds, and stays within :data:`AUTO_WEIGHT_BOUNDS` so it can recover either way.
    """
    if not math.isfinite(max_column_sum):
        return weight
    excess = max(-1.0, min(1.0, (max_column_sum - lam) / (1.0 - lam)))
    low, high = AUTO_WEIGHT_BOUNDS
    return min(high, max(low, max(weight, low) * math.exp(rate * excess)))

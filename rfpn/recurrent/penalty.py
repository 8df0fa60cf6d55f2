"""The Lipschitz Coefficient Penalty (LCP, paper Eq. 6).

``v = 1^T J`` with ``J = dF/dh`` is one vector-Jacobian product with a ones vector: its
entry ``i`` is the sum of column ``i`` of the Jacobian, an estimate that bounds how much
the map can stretch a perturbation of state element ``i``. The penalty rectifies the
excess over ``lambda`` and squares it. The VJP is built with ``create_graph=True`` so
minimising the penalty trains the weights (double backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def column_sums(f_out: torch.Tensor, h_in: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """``1^T J`` where ``J = d f_out / d h_in``; same shape as ``h_in``."""
    if not h_in.requires_grad:
        raise ValueError("column_sums needs h_in to require grad (it is the input of the recurrent step).")
    (v,) = torch.autograd.grad(f_out, h_in, torch.ones_like(f_out), create_graph=create_graph, retain_graph=True)
    return v


def lcp_penalty(f_out: torch.Tensor, h_in: torch.Tensor, lam: float = 0.9) -> torch.Tensor:
    """Mean over state elements of ``relu(1^T J - lam)^2``.

    This is ``||(1^T J - lam)^+||_2^2`` divided by the number of state elements, so the
    penalty weight does not depend on image size or batch. Zero when every column sum is
    below ``lam``; differentiable with respect to the parameters of the step that made
    ``f_out`` from ``h_in``.
    """
    if not 0.0 <= lam < 1.0:
        raise ValueError(f"lcp lambda must lie in [0, 1); got {lam}.")
    return F.relu(column_sums(f_out, h_in) - lam).pow(2).mean()

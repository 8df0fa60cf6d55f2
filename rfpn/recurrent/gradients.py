"""Implicit (recurrent back-propagation) gradients at a fixed point.

At a fixed point ``h* = F(x, h*)`` the implicit function theorem gives the gradient of a
loss through the whole trajectory as ``(I - J)^-T g`` pushed through one step of F,
``J = dF/dh`` at ``h*``. RBP approximates ``(I - J^T)^-1 g`` by the truncated Neumann series
``sum_k (J^T)^k g``; each term costs one vector-Jacobian product through the single step
kept in the graph, so memory does not depend on how many steps the forward pass ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VJP = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class NeumannStats:
    """What the last backward solve did: terms used and why it stopped."""

    terms: int = 0
    stop_reason: str = "max_terms"
    cap_hits: int = 0


def neumann_solve(vjp: VJP, g: torch.Tensor, max_terms: int, norm_cap: float = 100.0, tol: float = 0.0):
    """Sum ``g + J^T g + (J^T)^2 g + ...`` for at most ``max_terms`` extra terms.

    Stops early, returning the sum so far, when a term is no larger than ``tol * |g|``
    (converged), when a term is larger than the one before (the series no longer shrinks:
    adding it would diverge), or when the running sum's norm would pass ``norm_cap * |g|``.
    Returns ``(u, terms, reason)``.
    """
    g_norm = g.norm()
    u = g.clone()
    term = g
    prev_norm = g_norm
    for k in range(1, max_terms + 1):
        term = vjp(term)
        term_norm = term.norm()
        if not torch.isfinite(term_norm):
            return u, k - 1, "non_finite"
        if term_norm > prev_norm:
            return u, k - 1, "not_shrinking"
        candidate = u + term
        if candidate.norm() > norm_cap * g_norm:
            return u, k - 1, "norm_cap"
        u = candidate
        if term_norm <= tol * g_norm:
            return u, k, "converged"
        prev_norm = term_norm
    return u, max_terms, "max_terms"


def attach_implicit_backward(
    h_out: torch.Tensor,
    h_in: torch.Tensor,
    max_terms: int,
    norm_cap: float = 100.0,
    tol: float = 0.0,
    stats: NeumannStats | None = None,
) -> torch.Tensor:
    """Make back-propagation through ``h_out = F(x, h_in)`` use the implicit gradient.

    ``h_in`` must be a detached leaf that requires grad (the state before the last step).
    Returns an alias of ``h_out`` for the task to consume: a hook on it replaces the
    gradient ``g`` it receives with ``u ~ (I - J^T)^-1 g``, and autograd then carries ``u``
    through the one recorded step into parameters and drive. The alias keeps gradients
    that reach ``h_out`` by other routes (the LCP's double backward) untouched.
    """
    if not (h_in.is_leaf and h_in.requires_grad):
        raise ValueError("attach_implicit_backward needs h_in to be a detached leaf that requires grad.")
    stats = stats if stats is not None else NeumannStats()

    def vjp(v: torch.Tensor) -> torch.Tensor:
        (out,) = torch.autograd.grad(h_out, h_in, v, retain_graph=True)
        return out

    def replace_gradient(g: torch.Tensor) -> torch.Tensor:
        u, terms, reason = neumann_solve(vjp, g, max_terms, norm_cap, tol)
        stats.terms, stats.stop_reason = terms, reason
        stats.cap_hits += int(reason in ("norm_cap", "non_finite"))
        return u

    task_view = h_out.clone()
    task_view.register_hook(replace_gradient)
    return task_view

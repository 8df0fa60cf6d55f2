"""Implicit (recurrent back-propagation) gradients at a fixed point.

At a fixed point ``h* = F(x, h*)`` the implicit function theorem gives the gradient of a
loss through the whole trajectory as ``(I - J)^-T g`` pushed through one step of F,
``J = dF/dh`` at ``h*``. RBP approximates ``(I - J^T)^-1 g`` by the truncated Neumann series
``sum_k (J^T)^k g``; each term costs one vector-Jacobian product through the single step
kept in the graph, so memory does not depend on how many steps the forward pass ran.
:func:`anderson_adjoint_solve` instead solves the system to a relative tolerance with
Anderson-accelerated iteration of ``u <- g + J^T u`` (also one VJP per iteration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .options import BACKWARD_SOLVERS, BackwardOptions
from .solvers import AndersonMixer

VJP = Callable[[torch.Tensor], torch.Tensor]
__all__ = ["BACKWARD_SOLVERS", "BackwardStats", "anderson_adjoint_solve", "attach_implicit_backward", "neumann_solve"]


@dataclass
class BackwardStats:
    """What the last implicit backward solve did.

    ``terms``: vector-Jacobian products used (Neumann terms or solver iterations);
    ``stop_reason``: why it stopped (``"input_not_finite"``: the incoming gradient already held
    NaN/inf, as after an fp16 loss-scale overflow; passed on untouched, not a cap hit); ``cap_hits``: how many backward solves so far ended on
    a safeguard (norm cap, non-finite, divergence; for ``anderson`` also the iteration
    cap); ``solver``: ``"neumann"`` or ``"anderson"``; ``residual``: for ``anderson`` the
    relative residual ``|(I - J^T) u - g| / |g|`` of the returned ``u`` (not measured for
    the Neumann series, where it would cost one more VJP: NaN).
    """

    terms: int = 0
    stop_reason: str = "max_terms"
    cap_hits: int = 0
    solver: str = "neumann"
    residual: float = math.nan


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


def anderson_adjoint_solve(
    vjp: VJP,
    g: torch.Tensor,
    tol: float,
    max_iter: int,
    m: int = 5,
    norm_cap: float = 100.0,
    divergence: float = 1e3,
) -> tuple[torch.Tensor, int, str, float]:
    """Solve ``(I - J^T) u = g`` by Anderson-accelerated iteration of ``u <- g + J^T u``.

    The whole tensor is one unknown (a batch-statistics norm couples the samples' VJPs).
    Each iteration costs one VJP and measures the relative residual
    ``r = |g + J^T u - u| / |g|`` of its iterate. Stops with ``"converged"`` once
    ``r < tol``; otherwise returns the iterate with the smallest residual seen, with
    ``"max_steps"`` after ``max_iter`` VJPs, ``"non_finite"`` on NaN/inf, ``"diverged"``
    when ``r`` exceeds ``divergence`` times the first residual, or ``"norm_cap"`` when the next
    iterate's norm would pass ``norm_cap * |g|``. Returns ``(u, iterations, reason, r)``.
    """
    g_norm = float(g.norm())
    if g_norm == 0.0:
        return torch.zeros_like(g), 0, "converged", 0.0
    mixer = AndersonMixer(m, lam=1e-8)
    u, best, best_res, first_res = g, g, math.inf, math.inf
    for k in range(1, max_iter + 1):
        image = g + vjp(u)
        res = float((image - u).norm()) / g_norm
        if not math.isfinite(res):
            return best, k, "non_finite", best_res
        if k == 1:
            first_res = res
        if res < best_res:
            best, best_res = u, res
        if res < tol:
            return u, k, "converged", res
        if res > divergence * first_res:
            return best, k, "diverged", best_res
        if k == max_iter:
            break
        u = mixer.step(u.reshape(1, -1), image.reshape(1, -1)).view_as(g)
        if float(u.norm()) > norm_cap * g_norm:
            return best, k, "norm_cap", best_res
    return best, max_iter, "max_steps", best_res


def attach_implicit_backward(
    h_out: torch.Tensor,
    h_in: torch.Tensor,
    options: BackwardOptions | None = None,
    stats: BackwardStats | None = None,
) -> torch.Tensor:
    """Make back-propagation through ``h_out = F(x, h_in)`` use the implicit gradient.

    ``h_in`` must be a detached leaf that requires grad (the state before the last step).
    Returns an alias of ``h_out`` for the task to consume: a hook on it replaces the
    gradient ``g`` it receives with ``u ~ (I - J^T)^-1 g``, and autograd then carries ``u``
    through the one recorded step into parameters and drive. The alias keeps gradients
    that reach ``h_out`` by other routes (the penalty's double backward) untouched.

    ``options.solver="neumann"`` sums at most ``neumann_steps`` Neumann terms (``norm_cap``,
    ``neumann_tol`` as in :func:`neumann_solve`); ``"anderson"`` solves to the relative
    tolerance ``options.tol`` in at most ``options.max_steps`` VJPs
    (:func:`anderson_adjoint_solve`). ``stats`` receives what the solve did.
    """
    if not (h_in.is_leaf and h_in.requires_grad):
        raise ValueError("attach_implicit_backward needs h_in to be a detached leaf that requires grad.")
    options = options if options is not None else BackwardOptions()
    options.validate()
    stats = stats if stats is not None else BackwardStats()

    def vjp(v: torch.Tensor) -> torch.Tensor:
        (out,) = torch.autograd.grad(h_out, h_in, v, retain_graph=True)
        return out

    def replace_gradient(g: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(g.sum()):  # an fp16 loss scale overflowed upstream: the scaler skips this step
            stats.terms, stats.stop_reason, stats.solver, stats.residual = 0, "input_not_finite", options.solver, math.nan
            return g
        if options.solver == "neumann":
            u, terms, reason = neumann_solve(vjp, g, options.neumann_steps, options.norm_cap, options.neumann_tol)
            residual, failed = math.nan, reason in ("norm_cap", "non_finite")
        else:
            u, terms, reason, residual = anderson_adjoint_solve(
                vjp, g, options.tol, options.max_steps, options.anderson_m, options.norm_cap
            )
            failed = reason != "converged"
        stats.terms, stats.stop_reason, stats.solver, stats.residual = terms, reason, options.solver, residual
        stats.cap_hits += int(failed)
        return u

    task_view = h_out.clone()
    task_view.register_hook(replace_gradient)
    return task_view

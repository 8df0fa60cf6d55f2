"""Reversible recurrences (RevNet, seed 002): the exact BPTT gradient without storing the steps.

A step that can be inverted need not be stored: :class:`ReversibleChain` runs ``n`` invertible
steps without a graph, keeps only the final state, and in backward walks the chain in reverse,
rebuilding each step's input with the inverse, re-running that one step with the graph on and
back-propagating through it. Memory does not grow with ``n``; compute is about one extra forward.

The coupling here is momentum (Momentum ResNets, Sander et al. 2021), which makes any rfpn cell
``F`` invertible: ``v' = gamma v + (1 - gamma) (F(x, h) - h)``, ``h' = h + v'``, inverted by
``h = h' - v'``, ``v = (v' - (1 - gamma) (F(x, h) - h)) / gamma``
(:func:`~rfpn.recurrent.momentum.momentum_step` / :func:`~rfpn.recurrent.momentum.momentum_inverse`,
the state momentum of :class:`~rfpn.recurrent.momentum.StateMomentumCell` with ``mu = gamma``,
``s = 1 - gamma``). The inverse divides by ``gamma`` every step, so in floating point the rebuilt
states drift from the forward ones as ``n`` grows; :func:`reconstruction_error` measures it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .momentum import momentum_inverse, momentum_step

__all__ = ["ReversibleChain", "reconstruction_error", "reversible_momentum", "running_stats_frozen"]


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Restore every norm layer's running statistics afterwards: the backward's recomputation and
    inverses evaluate the cell again, and must not count as more training batches."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def _step(cell: nn.Module, x: torch.Tensor, h: torch.Tensor, v: torch.Tensor, gamma: float):
    f = cell(x, h)
    return momentum_step(h, v, f.to(h.dtype), gamma, 1.0 - gamma)


def _inverse(cell: nn.Module, x: torch.Tensor, h: torch.Tensor, v: torch.Tensor, gamma: float):
    return momentum_inverse(h, v, lambda s: cell(x, s).to(s.dtype), gamma, 1.0 - gamma)


class ReversibleChain(torch.autograd.Function):
    """``n`` momentum-coupled steps of ``cell`` from ``(h0, v0)``, returning ``(h_n, v_n)``; O(1) memory in ``n``.

    Gradients reach ``x``, ``h0``, ``v0`` and every parameter of ``cell`` (passed as ``params`` so
    autograd knows them). Only ``x`` and the final state are saved.
    """

    @staticmethod
    def forward(ctx: Any, cell: nn.Module, gamma: float, n: int, x: torch.Tensor, h0: torch.Tensor, v0: torch.Tensor,
                *params: torch.Tensor):
        h, v = h0.detach(), v0.detach()
        with torch.no_grad():
            for _ in range(n):
                h, v = _step(cell, x.detach(), h, v, gamma)
        ctx.cell, ctx.gamma, ctx.n, ctx.num_params = cell, gamma, n, len(params)
        ctx.save_for_backward(x, h, v)
        return h, v

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor, grad_v: torch.Tensor):
        x, h, v = ctx.saved_tensors
        cell, gamma = ctx.cell, ctx.gamma
        params = [p for p in cell.parameters() if p.requires_grad][: ctx.num_params]
        grad_h = torch.zeros_like(h) if grad_h is None else grad_h
        grad_v = torch.zeros_like(v) if grad_v is None else grad_v
        grad_x = torch.zeros_like(x)
        grad_params = [torch.zeros_like(p) for p in params]
        with running_stats_frozen(cell):
            grad_x, grad_h, grad_v = ReversibleChain._walk_back(ctx, cell, gamma, params, x, h, v, grad_h, grad_v,
                                                               grad_x, grad_params)
        return (None, None, None, grad_x, grad_h, grad_v, *grad_params)

    @staticmethod
    def _walk_back(ctx, cell, gamma, params, x, h, v, grad_h, grad_v, grad_x, grad_params):
        """Invert the chain step by step, back-propagating through each re-run step; returns the input grads."""
        for _ in range(ctx.n):
            with torch.no_grad():
                h_prev, v_prev = _inverse(cell, x, h, v, gamma)
            with torch.enable_grad():
                h_in = h_prev.detach().requires_grad_()
                v_in = v_prev.detach().requires_grad_()
                x_in = x.detach().requires_grad_()
                h_out, v_out = _step(cell, x_in, h_in, v_in, gamma)
                grads = torch.autograd.grad(
                    (h_out, v_out), (h_in, v_in, x_in, *params), (grad_h, grad_v), allow_unused=True
                )
            grad_h, grad_v = grads[0], grads[1]
            grad_x = grad_x + (grads[2] if grads[2] is not None else 0)
            for acc, g in zip(grad_params, grads[3:]):
                if g is not None:
                    acc.add_(g)
            h, v = h_prev, v_prev
        return grad_x, grad_h, grad_v


def reversible_momentum(cell: nn.Module, x: torch.Tensor, h0: torch.Tensor, n: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``n`` momentum-coupled steps from ``h0`` (``v0 = 0``) through :class:`ReversibleChain`."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma={gamma!r} is not valid; allowed values: a number in (0, 1].")
    params = [p for p in cell.parameters() if p.requires_grad]
    return ReversibleChain.apply(cell, gamma, n, x, h0, torch.zeros_like(h0), *params)


@torch.no_grad()
def reconstruction_error(cell: nn.Module, x: torch.Tensor, h0: torch.Tensor, n: int, gamma: float) -> list[float]:
    """Max absolute error of the rebuilt state after inverting ``k = 1..n`` steps from step ``n``.

    Entry ``k - 1`` compares the state rebuilt ``k`` inversions back with the one the forward pass
    had there: how far the backward pass's recomputed inputs drift in floating point.
    """
    states = [(h0, torch.zeros_like(h0))]
    for _ in range(n):
        states.append(_step(cell, x, *states[-1], gamma))
    h, v = states[-1]
    errors = []
    for k in range(1, n + 1):
        h, v = _inverse(cell, x, h, v, gamma)
        ref_h, ref_v = states[n - k]
        errors.append(float(torch.maximum((h - ref_h).abs().max(), (v - ref_v).abs().max())))
    return errors

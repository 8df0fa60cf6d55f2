"""Reversible computation (RevNet, seed 002): exact BPTT gradients without storing the steps.

A step that can be inverted need not be stored. :class:`ReversibleChain` runs a chain of
invertible steps (:class:`Coupling`) without a graph and keeps only the final state; in
backward it walks the chain in reverse, rebuilding each step's input with the inverse,
re-running that one step with the graph on and back-propagating through it. Memory does not
grow with the chain's length; compute is about one extra forward. The chain serves the
reversible recurrence (one coupling repeated ``n`` times, ``GRAD reversible``) and the RevNet
backbone (one coupling per block, :mod:`rfpn.modeling.revnet`).

Two couplings make a step invertible:

- :class:`AdditiveCoupling` (RevNet): ``a' = a + f(x, b)``, ``b' = b + g(x, a')``. It preserves
  volume (Jacobian determinant 1), so a recurrence built from it cannot contract to an
  attracting fixed point; its fixed-point version is bit-exact at no memory cost.
- :class:`MomentumCoupling` (Momentum ResNets, Sander et al. 2021), which makes any rfpn cell
  ``F`` invertible: ``v' = gamma v + (1 - gamma) (F(x, h) - h)``, ``h' = h + v'``, the state
  momentum of :class:`~rfpn.recurrent.momentum.StateMomentumCell` with ``mu = gamma``,
  ``s = 1 - gamma``. Its inverse divides by ``gamma``: in floating point the rebuilt states
  drift from the forward ones as the chain grows (:func:`reconstruction_error` measures it).

Exact mode (``exact=True``) keeps the state as fixed-point integers (:data:`FRACTION_BITS`
fractional bits) and rounds each increment to that grid, so an inverse undoes its step bit
for bit (Maclaurin et al. 2015, MacKay et al. 2018). The momentum coupling's multiplication
by ``gamma`` (rounded to ``k / 256``) drops bits; they are kept, one byte per element per
step, so exact momentum memory grows with the steps, 4x slower than storing one float32
state per step. Float mode is the default: use exact mode when the float drift matters
(long chains, small ``gamma``); the benchmark reports both.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .momentum import momentum_inverse, momentum_step

__all__ = [
    "AdditiveCoupling",
    "AdditiveCouplingCell",
    "Coupling",
    "exact_gamma",
    "FRACTION_BITS",
    "MomentumCoupling",
    "Recomputed",
    "ReversibleChain",
    "reconstruction_error",
    "recomputed",
    "reversible_chain",
    "reversible_momentum",
    "running_stats_frozen",
]

FRACTION_BITS = 32
GAMMA_DENOMINATOR = 256  # exact momentum: gamma = k / 256, the dropped bits fit one byte

Pair = tuple[torch.Tensor, torch.Tensor]


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Restore every norm layer's running statistics afterwards: the backward's recomputation and
    inverses evaluate the step again, and must not count as more training batches."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


def exact_gamma(gamma: float) -> float:
    """``gamma`` rounded to the nearest multiple of 1/256 (at least 1/256), as exact mode runs it."""
    return max(1, round(gamma * GAMMA_DENOMINATOR)) / GAMMA_DENOMINATOR


def _to_fixed(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t.double() * 2.0**FRACTION_BITS).to(torch.int64)


def _from_fixed(i: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (i.double() * 2.0**-FRACTION_BITS).to(dtype)


class Coupling(nn.Module):
    """An invertible step on a state pair ``(a, b)`` driven by ``x`` (``None`` for a backbone block).

    Subclasses define the float step and inverse, and the same on fixed-point integers for exact
    mode (``tape`` is a list the exact step may push dropped bits to and the inverse pops).
    """

    def step(self, x: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> Pair:
        raise NotImplementedError

    def inverse(self, x: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> Pair:
        raise NotImplementedError

    def step_exact(self, x: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                   tape: list[torch.Tensor]) -> Pair:
        raise NotImplementedError

    def inverse_exact(self, x: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                      tape: list[torch.Tensor]) -> Pair:
        raise NotImplementedError

    def forward(self, x: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> Pair:
        return self.step(x, a, b)


class AdditiveCoupling(Coupling):
    """``a' = a + f(x, b)``, ``b' = b + g(x, a')`` with two modules ``f(x, b)`` and ``g(x, a)``.

    For a backbone block ``x`` is ``None`` and ``f``, ``g`` are called as ``f(b)``, ``g(a)``.
    """

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f, self.g = f, g

    def _f(self, x, b):
        return self.f(b) if x is None else self.f(x, b)

    def _g(self, x, a):
        return self.g(a) if x is None else self.g(x, a)

    def step(self, x, a, b):
        a = a + self._f(x, b)
        return a, b + self._g(x, a)

    def inverse(self, x, a, b):
        b = b - self._g(x, a)
        return a - self._f(x, b), b

    def step_exact(self, x, a, b, dtype, tape):
        a = a + _to_fixed(self._f(x, _from_fixed(b, dtype)))
        return a, b + _to_fixed(self._g(x, _from_fixed(a, dtype)))

    def inverse_exact(self, x, a, b, dtype, tape):
        b = b - _to_fixed(self._g(x, _from_fixed(a, dtype)))
        return a - _to_fixed(self._f(x, _from_fixed(b, dtype))), b


class MomentumCoupling(Coupling):
    """``v' = mu v + s (F(x, h) - h)``, ``h' = h + v'`` for any rfpn cell ``F``; state ``(h, v)``.

    ``s`` defaults to ``1 - mu`` (Momentum ResNets' ``gamma = mu``). In exact mode ``mu`` is
    rounded to a multiple of 1/256 (:func:`exact_gamma`) in the step and in the recomputation,
    so the gradient is that of the dynamics that ran.
    """

    def __init__(self, cell: nn.Module, mu: float, s: float | None = None, exact: bool = False):
        super().__init__()
        if not 0.0 < mu < 1.0:
            raise ValueError(f"gamma={mu!r} is not valid; allowed values: a number in (0, 1).")
        self.cell = cell
        self.numerator = round(exact_gamma(mu) * GAMMA_DENOMINATOR)  # exact mode's mu, as k / 256
        self.mu = self.numerator / GAMMA_DENOMINATOR if exact else float(mu)
        self.s = 1.0 - self.mu if s is None else float(s)

    def _evaluate(self, x, h):
        return self.cell(x, h).to(h.dtype)

    def step(self, x, h, v):
        return momentum_step(h, v, self._evaluate(x, h), self.mu, self.s)

    def inverse(self, x, h, v):
        return momentum_inverse(h, v, lambda state: self._evaluate(x, state), self.mu, self.s)

    def _push(self, x, h, dtype):
        """``s (F(x, h) - h)`` on the fixed-point grid."""
        hf = _from_fixed(h, dtype)
        return _to_fixed(self.s * (self._evaluate(x, hf) - hf))

    def step_exact(self, x, h, v, dtype, tape):
        scaled = v * self.numerator
        tape.append(torch.remainder(scaled, GAMMA_DENOMINATOR).to(torch.uint8))
        v = torch.div(scaled, GAMMA_DENOMINATOR, rounding_mode="floor") + self._push(x, h, dtype)
        return h + v, v

    def inverse_exact(self, x, h, v, dtype, tape):
        h = h - v
        scaled = (v - self._push(x, h, dtype)) * GAMMA_DENOMINATOR + tape.pop().to(torch.int64)
        return h, torch.div(scaled, self.numerator, rounding_mode="floor")


class ReversibleChain(torch.autograd.Function):
    """``blocks[-1](... blocks[0](x, a0, b0))`` with O(1) activation memory in ``len(blocks)``.

    Gradients reach ``x``, ``a0``, ``b0`` and every parameter of the blocks (passed as ``params``
    so autograd knows them; a block may repeat, as in a recurrence). Only ``x``, the final state
    and, in exact mode, the momentum coupling's dropped bits are kept.
    """

    @staticmethod
    def forward(ctx: Any, blocks: Sequence[Coupling], exact: bool, x: torch.Tensor | None, a0: torch.Tensor,
                b0: torch.Tensor, *params: torch.Tensor):
        xd = None if x is None else x.detach()
        tape: list[torch.Tensor] = []
        fixed: list[torch.Tensor] = []
        with torch.no_grad():
            if exact:
                a, b = _to_fixed(a0), _to_fixed(b0)
                for block in blocks:
                    a, b = block.step_exact(xd, a, b, a0.dtype, tape)
                a_out, b_out = _from_fixed(a, a0.dtype), _from_fixed(b, b0.dtype)
                fixed = [a, b]
            else:
                a_out, b_out = a0.detach(), b0.detach()
                for block in blocks:
                    a_out, b_out = block.step(xd, a_out, b_out)
        ctx.blocks, ctx.exact, ctx.params = list(blocks), exact, params
        ctx.has_x, ctx.tape_length = x is not None, len(tape)
        # exact mode's integer state and dropped bits go through save_for_backward too, so memory counts see them
        ctx.save_for_backward(*([x] if x is not None else []), *fixed, *tape, a_out, b_out)
        return a_out, b_out

    @staticmethod
    def backward(ctx: Any, grad_a: torch.Tensor | None, grad_b: torch.Tensor | None):
        saved = list(ctx.saved_tensors)
        x = saved.pop(0) if ctx.has_x else None
        a, b = saved[-2], saved[-1]
        state = (saved[0], saved[1]) if ctx.exact else (a, b)
        tape = saved[2 : 2 + ctx.tape_length] if ctx.exact else []
        grad_a = torch.zeros_like(a) if grad_a is None else grad_a
        grad_b = torch.zeros_like(b) if grad_b is None else grad_b
        grad_x = None if x is None else torch.zeros_like(x)
        index = {id(p): i for i, p in enumerate(ctx.params)}
        grad_params: list[torch.Tensor | None] = [None] * len(ctx.params)
        owners = nn.ModuleList(dict.fromkeys(ctx.blocks))
        with running_stats_frozen(owners):
            for block in reversed(ctx.blocks):
                with torch.no_grad():
                    if ctx.exact:
                        state = block.inverse_exact(x, *state, a.dtype, tape)
                        a_in, b_in = _from_fixed(state[0], a.dtype), _from_fixed(state[1], b.dtype)
                    else:
                        state = block.inverse(x, *state)
                        a_in, b_in = state
                grad_a, grad_b, gx, block_grads = _backprop_step(block, x, a_in, b_in, grad_a, grad_b)
                if gx is not None:
                    grad_x = grad_x + gx
                for p, g in block_grads:
                    i = index.get(id(p))
                    if i is not None and g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
        return (None, None, grad_x, grad_a, grad_b, *grad_params)


def _backprop_step(block: Coupling, x, a_in, b_in, grad_a, grad_b):
    """Re-run one step from ``(a_in, b_in)`` with the graph and back-propagate ``(grad_a, grad_b)``."""
    params = [p for p in block.parameters() if p.requires_grad]
    with torch.enable_grad():
        a_leaf = a_in.detach().requires_grad_()
        b_leaf = b_in.detach().requires_grad_()
        x_leaf = None if x is None else x.detach().requires_grad_()
        a_out, b_out = block.step(x_leaf, a_leaf, b_leaf)
        inputs = [a_leaf, b_leaf] + ([x_leaf] if x_leaf is not None else []) + params
        grads = torch.autograd.grad((a_out, b_out), inputs, (grad_a, grad_b), allow_unused=True)
    ga = grads[0] if grads[0] is not None else torch.zeros_like(a_in)
    gb = grads[1] if grads[1] is not None else torch.zeros_like(b_in)
    offset = 3 if x_leaf is not None else 2
    gx = grads[2] if x_leaf is not None else None
    return ga, gb, gx, list(zip(params, grads[offset:]))


def reversible_chain(blocks: Sequence[Coupling], x: torch.Tensor | None, a0: torch.Tensor, b0: torch.Tensor,
                     exact: bool = False) -> Pair:
    """Run ``blocks`` in order from ``(a0, b0)`` through :class:`ReversibleChain`."""
    params = list(dict.fromkeys(p for block in dict.fromkeys(blocks) for p in block.parameters() if p.requires_grad))
    return ReversibleChain.apply(blocks, exact, x, a0, b0, *params)


class Recomputed(torch.autograd.Function):
    """``module(x)`` run without a graph; backward re-runs it from the saved ``x`` (a checkpoint).

    For the parts of a reversible network that cannot be inverted (a RevNet's stem and
    down-sampling units): only their input is kept. Unlike ``torch.utils.checkpoint``, the
    re-run leaves batch-norm running statistics as the forward left them. ``module`` must be
    deterministic (no dropout).
    """

    @staticmethod
    def forward(ctx: Any, module: nn.Module, x: torch.Tensor, *params: torch.Tensor):
        with torch.no_grad():
            out = module(x)
        ctx.module, ctx.params, ctx.single = module, params, isinstance(out, torch.Tensor)
        ctx.save_for_backward(x)
        return out if ctx.single else tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):
        (x,) = ctx.saved_tensors
        with torch.enable_grad(), running_stats_frozen(ctx.module):
            x_leaf = x.detach().requires_grad_(x.requires_grad)
            out = ctx.module(x_leaf)
            outs = (out,) if ctx.single else tuple(out)
            inputs = ([x_leaf] if x.requires_grad else []) + list(ctx.params)
            found = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        grad_x = found[0] if x.requires_grad else None
        return (None, grad_x, *found[1 if x.requires_grad else 0 :])


def recomputed(module: nn.Module, x: torch.Tensor) -> Any:
    """``module(x)`` keeping only ``x`` for backward (see :class:`Recomputed`)."""
    return Recomputed.apply(module, x, *[p for p in module.parameters() if p.requires_grad])


def reversible_momentum(cell: nn.Module, x: torch.Tensor, h0: torch.Tensor, n: int, mu: float,
                        s: float | None = None, v0: torch.Tensor | None = None, exact: bool = False) -> Pair:
    """Run ``n`` momentum-coupled steps of ``cell`` from ``(h0, v0)`` (``v0 = 0`` by default)."""
    coupling = MomentumCoupling(cell, mu, s, exact)
    return reversible_chain([coupling] * n, x, h0, torch.zeros_like(h0) if v0 is None else v0, exact)


class AdditiveCouplingCell(AdditiveCoupling):
    """A recurrent cell made of two half-width cells in an additive coupling (a reversible RNN).

    The drive and the state are split in halves along channels; each half moves by the update
    its half-cell proposes for the other half, with opposite signs (a leapfrog step):
    ``a' = a + (F_a(x_1, b) - b)``, ``b' = b - (F_b(x_2, a') - a')``. rfpn cells return a new
    state close to their input, so their raw outputs or same-signed residuals as increments make
    the pair expand geometrically (about 2.6x per step near identity); with opposite signs, where
    each half-cell pulls its input toward a rest point, the pair circles it instead. The map
    preserves volume, so it cannot contract to an attracting fixed point. Usable as an ordinary
    rfpn cell (``forward`` is one coupled step), so BPTT can run the same dynamics that
    ``GRAD reversible`` inverts.
    """

    def __init__(self, make_half_cell: Callable[[int], nn.Module], channels: int):
        if channels < 2 or channels % 2:
            raise ValueError(
                f"The additive coupling splits the channels in halves; channels={channels} must be even "
                "(set MODEL.RECURRENT.CHANNELS to an even number or use COUPLING momentum)."
            )
        first, second = make_half_cell(channels // 2), make_half_cell(channels // 2)
        super().__init__(_HalfCellUpdate(first, 0, 1.0), _HalfCellUpdate(second, 1, -1.0))
        self.channels = channels
        self.half_state = first.state_channels
        self.state_channels = 2 * first.state_channels

    def split(self, state: torch.Tensor) -> Pair:
        return state.split(self.half_state, dim=1)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        half = self.f.cell.init_state(x[:, : self.channels // 2])
        return torch.cat([half, torch.zeros_like(half)], dim=1)

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        a, b = self.split(state)
        return torch.cat([self.f.cell.readout(a), self.g.cell.readout(b)], dim=1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.cat(self.step(x, *self.split(state)), dim=1)


class _HalfCellUpdate(nn.Module):
    """``sign * (F(x_k, s) - s)``: the update one half-cell ``F``, reading half ``k`` of the drive, proposes."""

    def __init__(self, cell: nn.Module, half: int, sign: float):
        super().__init__()
        self.cell, self.half, self.sign = cell, half, sign

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        update = self.cell(x.chunk(2, dim=1)[self.half], s).to(s.dtype) - s
        return update if self.sign > 0 else -update


@torch.no_grad()
def reconstruction_error(coupling: Coupling, x: torch.Tensor | None, a0: torch.Tensor, b0: torch.Tensor, n: int,
                         exact: bool = False) -> list[float]:
    """Max absolute error of the state rebuilt ``k = 1..n`` inversions back from step ``n``.

    Entry ``k - 1`` compares the state the inverse rebuilt with the one the forward pass had
    there: how far the backward pass's recomputed inputs drift (0 in exact mode).
    """
    tape: list[torch.Tensor] = []
    if exact:
        states = [(_to_fixed(a0), _to_fixed(b0))]
        for _ in range(n):
            states.append(coupling.step_exact(x, *states[-1], a0.dtype, tape))
    else:
        states = [(a0, b0)]
        for _ in range(n):
            states.append(coupling.step(x, *states[-1]))
    state = states[-1]
    errors = []
    for k in range(1, n + 1):
        state = coupling.inverse_exact(x, *state, a0.dtype, tape) if exact else coupling.inverse(x, *state)
        ref = states[n - k]
        errors.append(float(max((s.double() - r.double()).abs().max() for s, r in zip(state, ref))))
    return errors

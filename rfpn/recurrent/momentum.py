"""Momentum in recurrent dynamics (MomentumRNN, seed 003): the seed's momentum LSTM and state momentum.

Two different things carry the name:

- **Input momentum**, the seed's cell: ``v_t = mu v_{t-1} + s W_x x_t`` replaces the input
  projection inside an LSTM (:class:`MomentumLSTMCell`, :class:`ConvMomentumLSTMCell`), for inputs
  that change over time. With a constant drive (every rfpn vision model) it only ramps the drive up,
  ``v_t = s W_x x (1 - mu^t) / (1 - mu)``, so it cannot change the dynamics' fixed points.
- **State momentum**, for any rfpn cell ``F``: ``v' = mu v + s (F(x, h) - h)``, ``h' = h + v'``
  (:func:`momentum_step`, :class:`StateMomentumCell`). Its fixed points are ``F``'s (with ``v* = 0``),
  so RBP/C-RBP's implicit gradient still applies; iterated on a plain model it is the heavy-ball
  method (the ``heavyball`` solver); with ``mu = gamma``, ``s = 1 - gamma`` it is the momentum
  coupling of Momentum ResNets, invertible by :func:`momentum_inverse`.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

__all__ = [
    "ConvMomentumLSTMCell",
    "MomentumLSTMCell",
    "StateMomentumCell",
    "heavy_ball_parameters",
    "momentum_inverse",
    "momentum_step",
]


def momentum_step(h: torch.Tensor, v: torch.Tensor, f_h: torch.Tensor, mu: float, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h', v')`` with ``v' = mu v + s (F(h) - h)`` and ``h' = h + v'`` (``f_h = F(h)``).

    ``h'`` is computed as ``lerp(h, F(h), s) + mu v``, equal in exact arithmetic, so that ``mu = 0,
    s = 1`` returns ``F(h)`` bit for bit.
    """
    v_new = mu * v + s * (f_h - h)
    h_new = torch.lerp(h, f_h, s) + mu * v if mu else torch.lerp(h, f_h, s)
    return h_new, v_new


def momentum_inverse(
    h_new: torch.Tensor, v_new: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], mu: float, s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, v)`` from ``(h', v')``: ``h = h' - v'``, ``v = (v' - s (F(h) - h)) / mu`` (needs ``mu > 0``).

    Dividing by ``mu`` each step expands what the forward contracted: in floating point the
    reconstruction error grows with the number of steps inverted.
    """
    if not mu > 0:
        raise ValueError(f"momentum_inverse needs mu > 0 (it divides by mu); got {mu}.")
    h = h_new - v_new
    return h, (v_new - s * (f(h) - h)) / mu


class StateMomentumCell(nn.Module):
    """Wrap any rfpn cell ``F`` with state momentum; the state stacks ``[h, v]`` along channels.

    ``mu`` in [0, 1) is the momentum, ``s`` in (0, 1] the step; ``mu = 0, s = 1`` is ``F`` itself,
    ``mu = 0, s < 1`` a damped update with no memory (the reviewers' control).
    """

    def __init__(self, cell: nn.Module, mu: float, s: float = 1.0):
        super().__init__()
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"momentum mu={mu!r} is not valid; allowed values: a number in [0, 1).")
        if not 0.0 < s <= 1.0:
            raise ValueError(f"momentum step s={s!r} is not valid; allowed values: a number in (0, 1].")
        self.cell, self.mu, self.s = cell, float(mu), float(s)
        self.channels = cell.channels
        self.state_channels = 2 * cell.state_channels

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cell.init_state(x)
        return torch.cat([h, torch.zeros_like(h)], dim=1)

    def split(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, v)`` of a stacked state."""
        return state.split(self.cell.state_channels, dim=1)

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return self.cell.readout(self.split(state)[0])

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        h, v = self.split(state)
        h_new, v_new = momentum_step(h, v, self.cell(x, h).to(h.dtype), self.mu, self.s)
        return torch.cat([h_new, v_new], dim=1)


def heavy_ball_parameters(rho: float) -> tuple[float, float]:
    """Polyak's heavy-ball ``(mu, s)`` for ``h = F(h)`` when ``J = dF/dh`` has its spectrum in ``[-rho, rho]``.

    ``I - J`` then has eigenvalues in ``[1 - rho, 1 + rho]``; the optimal step and momentum for that
    interval are ``s = 4 / (sqrt(1 + rho) + sqrt(1 - rho))^2`` and
    ``mu = ((sqrt(1 + rho) - sqrt(1 - rho)) / (sqrt(1 + rho) + sqrt(1 - rho)))^2``. ``rho = 0`` gives
    plain iteration (``s = 1, mu = 0``). ``s`` may exceed 1 (over-relaxation).
    """
    rho = min(max(float(rho), 0.0), 0.999)
    a, b = math.sqrt(1 + rho), math.sqrt(1 - rho)
    return ((a - b) / (a + b)) ** 2, 4.0 / (a + b) ** 2


class MomentumLSTMCell(nn.Module):
    """The seed's momentum LSTM: ``v = mu v + s W_x x_t``; gates ``= v + W_h h + b``; LSTM gating.

    The state is ``(h, c, v)``. Defaults follow the authors' sequential-MNIST recipe (mu = 0.6,
    s = 0.6); their code's command-line defaults are mu = 0.9, s = 0.1. ``mu = 0`` is an LSTM whose
    input is scaled by ``s``.
    """

    def __init__(self, input_size: int, hidden_size: int, mu: float = 0.6, s: float = 0.6):
        super().__init__()
        if not 0.0 <= mu < 1.0 or not 0.0 < s <= 1.0:
            raise ValueError(f"MomentumLSTMCell needs mu in [0, 1) and s in (0, 1]; got {mu}, {s}.")
        self.input_size, self.hidden_size, self.mu, self.s = input_size, hidden_size, float(mu), float(s)
        self.w_x = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.w_h = nn.Linear(hidden_size, 4 * hidden_size)
        with torch.no_grad():
            self.w_h.bias.zero_()
            self.w_h.bias[hidden_size : 2 * hidden_size].fill_(1.0)  # forget gate starts open

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zeros = x.new_zeros(x.shape[0], self.hidden_size)
        return zeros, zeros, x.new_zeros(x.shape[0], 4 * self.hidden_size)

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_x(x)

    def project_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.w_h(h)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, c, v = state
        v = self.mu * v + self.s * self.project_input(x)
        i, f, g, o = (v + self.project_hidden(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c, v


class ConvMomentumLSTMCell(MomentumLSTMCell):
    """The convolutional momentum LSTM: ``W_x`` and ``W_h`` are ``kernel_size`` convolutions."""

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: int = 3, mu: float = 0.6, s: float = 0.6):
        super().__init__(1, 1, mu, s)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ConvMomentumLSTMCell needs an odd kernel_size; got {kernel_size}.")
        self.input_size, self.hidden_size = input_channels, hidden_channels
        pad = kernel_size // 2
        self.w_x = nn.Conv2d(input_channels, 4 * hidden_channels, kernel_size, padding=pad, bias=False)
        self.w_h = nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel_size, padding=pad)
        with torch.no_grad():
            self.w_h.bias.zero_()
            self.w_h.bias[hidden_channels : 2 * hidden_channels].fill_(1.0)

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (x.shape[0], self.hidden_size, *x.shape[2:])
        return x.new_zeros(shape), x.new_zeros(shape), x.new_zeros(x.shape[0], 4 * self.hidden_size, *x.shape[2:])

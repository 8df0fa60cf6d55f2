"""Recurrent convolutional cells: the map ``state' = F(drive, state)`` that the dynamics iterate.

Every cell exposes the same small interface so :class:`~rfpn.recurrent.RecurrentDynamics`
can run any of them:

- ``init_state(x)``: the zero state for a drive ``x``;
- ``forward(x, state)``: one step of the map;
- ``readout(state)``: the part of the state that tasks read (the whole state for the hGRU,
  the hidden half for the convLSTM, whose state stacks ``[h, c]`` along channels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("bn", "gn", "none")
GATES = ("conv", "gala")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a cell's arithmetic runs in: autocast's dtype when autocast is on, else ``t``'s.

    Under autocast the convolutions return bf16/fp16 while the dynamics keep the state in float32;
    mixing the two in elementwise products makes every product a slow mixed-dtype kernel (measured
    over 10x slower than either dtype alone on a Xeon CPU). So a cell casts its inputs once and runs
    its gates in one dtype; the dynamics cast the result back to the state's float32.
    """
    device = t.device.type
    if t.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return t.dtype


def _orthogonal_conv_(weight: torch.Tensor) -> None:
    """Orthogonal init of a conv kernel viewed as an (out, in*k*k) matrix."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    nn.init.orthogonal_(flat)
    with torch.no_grad():
        weight.copy_(flat.reshape_as(weight))


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """Normalisation used inside the cell.

    ``bn`` uses batch statistics in training *and* testing (no running averages), as the
    Pathfinder reference does; it makes F depend on the whole batch. ``gn`` is GroupNorm
    (the R-FPN reference); ``none`` is the identity. Affine weights start at 0.1.
    """
    if kind not in NORMS:
        raise ValueError(f"Unknown norm {kind!r}; allowed values: {', '.join(NORMS)}.")
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        norm: nn.Module = nn.BatchNorm2d(channels, track_running_stats=False)
    else:
        norm = nn.GroupNorm(math.gcd(groups, channels), channels)
    nn.init.constant_(norm.weight, 0.1)
    nn.init.zeros_(norm.bias)
    return norm


class GALAGate(nn.Module):
    """Global-and-local attention: a channel branch (global pooling) times a spatial branch.

    Returns pre-activation logits of the same shape as the state; used in place of the
    1x1 gate convolution ``U1`` of the hGRU (the R-FPN reference's option).
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.global_branch = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.Softplus(), nn.Conv2d(hidden, channels, 1)
        )
        self.local_branch = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.Softplus(), nn.Conv2d(hidden, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.global_branch(h) * self.local_branch(h)


class HGRUCell(nn.Module):
    """Horizontal gated recurrent unit (Linsley et al. 2018) as used by C-RBP.

    Equations (``*`` convolution, ``.`` elementwise)::

        G1 = sigmoid(U1 * H + b1)
        C1 = Norm1(W_I * (H . G1))
        Z  = softplus(X - softplus(C1 . (alpha . H + mu)))
        G2 = sigmoid(U2 * Z + b2)
        C2 = Norm2(W_E * Z)
        Hh = softplus(kappa . Z + gamma . C2 + omega . Z . C2)
        H' = softplus((1 - G2) . H + G2 . Hh)

    Softplus everywhere keeps second derivatives defined, which the LCP needs.
    ``timesteps`` only sets the gate-bias init ``b1 = log U(1, T-1)``, ``b2 = -b1``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        norm: str = "bn",
        timesteps: int = 8,
        gate: str = "conv",
        gn_groups: int = 8,
    ):
        super().__init__()
        if channels < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"HGRUCell needs channels >= 1 and an odd kernel_size; got {channels}, {kernel_size}.")
        if gate not in GATES:
            raise ValueError(f"Unknown hGRU gate {gate!r}; allowed values: {', '.join(GATES)}.")
        self.channels = channels
        self.state_channels = channels
        pad = kernel_size // 2
        self.w_inh = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.w_exc = nn.Conv2d(channels, channels, kernel_size, padding=pad, bias=False)
        self.u1 = nn.Conv2d(channels, channels, 1) if gate == "conv" else None
        self.gala = GALAGate(channels) if gate == "gala" else None
        self.b1 = nn.Parameter(torch.empty(1, channels, 1, 1))
        self.u2 = nn.Conv2d(channels, channels, 1)
        self.norm1 = make_norm(norm, channels, gn_groups)
        self.norm2 = make_norm(norm, channels, gn_groups)
        shape = (1, channels, 1, 1)
        self.alpha = nn.Parameter(torch.full(shape, 0.1))
        self.mu = nn.Parameter(torch.full(shape, 1.0))
        self.kappa = nn.Parameter(torch.full(shape, 0.5))
        self.gamma = nn.Parameter(torch.full(shape, 1.0))
        self.omega = nn.Parameter(torch.full(shape, 0.5))
        self._init_weights(timesteps)

    def _init_weights(self, timesteps: int) -> None:
        for conv in (self.w_inh, self.w_exc, self.u2) + ((self.u1,) if self.u1 is not None else ()):
            _orthogonal_conv_(conv.weight)
        upper = max(float(timesteps - 1), 1.0)
        with torch.no_grad():
            self.b1.copy_(torch.log(torch.empty_like(self.b1).uniform_(1.0, upper)))
            self.u2.bias.copy_(-self.b1.flatten())
            if self.u1 is not None:
                self.u1.bias.zero_()

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.channels, *x.shape[2:])

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def _check(self, x: torch.Tensor, h: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"HGRUCell expects a drive of shape (B, {self.channels}, H, W); got {tuple(x.shape)}. "
                "Project the input to the cell's channel count first."
            )
        if h.shape != x.shape:
            raise ValueError(f"hGRU state shape {tuple(h.shape)} does not match drive shape {tuple(x.shape)}.")

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self._check(x, h)
        dtype = compute_dtype(h)
        x, h = x.to(dtype), h.to(dtype)
        alpha, mu, kappa, gamma, omega, b1 = (
            p.to(dtype) for p in (self.alpha, self.mu, self.kappa, self.gamma, self.omega, self.b1)
        )
        gate_logits = self.u1(h) if self.u1 is not None else self.gala(h)
        g1 = torch.sigmoid(gate_logits + b1)
        c1 = self.norm1(self.w_inh(h * g1))
        z = F.softplus(x - F.softplus(c1 * (alpha * h + mu)))
        g2 = torch.sigmoid(self.u2(z))
        c2 = self.norm2(self.w_exc(z))
        h_tilde = F.softplus(kappa * z + gamma * c2 + omega * z * c2)
        return F.softplus((1 - g2) * h + g2 * h_tilde)


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM (the paper's stable but less expressive baseline).

    The state stacks hidden and cell tensors along channels, ``[h, c]``, so the dynamics
    treat it as one tensor; ``readout`` returns ``h``.
    """

    def __init__(self, channels: int, kernel_size: int = 7):
        super().__init__()
        if channels < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ConvLSTMCell needs channels >= 1 and an odd kernel_size; got {channels}, {kernel_size}.")
        self.channels = channels
        self.state_channels = 2 * channels
        self.gates = nn.Conv2d(2 * channels, 4 * channels, kernel_size, padding=kernel_size // 2)
        with torch.no_grad():
            self.gates.bias.zero_()
            self.gates.bias[channels : 2 * channels].fill_(1.0)  # forget gate starts open

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.state_channels, *x.shape[2:])

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return state[:, : self.channels]

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"ConvLSTMCell expects a drive of shape (B, {self.channels}, H, W); got {tuple(x.shape)}."
            )
        expected = (x.shape[0], self.state_channels, *x.shape[2:])
        if tuple(state.shape) != expected:
            raise ValueError(f"convLSTM state shape {tuple(state.shape)} does not match expected {expected}.")
        dtype = compute_dtype(state)
        x, state = x.to(dtype), state.to(dtype)
        h, c = state.chunk(2, dim=1)
        i, f, o, g = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return torch.cat([h, c], dim=1)

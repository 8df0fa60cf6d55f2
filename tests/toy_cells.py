"""Toy recurrent cells with closed-form dynamics, shared by the tests."""
from __future__ import annotations

import torch
from torch import nn


class GainCell(nn.Module):
    """``F(x, h) = a * h + x`` with a trainable gain ``a`` (one, or one per channel).

    Every column sum of the Jacobian ``1^T J`` is the gain of its channel, and the fixed point
    is ``x / (1 - a)``, so the LCP, contraction and fixed-point tests have exact answers.
    """

    def __init__(self, channels: int = 2, a: float = 0.5, per_channel: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.full((channels,), float(a)) if per_channel else torch.tensor(float(a)))
        self.channels = self.state_channels = channels

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        a = self.a.view(1, -1, *([1] * (h.dim() - 2))) if self.a.dim() else self.a
        return a * h + x


def saved_bytes_per_steps(dynamics: nn.Module, x: torch.Tensor, steps: tuple[int, ...], held: bool = True) -> list[int]:
    """Bytes autograd keeps for one training pass (loss: mean readout + penalty) at each step count.

    ``held``: the most held at once (backward's recomputations included); else the forward's total.
    """
    from rfpn.recurrent import saved_tensor_bytes

    saved = []
    for n in steps:
        dynamics.steps = n
        with saved_tensor_bytes() as counter:
            h, aux = dynamics(x)
            (h.mean() + aux["penalty"]).backward()
        assert aux["steps"] == n
        saved.append(counter.peak_bytes if held else counter.forward_bytes)
    return saved

"""RNNPool (Saha et al. 2020, seed 004): pool each image patch with two RNNs.

For every ``kh x kw`` patch (``patch_size = (kh, kw)``, rows and columns may differ):

1. RNN1 sweeps each of the ``kh`` rows left to right and each of the ``kw`` columns top to
   bottom from a zero state; its final states are the row summaries ``r_1..r_kh`` and the
   column summaries ``c_1..c_kw`` (one RNN1, the same weights for rows and columns).
2. RNN2 sweeps the row summaries and the column summaries in both directions from a zero
   state, with the same weights for all four sweeps (a bidirectional RNN whose directions share
   weights, as in EdgeML's RNNPool).

The pooled vector has ``4 * hidden2`` channels, in this order (EdgeML's C reference order):

- ``[0, h2)``: RNN2 over the row summaries, first row to last (top to bottom);
- ``[h2, 2 h2)``: RNN2 over the row summaries, last row to first (bottom to top);
- ``[2 h2, 3 h2)``: RNN2 over the column summaries, first column to last (left to right);
- ``[3 h2, 4 h2)``: RNN2 over the column summaries, last column to first (right to left).

Two paths give the same result: :meth:`RNNPool.forward` unfolds every patch at once (training;
the unfolded patches are ``(kh * kw) / (sh * sw)`` times the input, their input projections
``gates * hidden1 / in_channels`` times more), :meth:`RNNPool.stream` computes
a block of patches at a time (a row of patches by default, one patch with ``rows=cols=1``)
into a preallocated output, so only one block's working set is alive besides the input and
the output. Pure PyTorch: any device and dtype, trainable.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CELLS", "FastGRNNCell", "GRUCell", "RNNPool"]


def _invalid(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not valid; allowed values: {allowed}.")


class FastGRNNCell(nn.Module):
    """FastGRNN (Kusupati et al. 2018), the cell of EdgeML's RNNPool; one input and one state matrix.

    ``z = sigmoid(W x + U h + b_z)``, ``h~ = tanh(W x + U h + b_h)``,
    ``h' = (sigmoid(zeta) (1 - z) + sigmoid(nu)) h~ + z h``. ``zeta`` and ``nu`` are learned
    scalars; the defaults (1, -4) are FastGRNN's (EdgeML's RNNPool pins them at 100, -100).
    """

    def __init__(self, input_size: int, hidden_size: int, zeta_init: float = 1.0, nu_init: float = -4.0):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias_gate = nn.Parameter(torch.ones(hidden_size))  # the gate starts leaning to keep the state
        self.bias_update = nn.Parameter(torch.zeros(hidden_size))
        self.zeta = nn.Parameter(torch.tensor(float(zeta_init)))
        self.nu = nn.Parameter(torch.tensor(float(nu_init)))
        bound = 1.0 / math.sqrt(hidden_size)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.uniform_(self.weight_hh, -bound, bound)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The input's share ``W x``, computed once for every step that reads ``x``."""
        return F.linear(x, self.weight_ih)

    def step(self, projected: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One step from the projected input ``W x`` and the state ``h``."""
        pre = projected + F.linear(h, self.weight_hh)
        z = torch.sigmoid(pre + self.bias_gate)
        candidate = torch.tanh(pre.add_(self.bias_update))  # in place: no backward reads pre
        del pre  # these locals are each as large as every patch's state: free them at their last use
        keep = torch.sigmoid(self.zeta) * (1 - z) + torch.sigmoid(self.nu)
        z = z * h
        return z.addcmul_(keep, candidate)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.step(self.project(x), h)


class GRUCell(nn.GRUCell):
    """``torch.nn.GRUCell`` (same parameters and ``forward``) split into an input projection and a step."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The input's share ``W_ih x + b_ih`` of the three gates."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def step(self, projected: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One GRU step (PyTorch's equations) from the projected input and the state ``h``."""
        reset_x, update_x, new_x = projected.chunk(3, dim=-1)
        hidden = F.linear(h, self.weight_hh, self.bias_hh)
        reset_h, update_h, new_h = hidden.chunk(3, dim=-1)
        reset = torch.sigmoid(reset_x + reset_h)
        update = torch.sigmoid(update_x + update_h)
        new = torch.tanh(new_x + reset * new_h)
        del hidden, reset_h, update_h, new_h, reset  # as large as every patch's state: free before the blend
        return new + update * (h - new)


CELLS = {"fastgrnn": FastGRNNCell, "gru": GRUCell}


def _pair(name: str, value: int | tuple[int, int] | list[int], minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise _invalid(name, value, f"an integer >= {minimum} or a (rows, cols) pair of them")
    return pair


def _sweep(cell: nn.Module, projected: torch.Tensor, dim: int) -> torch.Tensor:
    """Final state of ``cell`` run from zero along ``dim`` of ``projected`` (the other dims but the last are batch).

    Steps read ``projected.select(dim, t)`` views, so sweeping along any dim copies nothing.
    """
    shape = list(projected.shape)
    del shape[dim]
    h = projected.new_zeros(*shape[:-1], cell.hidden_size)
    for t in range(projected.shape[dim]):
        h = cell.step(projected.select(dim, t), h)
    return h


class RNNPool(nn.Module):
    """Pool ``(B, in_channels, H, W)`` to ``(B, 4 * hidden2, H', W')`` with one RNN summary per patch.

    ``patch_size`` and ``stride`` are an int or ``(rows, cols)``; ``padding`` is zero padding:
    an int, ``(rows, cols)`` (each side), or ``"same"`` (``H' = ceil(H / stride)``, the extra row
    or column at the bottom/right, as TensorFlow's "SAME"). ``cell`` is a key of :data:`CELLS`.
    """

    def __init__(self, in_channels: int, patch_size: int | tuple[int, int], stride: int | tuple[int, int],
                 hidden1: int, hidden2: int, cell: str = "fastgrnn", padding: int | tuple[int, int] | str = 0):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden1", hidden1), ("hidden2", hidden2)):
            if not isinstance(value, int) or value < 1:
                raise _invalid(name, value, "an integer >= 1")
        if cell not in CELLS:
            raise _invalid("cell", cell, ", ".join(CELLS))
        self.patch_size = _pair("patch_size", patch_size, 1)
        self.stride = _pair("stride", stride, 1)
        if isinstance(padding, str) and padding != "same":
            raise _invalid("padding", padding, '"same", an integer >= 0 or a (rows, cols) pair of them')
        self.padding = padding if padding == "same" else _pair("padding", padding, 0)
        self.in_channels, self.hidden1, self.hidden2, self.cell = in_channels, hidden1, hidden2, cell
        self.out_channels = 4 * hidden2
        self.rnn1 = CELLS[cell](in_channels, hidden1)
        self.rnn2 = CELLS[cell](hidden1, hidden2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, patch_size={self.patch_size}, stride={self.stride}, "
                f"padding={self.padding!r}, hidden1={self.hidden1}, hidden2={self.hidden2}, cell={self.cell!r}")

    def geometry(self, height: int, width: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
        """``(top, bottom, left, right)`` zero padding and the output ``(H', W')`` for an input of this size."""
        pads, sizes = [], []
        for n, k, s, p in zip((height, width), self.patch_size, self.stride,
                              (None, None) if self.padding == "same" else self.padding):
            if p is None:
                total = max((math.ceil(n / s) - 1) * s + k - n, 0)
                before, after = total // 2, total - total // 2
            else:
                before = after = p
            if n + before + after < k:
                raise _invalid("patch_size", self.patch_size,
                               f"sides at most those of the input ({height}x{width}) plus padding {self.padding!r}")
            pads += [before, after]
            sizes.append((n + before + after - k) // s + 1)
        return (pads[0], pads[1], pads[2], pads[3]), (sizes[0], sizes[1])

    def pool_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``(N, C, kh, kw)`` patches to ``(N, 4 * hidden2)`` pooled vectors (the order in the module docstring)."""
        projected = self.rnn1.project(patches.permute(0, 2, 3, 1))  # (N, kh, kw, gates * hidden1), shared by both sweeps
        rows = _sweep(self.rnn1, projected, dim=2)  # (N, kh, hidden1): each row, left to right
        cols = _sweep(self.rnn1, projected, dim=1)  # (N, kw, hidden1): each column, top to bottom
        del projected  # the largest tensor here; RNN2 does not read it
        pooled = []
        for summaries in (rows, cols):
            p = self.rnn2.project(summaries)
            pooled += _sweep(self.rnn2, torch.cat([p, p.flip(1)]), dim=1).chunk(2)  # both directions in one batch
        return torch.cat(pooled, dim=1)

    def _pool_region(self, region: torch.Tensor) -> torch.Tensor:
        """Pool every patch of an already padded ``(B, C, h, w)`` region to ``(B, 4 * hidden2, h', w')``."""
        (kh, kw), (sh, sw) = self.patch_size, self.stride
        patches = region.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, h', w', kh, kw), a view
        b, c, oh, ow = patches.shape[:4]
        pooled = self.pool_patches(patches.permute(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c, kh, kw))
        return pooled.view(b, oh, ow, self.out_channels).permute(0, 3, 1, 2)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"RNNPool expects (B, {self.in_channels}, H, W) input; got {tuple(x.shape)}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batched path: every patch at once (the module docstring says how large the unfolded tensors get)."""
        self._check_input(x)
        (top, bottom, left, right), _ = self.geometry(x.shape[2], x.shape[3])
        return self._pool_region(F.pad(x, (left, right, top, bottom))).contiguous()

    def stream(self, x: torch.Tensor, rows: int = 1, cols: int | None = None) -> torch.Tensor:
        """Streaming path: ``rows x cols`` output positions at a time (``cols=None``: whole rows) into a preallocated output.

        Only the input slice under one block is padded and unfolded, so besides ``x`` and the
        output the working set is one block's (for ``rows=cols=1``, one patch). Same result as
        :meth:`forward`; it records a graph when gradients are enabled, but the memory saving is
        an inference one.
        """
        self._check_input(x)
        if not isinstance(rows, int) or rows < 1:
            raise _invalid("rows", rows, "an integer >= 1")
        if cols is not None and (not isinstance(cols, int) or cols < 1):
            raise _invalid("cols", cols, "None or an integer >= 1")
        b, _, height, width = x.shape
        (top, _, left, _), (oh, ow) = self.geometry(height, width)
        (kh, kw), (sh, sw) = self.patch_size, self.stride
        out = x.new_empty(b, self.out_channels, oh, ow)
        cols = cols or ow
        for i0 in range(0, oh, rows):
            i1 = min(i0 + rows, oh)
            r0, r1 = i0 * sh - top, (i1 - 1) * sh + kh - top  # the block's input rows, padding included
            for j0 in range(0, ow, cols):
                j1 = min(j0 + cols, ow)
                c0, c1 = j0 * sw - left, (j1 - 1) * sw + kw - left
                region = x[:, :, max(r0, 0):min(r1, height), max(c0, 0):min(c1, width)]
                region = F.pad(region, (max(-c0, 0), max(c1 - width, 0), max(-r0, 0), max(r1 - height, 0)))
                out[:, :, i0:i1, j0:j1] = self._pool_region(region)
        return out

"""Run a recurrent cell ``h_{t+1} = F(x, h_t)`` and choose how gradients flow through it.

Gradient methods (``grad``):

- ``bptt``: back-propagation through every step; memory grows linearly with steps.
- ``cbptt``: ``bptt`` plus the Lipschitz Coefficient Penalty on the last step.
- ``rbp``: run ``N - 1`` steps without a graph, record only the last step, and replace
  the incoming gradient by the truncated Neumann series (the implicit gradient at the
  fixed point); memory does not depend on ``N``.
- ``crbp``: ``rbp`` plus the LCP: contractor recurrent back-propagation.

Outside training (``model.eval()`` or ``torch.no_grad()``) the cell runs ``test_steps``
steps, optionally stopping each sample once its mean absolute update falls below ``eps``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .gradients import NeumannStats, attach_implicit_backward
from .penalty import lcp_penalty

GRADS = ("bptt", "cbptt", "rbp", "crbp")


def _check_finite(state: torch.Tensor, step: int, total: int) -> None:
    if not torch.isfinite(state).all():
        raise FloatingPointError(
            f"Non-finite recurrent state at step {step} of {total}. The dynamics diverged: lower the "
            "learning rate, raise the LCP weight, or lower LCP_LAMBDA."
        )


def _mean_abs_update(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute change between two states, shape (B,)."""
    return (new.detach() - old.detach()).abs().flatten(1).mean(1)


class RecurrentDynamics(nn.Module):
    """Iterate ``cell`` from a zero state and return ``(readout, aux)``.

    ``aux`` holds ``penalty`` (0-dim tensor; 0 without LCP), ``steps`` (int, steps run),
    ``steps_per_sample`` (LongTensor), ``residual`` (float, mean |h_N - h_{N-1}|),
    ``residual_per_sample`` (tensor) and, when ``return_states`` is set, ``states``: the
    detached readout after every step (detached, so autograd memory stays flat).
    ``neumann_stats`` describes the last implicit backward (terms used, stop reason).
    """

    def __init__(
        self,
        cell: nn.Module,
        steps: int,
        grad: str = "crbp",
        neumann_steps: int = 15,
        lcp_lambda: float = 0.9,
        test_steps: int | None = None,
        eps: float = 0.0,
        neumann_norm_cap: float = 100.0,
        neumann_tol: float = 0.0,
    ):
        super().__init__()
        if grad not in GRADS:
            raise ValueError(f"Unknown gradient method {grad!r}; allowed values: {', '.join(GRADS)}.")
        if steps < 1:
            raise ValueError(f"steps must be >= 1; got {steps}.")
        if test_steps is not None and test_steps < 1:
            raise ValueError(f"test_steps must be >= 1 (or None to reuse steps); got {test_steps}.")
        if not 0.0 <= lcp_lambda < 1.0:
            raise ValueError(f"lcp_lambda must lie in [0, 1); got {lcp_lambda}.")
        if neumann_steps < 0:
            raise ValueError(f"neumann_steps must be >= 0; got {neumann_steps}.")
        self.cell = cell
        self.steps = steps
        self.grad = grad
        self.neumann_steps = neumann_steps
        self.lcp_lambda = lcp_lambda
        self.test_steps = test_steps
        self.eps = eps
        self.neumann_norm_cap = neumann_norm_cap
        self.neumann_tol = neumann_tol
        self.neumann_stats = NeumannStats()

    @property
    def uses_lcp(self) -> bool:
        return self.grad in ("cbptt", "crbp")

    def forward(
        self,
        x: torch.Tensor,
        h0: torch.Tensor | None = None,
        steps: int | None = None,
        return_states: bool = False,
        eps: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        state = self.cell.init_state(x) if h0 is None else h0
        expected = self.cell.init_state(x[:1]).shape[1:]
        if state.shape[0] != x.shape[0] or state.shape[1:] != expected:
            raise ValueError(
                f"Initial state shape {tuple(state.shape)} does not match the drive: expected "
                f"({x.shape[0]}, {', '.join(map(str, expected))})."
            )
        if self.training and torch.is_grad_enabled():
            n = self.steps if steps is None else steps
            if n < 1:
                raise ValueError(f"steps must be >= 1; got {n}.")
            if self.grad in ("bptt", "cbptt"):
                return self._run_bptt(x, state, n, return_states)
            return self._run_rbp(x, state, n, return_states)
        n = steps if steps is not None else (self.test_steps or self.steps)
        return self._run_inference(x, state, n, self.eps if eps is None else eps, return_states)

    def _aux(self, penalty, steps, residual_per_sample, states) -> dict[str, Any]:
        aux: dict[str, Any] = {
            "penalty": penalty,
            "steps": steps,
            "steps_per_sample": torch.full((residual_per_sample.shape[0],), steps, dtype=torch.long),
            "residual": float(residual_per_sample.mean()),
            "residual_per_sample": residual_per_sample,
            "neumann_stats": self.neumann_stats,
        }
        if states is not None:
            aux["states"] = states
        return aux

    def _record(self, states: list | None, state: torch.Tensor) -> None:
        if states is not None:
            states.append(self.cell.readout(state).detach())

    def _run_bptt(self, x, state, n, return_states):
        states: list | None = [] if return_states else None
        prev = state
        for t in range(1, n + 1):
            if t == n and self.uses_lcp and not state.requires_grad:
                state = state.detach().requires_grad_()
            prev = state
            state = self.cell(x, state)
            _check_finite(state, t, n)
            self._record(states, state)
        penalty = lcp_penalty(state, prev, self.lcp_lambda) if self.uses_lcp else x.new_zeros(())
        return self.cell.readout(state), self._aux(penalty, n, _mean_abs_update(state, prev), states)

    def _run_rbp(self, x, state, n, return_states):
        states: list | None = [] if return_states else None
        with torch.no_grad():
            for t in range(1, n):
                state = self.cell(x, state)
                _check_finite(state, t, n)
                self._record(states, state)
        h_in = state.detach().requires_grad_()
        h_out = self.cell(x, h_in)
        _check_finite(h_out, n, n)
        self._record(states, h_out)
        penalty = lcp_penalty(h_out, h_in, self.lcp_lambda) if self.uses_lcp else x.new_zeros(())
        task_out = attach_implicit_backward(
            h_out, h_in, self.neumann_steps, self.neumann_norm_cap, self.neumann_tol, self.neumann_stats
        )
        return self.cell.readout(task_out), self._aux(penalty, n, _mean_abs_update(h_out, h_in), states)

    @torch.no_grad()
    def _run_inference(self, x, state, n, eps, return_states):
        states: list | None = [] if return_states else None
        batch = x.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=x.device)
        steps_per_sample = torch.zeros(batch, dtype=torch.long)
        residual = x.new_zeros(batch)
        t = 0
        for t in range(1, n + 1):
            new = self.cell(x, state)
            _check_finite(new, t, n)
            update = _mean_abs_update(new, state)
            active = ~done
            residual = torch.where(active, update, residual)
            steps_per_sample[active.cpu()] = t
            if eps > 0:
                new = torch.where(done.view(-1, *([1] * (new.dim() - 1))), state, new)
                done = done | (update < eps)
            state = new
            self._record(states, state)
            if eps > 0 and bool(done.all()):
                break
        aux = self._aux(x.new_zeros(()), t, residual, states)
        aux["steps_per_sample"] = steps_per_sample
        return self.cell.readout(state), aux

"""Run a recurrent cell ``h_{t+1} = F(x, h_t)`` and choose how gradients flow through it.

Gradient methods (``grad``):

- ``bptt``: back-propagation through every step; memory grows linearly with steps.
- ``cbptt``: ``bptt`` plus the Lipschitz Coefficient Penalty on the last step.
- ``rbp``: run ``N - 1`` steps without a graph, record only the last step, and replace
  the incoming gradient by the truncated Neumann series (the implicit gradient at the
  fixed point); memory does not depend on ``N``.
- ``crbp``: ``rbp`` plus the LCP: contractor recurrent back-propagation.

Forward solvers (``solver``, see :mod:`rfpn.recurrent.solvers`):

- ``fixed`` (default): ``steps`` steps in training, ``test_steps`` at inference, optionally
  stopping each sample once its mean absolute update falls below ``eps``.
- ``iterate`` / ``anderson``: plain or Anderson-accelerated iteration until every sample's
  relative residual ``|h_{t+1} - h_t| / |h_{t+1}|`` is below ``tol``, at most ``max_steps``
  function evaluations. For ``rbp``/``crbp`` the solve runs without a graph, then the one
  recorded step and the implicit backward follow, so the gradient is taken at the solved
  point. ``bptt``/``cbptt`` back-propagate through plain iteration with the same stopping
  rule (memory grows with the steps run); they refuse ``anderson``, whose least-squares
  extrapolation is not a recurrence to back-propagate through.

``test_solver`` picks a different solver for inference (``None`` reuses ``solver``): a model
trained with a residual-stopped solver can run a fixed ``test_steps`` at test time, further
towards its fixed point than the training tolerance reaches.

The implicit backward solves ``(I - J^T) u = g`` with the truncated Neumann series
(``backward_solver="neumann"``) or with Anderson-accelerated iteration to a relative
tolerance (``"anderson"``, see :func:`rfpn.recurrent.gradients.anderson_adjoint_solve`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .gradients import BACKWARD_SOLVERS, NeumannStats, attach_implicit_backward
from .penalty import lcp_penalty
from .solvers import SOLVERS, SolverResult, check_finite, relative_residual, solve_fixed_point

GRADS = ("bptt", "cbptt", "rbp", "crbp")


def _mean_abs_update(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute change between two states, shape (B,)."""
    return (new.detach() - old.detach()).abs().flatten(1).mean(1)


class RecurrentDynamics(nn.Module):
    """Iterate ``cell`` from a zero state and return ``(readout, aux)``.

    ``aux`` holds ``penalty`` (0-dim tensor; 0 without LCP), ``steps`` (int, steps run),
    ``steps_per_sample`` (LongTensor), ``residual`` (float, mean |h_N - h_{N-1}|),
    ``residual_per_sample`` (tensor) and, when ``return_states`` is set, ``states``: the
    detached readout after every step (detached, so autograd memory stays flat).
    ``neumann_stats`` describes the last implicit backward (terms or iterations used,
    stop reason, final relative residual).

    Fixed-point statistics, for every solver: ``solver`` (str), ``relative_residual``
    (float, batch mean) and ``relative_residual_per_sample`` of the last step
    ``|h_N - h_{N-1}| / |h_N|``, ``converged`` (BoolTensor, that residual ``< tol``) and
    ``solver_stop`` (``"converged"``, ``"max_steps"``, or ``"fixed"`` for the fixed
    solver). ``steps`` counts evaluations of the cell on the batch (the recorded step
    included); ``steps_per_sample`` is the evaluation from which a sample stayed below
    ``tol`` (non-fixed solvers) or the steps it ran (fixed).
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
        solver: str = "fixed",
        tol: float = 1e-4,
        max_steps: int = 100,
        anderson_m: int = 5,
        backward_solver: str = "neumann",
        backward_tol: float = 1e-5,
        backward_max_steps: int = 50,
        test_solver: str | None = None,
    ):
        super().__init__()
        if grad not in GRADS:
            raise ValueError(f"Unknown gradient method {grad!r}; allowed values: {', '.join(GRADS)}.")
        if solver not in SOLVERS:
            raise ValueError(f"Unknown forward solver {solver!r}; allowed values: {', '.join(SOLVERS)}.")
        if test_solver is not None and test_solver not in SOLVERS:
            raise ValueError(
                f"Unknown inference solver {test_solver!r}; allowed values: None (reuse solver), {', '.join(SOLVERS)}."
            )
        if backward_solver not in BACKWARD_SOLVERS:
            raise ValueError(
                f"Unknown backward solver {backward_solver!r}; allowed values: {', '.join(BACKWARD_SOLVERS)}."
            )
        if not tol > 0 or not backward_tol > 0:
            raise ValueError(f"tol and backward_tol must be > 0; got {tol} and {backward_tol}.")
        if max_steps < 1 or backward_max_steps < 1 or anderson_m < 1:
            raise ValueError(
                "max_steps, backward_max_steps and anderson_m must be >= 1; "
                f"got {max_steps}, {backward_max_steps}, {anderson_m}."
            )
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
        self.solver = solver
        self.test_solver = test_solver
        self.tol = tol
        self.max_steps = max_steps
        self.anderson_m = anderson_m
        self.backward_solver = backward_solver
        self.backward_tol = backward_tol
        self.backward_max_steps = backward_max_steps
        self.neumann_stats = NeumannStats(solver=backward_solver)

    @property
    def uses_lcp(self) -> bool:
        return self.grad in ("cbptt", "crbp")

    @property
    def inference_solver(self) -> str:
        """The solver of an inference pass: ``test_solver`` when set, else the training ``solver``."""
        return self.test_solver or self.solver

    def forward(
        self,
        x: torch.Tensor,
        h0: torch.Tensor | None = None,
        steps: int | None = None,
        return_states: bool = False,
        eps: float | None = None,
        tol: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run the dynamics on drive ``x``.

        ``steps`` overrides the step count of the fixed solver (``steps`` in training,
        ``test_steps`` at inference) or the cap ``max_steps`` of the others; ``eps`` the
        fixed solver's inference early stop; ``tol`` the relative-residual tolerance.
        """
        tol = self.tol if tol is None else tol
        state = self.cell.init_state(x) if h0 is None else h0
        expected = self.cell.init_state(x[:1]).shape[1:]
        if state.shape[0] != x.shape[0] or state.shape[1:] != expected:
            raise ValueError(
                f"Initial state shape {tuple(state.shape)} does not match the drive: expected "
                f"({x.shape[0]}, {', '.join(map(str, expected))})."
            )
        fixed = self.solver == "fixed"
        if self.training and torch.is_grad_enabled():
            n = (self.steps if fixed else self.max_steps) if steps is None else steps
            if n < 1:
                raise ValueError(f"steps must be >= 1; got {n}.")
            if self.grad in ("bptt", "cbptt"):
                if self.solver == "anderson":
                    raise ValueError(
                        f"grad={self.grad!r} cannot train through the anderson solver (its extrapolation is not "
                        "a recurrence to back-propagate through); use grad 'rbp'/'crbp', or solver 'iterate'."
                    )
                return self._run_bptt(x, state, n, return_states, tol)
            return self._run_rbp(x, state, n, return_states, tol)
        solver = self.inference_solver
        if solver == "fixed":
            n = steps if steps is not None else (self.test_steps or self.steps)
            return self._run_inference(x, state, n, self.eps if eps is None else eps, return_states, tol)
        cap = self.max_steps if steps is None else steps
        return self._run_solver_inference(x, state, cap, return_states, tol, solver)

    def _aux(
        self,
        penalty,
        steps,
        residual_per_sample,
        relative_per_sample,
        states,
        tol,
        stop="fixed",
        per_sample=None,
        solver=None,
    ) -> dict[str, Any]:
        batch = residual_per_sample.shape[0]
        aux: dict[str, Any] = {
            "penalty": penalty,
            "steps": steps,
            "steps_per_sample": torch.full((batch,), steps, dtype=torch.long) if per_sample is None else per_sample,
            "residual": float(residual_per_sample.mean()),
            "residual_per_sample": residual_per_sample,
            "relative_residual": float(relative_per_sample.mean()),
            "relative_residual_per_sample": relative_per_sample,
            "converged": relative_per_sample < tol,
            "solver": solver or self.solver,
            "solver_stop": stop,
            "neumann_stats": self.neumann_stats,
        }
        if states is not None:
            aux["states"] = states
        return aux

    def _solve(self, x, state, cap, tol, states, solver=None) -> SolverResult:
        return solve_fixed_point(
            lambda h: self.cell(x, h),
            state,
            solver or self.solver,
            tol,
            cap,
            anderson_m=self.anderson_m,
            on_eval=None if states is None else lambda h: self._record(states, h),
        )

    def _record(self, states: list | None, state: torch.Tensor) -> None:
        if states is not None:
            states.append(self.cell.readout(state).detach())

    def _run_bptt(self, x, state, n, return_states, tol):
        """Back-propagate through plain iteration: ``n`` steps (fixed), or fewer once all are below ``tol``."""
        states: list | None = [] if return_states else None
        if self.uses_lcp and not state.requires_grad:
            state = state.detach().requires_grad_()
        result = self._solve(x, state, n, tol, states)
        h_in, h_out = result.state, result.image
        penalty = lcp_penalty(h_out, h_in, self.lcp_lambda) if self.uses_lcp else x.new_zeros(())
        stop = "fixed" if self.solver == "fixed" else result.stop_reason
        per_sample = None if self.solver == "fixed" else result.steps_per_sample
        aux = self._aux(
            penalty, result.evals, result.mean_abs_update, result.relative_residual, states, tol, stop, per_sample
        )
        return self.cell.readout(h_out), aux

    def _run_rbp(self, x, state, n, return_states, tol):
        """Reach the fixed point without a graph, then record one step for the implicit backward."""
        states: list | None = [] if return_states else None
        stop, per_sample, evals = ("fixed" if self.solver == "fixed" else "max_steps"), None, n
        if self.solver == "fixed":
            with torch.no_grad():
                for t in range(1, n):
                    state = self.cell(x, state)
                    check_finite(state, t, n)
                    self._record(states, state)
        elif n > 1:
            with torch.no_grad():
                result = self._solve(x, state, n - 1, tol, states)
            state, stop = result.image, result.stop_reason
            per_sample, evals = result.steps_per_sample + 1, result.evals + 1
        h_in = state.detach().requires_grad_()
        h_out = self.cell(x, h_in)
        check_finite(h_out, evals, evals if self.solver == "fixed" else n)
        self._record(states, h_out)
        penalty = lcp_penalty(h_out, h_in, self.lcp_lambda) if self.uses_lcp else x.new_zeros(())
        task_out = attach_implicit_backward(
            h_out,
            h_in,
            self.neumann_steps,
            self.neumann_norm_cap,
            self.neumann_tol,
            self.neumann_stats,
            solver=self.backward_solver,
            solver_tol=self.backward_tol,
            solver_max_steps=self.backward_max_steps,
            anderson_m=self.anderson_m,
        )
        rel = relative_residual(h_out.detach(), h_in.detach())
        aux = self._aux(penalty, evals, _mean_abs_update(h_out, h_in), rel, states, tol, stop, per_sample)
        return self.cell.readout(task_out), aux

    @torch.no_grad()
    def _run_solver_inference(self, x, state, cap, return_states, tol, solver):
        states: list | None = [] if return_states else None
        result = self._solve(x, state, cap, tol, states, solver)
        aux = self._aux(
            x.new_zeros(()),
            result.evals,
            result.mean_abs_update,
            result.relative_residual,
            states,
            tol,
            result.stop_reason,
            result.steps_per_sample,
            solver,
        )
        return self.cell.readout(result.image), aux

    @torch.no_grad()
    def _run_inference(self, x, state, n, eps, return_states, tol):
        states: list | None = [] if return_states else None
        batch = x.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=x.device)
        steps_per_sample = torch.zeros(batch, dtype=torch.long)
        residual = x.new_zeros(batch)
        relative = x.new_zeros(batch)
        t = 0
        for t in range(1, n + 1):
            new = self.cell(x, state)
            check_finite(new, t, n)
            update = _mean_abs_update(new, state)
            active = ~done
            residual = torch.where(active, update, residual)
            relative = torch.where(active, relative_residual(new, state), relative)
            steps_per_sample[active.cpu()] = t
            if eps > 0:
                new = torch.where(done.view(-1, *([1] * (new.dim() - 1))), state, new)
                done = done | (update < eps)
            state = new
            self._record(states, state)
            if eps > 0 and bool(done.all()):
                break
        aux = self._aux(x.new_zeros(()), t, residual, relative, states, tol, per_sample=steps_per_sample, solver="fixed")
        return self.cell.readout(state), aux

"""Run a recurrent cell ``h_{t+1} = F(x, h_t)`` and choose how gradients flow through it.

Gradient methods (``grad``, see :mod:`rfpn.recurrent.methods`; one class each, registered by
name): ``bptt``, ``rbp``, ``jfb``, ``phantom``, each also with a ``c`` prefix that switches the
Lipschitz Coefficient Penalty on (``cbptt`` and ``crbp`` are the paper's C-BPTT and C-RBP).
The penalty is orthogonal to the method: ``penalty="lcp"`` or ``"jacobian"`` works with any
of them, and its weight can adapt itself (``auto_weight``, :mod:`rfpn.recurrent.penalty`).

Forward solvers (``solver``, see :mod:`rfpn.recurrent.solvers`):

- ``fixed`` (default): ``steps`` steps in training, ``test_steps`` at inference, optionally
  stopping each sample once its mean absolute update falls below ``eps``.
- ``iterate`` / ``anderson``: plain or Anderson-accelerated iteration until every sample's
  relative residual ``|h_{t+1} - h_t| / |h_{t+1}|`` is below ``tol``, at most ``max_steps``
  function evaluations. Methods that solve without a graph (``rbp``, ``jfb``, ``phantom``)
  then record their steps with the graph at the solved point. ``bptt`` back-propagates through
  plain iteration with the same stopping rule (memory grows with the steps run) and refuses
  ``anderson``, whose least-squares extrapolation is not a recurrence to back-propagate through.

``test_solver`` picks a different solver for inference (``None`` reuses ``solver``): a model
trained with a residual-stopped solver can run a fixed ``test_steps`` at test time, further
towards its fixed point than the training tolerance reaches.

The settings come in three groups (:mod:`rfpn.recurrent.options`): ``forward_options``,
``backward_options`` and ``penalty_options``; their fields are also accepted as
flat keywords (``tol=1e-3``, ``neumann_steps=15``, ``lcp_lambda=0.9``) and readable and settable
as attributes (``dyn.tol``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .gradients import BackwardStats, attach_implicit_backward
from .methods import GRADS, GradientMethod, RecordedStep, resolve_gradient_method
from .options import (
    EXTRAPOLATING_SOLVERS,
    GROUPS,
    keyword_names,
    BackwardOptions,
    ForwardOptions,
    Naming,
    PenaltyOptions,
    split_flat_keywords,
)
from .penalty import column_sums, dual_ascent_step, jacobian_frobenius_penalty, lcp_from_column_sums
from .solvers import SolverResult, check_finite, relative_residual, solve_fixed_point

__all__ = ["GRADS", "RecurrentDynamics", "state_dtype", "validate_settings"]


def validate_settings(
    grad: str,
    steps: int,
    forward: ForwardOptions,
    backward: BackwardOptions,
    penalty: PenaltyOptions,
    naming: Naming = keyword_names,
    grad_name: str = "grad",
    steps_name: str = "steps",
) -> tuple[type[GradientMethod], str]:
    """Check every setting and their combinations; return the method class and the penalty kind.

    Errors name the setting as ``naming`` spells it (keyword or config key) and the allowed values.
    """
    if grad not in GRADS:
        raise ValueError(f"{grad_name}={grad!r} is not valid; allowed values: {', '.join(GRADS)}.")
    method, lcp_by_name = resolve_gradient_method(grad)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"{steps_name}={steps!r} is not valid; allowed values: an integer >= 1.")
    for options in (forward, backward, penalty):
        options.validate(naming)
    if method.through_solver and forward.solver in EXTRAPOLATING_SOLVERS:
        raise ValueError(
            f"{forward.field_name('solver', naming)}={forward.solver!r} cannot train with {grad_name}={grad!r} (its "
            f"extrapolation is not the model's recurrence to back-propagate through); allowed combinations: solver "
            f"{forward.solver!r} with a method that solves without a graph (rbp, jfb, phantom and their c-variants), "
            f"or solver 'fixed'/'iterate' with any {grad_name}."
        )
    if method.fixed_steps and forward.solver != "fixed":
        raise ValueError(
            f"{grad_name}={grad!r} runs exactly {steps_name} steps; allowed values of "
            f"{forward.field_name('solver', naming)}: fixed (got {forward.solver!r})."
        )
    kind = penalty.kind or ("lcp" if lcp_by_name else "none")
    if lcp_by_name and kind != "lcp":
        raise ValueError(
            f"{penalty.field_name('kind', naming)}={penalty.kind!r} contradicts {grad_name}={grad!r}, whose 'c' prefix "
            f"means the LCP; allowed values: '' or 'lcp' with {grad!r}, or use {grad[1:]!r} with another penalty."
        )
    if penalty.auto and kind != "lcp":
        raise ValueError(
            f"{penalty.field_name('auto', naming)}=True adapts the weight to the LCP's constraint max(1^T J) <= lambda "
            f"and needs the LCP; allowed values: False, or True with the LCP (a c-prefixed {grad_name} or penalty 'lcp')."
        )
    return method, kind


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the recurrent state is kept in: at least float32.

    Under autocast the cell's convolutions run in bf16/fp16, but the state between steps, the
    residuals the solvers stop on, the Neumann/Anderson backward accumulations (VJPs with respect
    to this state) and the penalty's column sums stay in float32: bf16 keeps about 3 significant
    digits, too few for a relative-residual tolerance of 1e-3 or a Neumann sum of 15 terms.
    """
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def _mean_abs_update(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute change between two states, shape (B,)."""
    return (new.detach() - old.detach()).abs().flatten(1).mean(1)


class _Option:
    """An attribute of ``RecurrentDynamics`` that reads and writes one field of an option group."""

    def __init__(self, group: str, name: str):
        self.group, self.name = group, name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj.__dict__[self.group], self.name)

    def __set__(self, obj, value) -> None:
        setattr(obj.__dict__[self.group], self.name, value)


class _TrainingRun:
    """The view of a training pass that gradient methods use (:class:`~rfpn.recurrent.methods.DynamicsRun`)."""

    def __init__(self, dynamics: "RecurrentDynamics", states: list | None):
        self.dynamics, self.states = dynamics, states
        self.forward_options = dynamics.forward_options
        self.backward_options = dynamics.backward_options
        self.penalty_active = dynamics.penalty_kind != "none"
        self.cell = dynamics.cell

    def step(self, x: torch.Tensor, h: torch.Tensor, t: int, total: int, record: bool = True) -> torch.Tensor:
        out = self.dynamics.evaluate(x, h)
        check_finite(out, t, total)
        if record:
            self.record(out)
        return out

    def solve(self, x: torch.Tensor, h: torch.Tensor, cap: int, tol: float) -> SolverResult:
        return self.dynamics._solve(x, h, cap, tol, self.states)

    def record(self, h: torch.Tensor) -> None:
        self.dynamics._record(self.states, h)

    def implicit_backward(self, f_out: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
        return attach_implicit_backward(f_out, h_in, self.backward_options, self.dynamics.backward_stats)


class RecurrentDynamics(nn.Module):
    """Iterate ``cell`` from a zero state and return ``(readout, aux)``.

    ``aux`` holds ``penalty`` (0-dim tensor, unweighted; 0 without a penalty),
    ``penalty_weight`` (float: the weight xi this step's loss should use, ``weight * penalty``),
    ``max_column_sum`` (float, ``max 1^T J`` when the LCP ran, else NaN), ``steps`` (int, steps
    run), ``steps_per_sample`` (LongTensor), ``residual`` (float, mean |h_N - h_{N-1}|),
    ``residual_per_sample`` (tensor) and, when ``return_states`` is set, ``states``: the
    detached readout after every step (detached, so autograd memory stays flat).
    ``backward_stats`` (also as ``neumann_stats``) describes the last implicit backward
    (terms or iterations used, stop reason, final relative residual).

    Fixed-point statistics, for every solver: ``solver`` (str), ``relative_residual``
    (float, batch mean) and ``relative_residual_per_sample`` of the last step
    ``|h_N - h_{N-1}| / |h_N|``, ``converged`` (BoolTensor, that residual ``< tol``) and
    ``solver_stop`` (``"converged"``, ``"max_steps"``, or ``"fixed"`` for the fixed
    solver). ``steps`` counts evaluations of the cell on the batch (the recorded steps
    included); ``steps_per_sample`` is the evaluation from which a sample stayed below
    ``tol`` (non-fixed solvers) or the steps it ran (fixed).

    With ``auto_weight`` the weight is a buffer (``auto_penalty_weight``, saved in checkpoints)
    updated after every training pass by :func:`~rfpn.recurrent.penalty.dual_ascent_step`.
    """

    solver = _Option("forward_options", "solver")
    test_solver = _Option("forward_options", "test_solver")
    tol = _Option("forward_options", "tol")
    max_steps = _Option("forward_options", "max_steps")
    anderson_m = _Option("forward_options", "anderson_m")
    test_steps = _Option("forward_options", "test_steps")
    eps = _Option("forward_options", "eps")
    backward_solver = _Option("backward_options", "solver")
    backward_tol = _Option("backward_options", "tol")
    backward_max_steps = _Option("backward_options", "max_steps")
    neumann_steps = _Option("backward_options", "neumann_steps")
    neumann_norm_cap = _Option("backward_options", "norm_cap")
    neumann_tol = _Option("backward_options", "neumann_tol")
    phantom_steps = _Option("backward_options", "phantom_steps")
    phantom_tau = _Option("backward_options", "phantom_tau")
    lcp_lambda = _Option("penalty_options", "lcp_lambda")

    def __init__(
        self,
        cell: nn.Module,
        steps: int,
        grad: str = "crbp",
        *,
        forward_options: ForwardOptions | None = None,
        backward_options: BackwardOptions | None = None,
        penalty_options: PenaltyOptions | None = None,
        **flat: Any,
    ):
        super().__init__()
        groups = {"forward": forward_options, "backward": backward_options, "penalty": penalty_options}
        for group, values in split_flat_keywords(flat).items():
            if values and groups[group] is not None:
                raise TypeError(
                    f"Pass either {group}_options={GROUPS[group].__name__}(...) or its keywords "
                    f"({', '.join(values)}), not both."
                )
            groups[group] = dataclasses.replace(groups[group]) if groups[group] else GROUPS[group](**values)
        method, kind = validate_settings(grad, steps, groups["forward"], groups["backward"], groups["penalty"])
        self.cell = method.prepare_cell(cell, groups["backward"], keyword_names)
        self.steps = steps
        self.grad = grad
        self.method = method()
        self.forward_options: ForwardOptions = groups["forward"]
        self.backward_options: BackwardOptions = groups["backward"]
        self.penalty_options: PenaltyOptions = groups["penalty"]
        self.penalty_kind = kind
        self.backward_stats = BackwardStats(solver=self.backward_options.solver)
        if self.penalty_options.auto:
            self.register_buffer("auto_penalty_weight", torch.tensor(float(self.penalty_options.weight), dtype=torch.float64))

    @property
    def neumann_stats(self) -> BackwardStats:
        """The backward statistics under their earlier name."""
        return self.backward_stats

    @property
    def uses_lcp(self) -> bool:
        return self.penalty_kind == "lcp"

    @property
    def uses_penalty(self) -> bool:
        return self.penalty_kind != "none"

    @property
    def penalty_weight(self) -> float:
        """The weight xi of the penalty in the loss (the adapted value with ``auto_weight``)."""
        if self.penalty_options.auto:
            return float(self.auto_penalty_weight)
        return float(self.penalty_options.weight)

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
        state = (self.cell.init_state(x) if h0 is None else h0).to(state_dtype(x))
        expected = self.cell.init_state(x[:1]).shape[1:]
        if state.shape[0] != x.shape[0] or state.shape[1:] != expected:
            raise ValueError(
                f"Initial state shape {tuple(state.shape)} does not match the drive: expected "
                f"({x.shape[0]}, {', '.join(map(str, expected))})."
            )
        if self.training and torch.is_grad_enabled():
            n = (self.steps if self.solver == "fixed" else self.max_steps) if steps is None else steps
            if n < 1:
                raise ValueError(f"steps must be >= 1; got {n}.")
            return self._train(x, state, n, return_states, tol)
        solver = self.inference_solver
        if solver == "fixed":
            n = steps if steps is not None else (self.test_steps or self.steps)
            return self._run_inference(x, state, n, self.eps if eps is None else eps, return_states, tol)
        cap = self.max_steps if steps is None else steps
        return self._run_solver_inference(x, state, cap, return_states, tol, solver)

    def evaluate(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One step of the cell, its output kept in the state's dtype (see :func:`state_dtype`)."""
        out = self.cell(x, h)
        return out if out.dtype == h.dtype else out.to(h.dtype)

    def _train(self, x, state, n, return_states, tol):
        """Let the gradient method record its graph, then add the penalty and adapt its weight."""
        states: list | None = [] if return_states else None
        step: RecordedStep = self.method.train(_TrainingRun(self, states), x, state, n, tol)
        penalty, max_column_sum = self._penalty(step, x)
        weight = self.penalty_weight
        if self.penalty_options.auto and self.training:
            new = dual_ascent_step(weight, max_column_sum, self.lcp_lambda, self.penalty_options.rate)
            self.auto_penalty_weight.fill_(new)
        rel = relative_residual(step.f_out.detach(), step.h_in.detach())
        aux = self._aux(
            penalty,
            step.solve.evals,
            _mean_abs_update(step.f_out, step.h_in),
            rel,
            states,
            tol,
            step.solve.stop,
            step.solve.per_sample,
        )
        aux.update(penalty_weight=weight, max_column_sum=max_column_sum)
        return self.cell.readout(step.output), aux

    def _penalty(self, step: RecordedStep, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The configured penalty on the last recorded step, and ``max 1^T J`` when the LCP measured it."""
        if self.penalty_kind == "lcp":
            sums = column_sums(step.f_out, step.h_in)
            return lcp_from_column_sums(sums, self.lcp_lambda), float(sums.detach().max())
        if self.penalty_kind == "jacobian":
            return jacobian_frobenius_penalty(step.f_out, step.h_in, self.penalty_options.probes), float("nan")
        return x.new_zeros(()), float("nan")

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
            "penalty_weight": self.penalty_weight,
            "max_column_sum": float("nan"),
            "steps": steps,
            "steps_per_sample": torch.full((batch,), steps, dtype=torch.long) if per_sample is None else per_sample,
            "residual": float(residual_per_sample.mean()),
            "residual_per_sample": residual_per_sample,
            "relative_residual": float(relative_per_sample.mean()),
            "relative_residual_per_sample": relative_per_sample,
            "converged": relative_per_sample < tol,
            "solver": solver or self.solver,
            "solver_stop": stop,
            "backward_stats": self.backward_stats,
            "neumann_stats": self.backward_stats,
        }
        if states is not None:
            aux["states"] = states
        return aux

    def _solve(self, x, state, cap, tol, states, solver=None) -> SolverResult:
        return solve_fixed_point(
            lambda h: self.evaluate(x, h),
            state,
            solver or self.solver,
            tol,
            cap,
            anderson_m=self.anderson_m,
            on_eval=None if states is None else lambda h: self._record(states, h),
            heavy_ball=(self.forward_options.heavy_ball_mu, self.forward_options.heavy_ball_step),
        )

    def _record(self, states: list | None, state: torch.Tensor) -> None:
        if states is not None:
            states.append(self.cell.readout(state).detach())

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
            new = self.evaluate(x, state)
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

"""Gradient methods: how a training pass of the dynamics records the graph that back-propagation uses.

A method is one class with a ``train`` method and one ``@register_gradient_method``
(:class:`JacobianFreeBackprop` below is the shortest example).

Every registered name also exists with a ``c`` prefix (``crbp``, ``cjfb``, ...): the same
method with the Lipschitz Coefficient Penalty switched on by default, as the paper names
``cbptt`` and ``crbp``. :data:`GRADS` lists every name, live from the registry.

The built-in methods:

- ``bptt``: back-propagation through every forward step (memory grows with the steps);
- ``rbp``: solve without a graph, record one step and replace the incoming gradient by the
  implicit one, ``(I - J^T)^-1 g`` (Neumann series or Anderson solve);
- ``jfb``: Jacobian-free backprop (Fung et al. 2022): as ``rbp`` with ``(I - J)^-1``
  replaced by ``I``, i.e. back-propagation through the last step only;
- ``phantom``: phantom gradients (Geng et al. 2021): from the detached solution, ``k``
  damped steps ``h <- tau F(x, h) + (1 - tau) h`` recorded with the graph; ``k = 1,
  tau = 1`` is ``jfb``.
- ``reversible``: ``n`` coupled steps (momentum or additive) through
  :class:`~rfpn.recurrent.reversible.ReversibleChain`: the exact BPTT gradient of the coupled
  dynamics in constant memory (fixed solver only).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from .options import BackwardOptions, ForwardOptions, Naming
from .solvers import SolverResult

LCP_PREFIX = "c"


class DynamicsRun(Protocol):
    """What a method may use of the dynamics it trains (see ``RecurrentDynamics``)."""

    forward_options: ForwardOptions
    backward_options: BackwardOptions
    penalty_active: bool  # a penalty will differentiate the last step with respect to its input
    cell: torch.nn.Module

    def step(self, x: torch.Tensor, h: torch.Tensor, t: int, total: int, record: bool = True) -> torch.Tensor: ...

    def solve(self, x: torch.Tensor, h: torch.Tensor, cap: int, tol: float) -> SolverResult: ...

    def record(self, h: torch.Tensor) -> None: ...

    def implicit_backward(self, f_out: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor: ...


@dataclass
class SolveInfo:
    """Counts of a forward pass: cell evaluations, why it stopped, per-sample stopping step."""

    evals: int
    stop: str
    per_sample: torch.Tensor | None

    def finish(self, recorded: int) -> "SolveInfo":
        """Add the ``recorded`` steps taken with the graph after the solve."""
        return SolveInfo(self.evals + recorded, self.stop, self.per_sample)


@dataclass
class RecordedStep:
    """A training pass: the last cell evaluation ``f_out = F(x, h_in)`` and what the task reads.

    ``h_in`` requires grad so penalties can differentiate ``f_out`` with respect to it;
    ``output`` is the state handed to the readout (``f_out``, an alias of it that carries the
    implicit gradient, or a damped state).
    """

    h_in: torch.Tensor
    f_out: torch.Tensor
    output: torch.Tensor
    solve: SolveInfo


class GradientMethod:
    """Base class: ``train`` runs training-mode dynamics and returns the :class:`RecordedStep`.

    ``n`` is the number of steps (fixed solver) or the cap on evaluations (others); ``tol``
    the relative-residual tolerance of the non-fixed solvers.
    """

    name: ClassVar[str] = ""
    through_solver: ClassVar[bool] = False  # back-propagates through every forward step
    fixed_steps: ClassVar[bool] = False  # runs exactly n steps (needs the fixed solver)
    implicit: ClassVar[bool] = False  # solves (I - J^T) u = g in backward (reports BackwardStats)

    def train(self, run: DynamicsRun, x: torch.Tensor, state: torch.Tensor, n: int, tol: float) -> RecordedStep:
        raise NotImplementedError

    @classmethod
    def prepare_cell(cls, cell: torch.nn.Module, backward: BackwardOptions, naming: Naming) -> torch.nn.Module:
        """The cell the dynamics iterate, in training and inference alike (``ValueError`` if ``cell`` cannot run)."""
        return cell


_REGISTRY: dict[str, type[GradientMethod]] = {}


def register_gradient_method(cls: type[GradientMethod]) -> type[GradientMethod]:
    """Register ``cls`` under ``cls.name`` (and, implicitly, ``"c" + cls.name`` with the LCP)."""
    name = cls.name
    if not name or name.startswith(LCP_PREFIX) and name[1:] in _REGISTRY:
        raise ValueError(f"Gradient method name {name!r} is empty or clashes with an LCP variant.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"A gradient method named {name!r} is already registered.")
    _REGISTRY[name] = cls
    return cls


def resolve_gradient_method(name: str) -> tuple[type[GradientMethod], bool]:
    """The class behind ``name`` and whether the name asks for the LCP (``c`` prefix)."""
    if name in _REGISTRY:
        return _REGISTRY[name], False
    if name.startswith(LCP_PREFIX) and name[1:] in _REGISTRY:
        return _REGISTRY[name[1:]], True
    raise ValueError(f"Unknown gradient method {name!r}; allowed values: {', '.join(GRADS)}.")


class _RegisteredNames(Sequence):
    """Every gradient method name, read from the registry when used (so later registrations count)."""

    def _names(self) -> tuple[str, ...]:
        return tuple(n for base in _REGISTRY for n in (base, LCP_PREFIX + base))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(name == n for n in self._names())

    def __repr__(self) -> str:
        return repr(self._names())


GRADS: Sequence[str] = _RegisteredNames()


def presolve(run: DynamicsRun, x: torch.Tensor, state: torch.Tensor, evals: int, total: int, tol: float,
             recorded: int) -> tuple[torch.Tensor, SolveInfo]:
    """Run ``evals`` evaluations (fixed) or solve with that cap (other solvers) without a graph.

    ``total`` is the step count named in error messages; ``recorded`` the graph steps that will
    follow, which shift the per-sample stopping steps of a converged solve.
    """
    fixed = run.forward_options.solver == "fixed"
    if fixed:
        with torch.no_grad():
            for t in range(1, evals + 1):
                state = run.step(x, state, t, total)
        return state, SolveInfo(max(evals, 0), "fixed", None)
    if evals < 1:
        return state, SolveInfo(0, "max_steps", None)
    with torch.no_grad():
        result = run.solve(x, state, evals, tol)
    return result.image, SolveInfo(result.evals, result.stop_reason, result.steps_per_sample + recorded)


@register_gradient_method
class BackpropThroughTime(GradientMethod):
    """``bptt``: back-propagate through plain iteration (``fixed`` or ``iterate``, not ``anderson``)."""

    name = "bptt"
    through_solver = True

    def train(self, run, x, state, n, tol):
        if run.penalty_active and not state.requires_grad:
            state = state.detach().requires_grad_()
        result = run.solve(x, state, n, tol)
        fixed = run.forward_options.solver == "fixed"
        info = SolveInfo(result.evals, "fixed" if fixed else result.stop_reason, None if fixed else result.steps_per_sample)
        return RecordedStep(result.state, result.image, result.image, info)


def solve_then_step(run: DynamicsRun, x, state, n, tol) -> tuple[torch.Tensor, torch.Tensor, SolveInfo]:
    """Solve without a graph for ``n - 1`` evaluations, then one step from a detached leaf."""
    state, solve = presolve(run, x, state, n - 1, n, tol, recorded=1)
    h_in = state.detach().requires_grad_()
    total = solve.evals + 1 if run.forward_options.solver == "fixed" else n
    f_out = run.step(x, h_in, solve.evals + 1, total)
    return h_in, f_out, solve.finish(1)


@register_gradient_method
class RecurrentBackprop(GradientMethod):
    """``rbp``: the implicit gradient at the solved point, through one recorded step."""

    name = "rbp"
    implicit = True

    def train(self, run, x, state, n, tol):
        h_in, f_out, solve = solve_then_step(run, x, state, n, tol)
        return RecordedStep(h_in, f_out, run.implicit_backward(f_out, h_in), solve)


@register_gradient_method
class JacobianFreeBackprop(GradientMethod):
    """``jfb``: back-propagate through the last step only, ``(I - J)^-1`` replaced by ``I``."""

    name = "jfb"

    def train(self, run, x, state, n, tol):
        h_in, f_out, solve = solve_then_step(run, x, state, n, tol)
        return RecordedStep(h_in, f_out, f_out, solve)


@register_gradient_method
class PhantomGradient(GradientMethod):
    """``phantom``: ``k`` damped steps ``h <- tau F(x, h) + (1 - tau) h`` from the detached solution.

    The solve uses ``n - k`` evaluations (``fixed``) or a cap of ``n - k``, so the pass costs
    ``n`` evaluations like the other methods.
    """

    name = "phantom"

    def train(self, run, x, state, n, tol):
        k, tau = run.backward_options.phantom_steps, run.backward_options.phantom_tau
        state, solve = presolve(run, x, state, max(n - k, 0), n, tol, recorded=k)
        h = state.detach().requires_grad_()
        total = solve.evals + k if run.forward_options.solver == "fixed" else max(n, k)
        for j in range(1, k + 1):
            h_in = h
            f_out = run.step(x, h_in, solve.evals + j, total, record=False)
            h = tau * f_out + (1.0 - tau) * h_in if tau != 1.0 else f_out
            run.record(h)
        return RecordedStep(h_in, f_out, h, solve.finish(k))


@register_gradient_method
class Reversible(GradientMethod):
    """``reversible``: the exact gradient of ``n`` coupled steps, memory flat in ``n``.

    ``coupling="momentum"`` wraps the cell in a :class:`~rfpn.recurrent.momentum.StateMomentumCell`
    with ``mu = gamma``, ``s = 1 - gamma`` (unless it is one already), so inference iterates the
    same coupled dynamics that training inverts; ``"additive"`` needs an
    :class:`~rfpn.recurrent.reversible.AdditiveCouplingCell`.
    """

    name = "reversible"
    fixed_steps = True

    @classmethod
    def prepare_cell(cls, cell, backward, naming):
        from .momentum import StateMomentumCell
        from .reversible import AdditiveCouplingCell, exact_gamma

        if backward.coupling == "additive":
            if not isinstance(cell, AdditiveCouplingCell):
                raise ValueError(
                    f"{backward.field_name('coupling', naming)}='additive' inverts a cell made of two half-width "
                    f"cells; got a {type(cell).__name__}. Build the cell as AdditiveCouplingCell(make_half_cell, "
                    "channels) (the config does this for GRAD reversible) or use coupling 'momentum'."
                )
            return cell
        if isinstance(cell, StateMomentumCell) and cell.mu > 0:
            return cell
        gamma = exact_gamma(backward.reversible_gamma) if backward.reversible_exact else backward.reversible_gamma
        return StateMomentumCell(cell, gamma, 1.0 - gamma)

    def train(self, run, x, state, n, tol):
        from .reversible import reversible_chain, reversible_momentum, running_stats_frozen

        cell, exact = run.cell, run.backward_options.reversible_exact
        if run.backward_options.coupling == "additive":
            end = reversible_chain([cell] * n, x, *cell.split(state), exact=exact)
            inner = cell
        else:
            h0, v0 = cell.split(state)
            end = reversible_momentum(cell.cell, x, h0, n, cell.mu, cell.s, v0=v0, exact=exact)
            inner = cell.cell
        output = torch.cat(end, 1)
        # The penalty and the residual statistics: one more evaluation of the cell at the reached state (the
        # momentum coupling's inner cell, whose contraction the LCP is about), with a graph only for a penalty.
        h_in = (output if inner is cell else end[0]).detach().requires_grad_(run.penalty_active)
        with torch.set_grad_enabled(run.penalty_active), running_stats_frozen(cell):
            f_out = inner(x, h_in).to(h_in.dtype)
        run.record(output)
        return RecordedStep(h_in, f_out, output, SolveInfo(n, "fixed", None))

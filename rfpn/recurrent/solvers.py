"""Forward fixed-point solvers for ``h = F(x, h)`` on batched states ``(B, ...)``.

- ``fixed``: exactly N steps of ``h <- F(h)`` (handled by :class:`RecurrentDynamics`).
- ``iterate``: plain iteration until every sample's relative residual
  ``|F(h) - h| / |F(h)|`` (L2 norms over the sample) is below ``tol``, or a step cap.
- ``anderson``: Anderson acceleration (type II) with the same stopping rule: each step
  extrapolates from the last ``m`` iterates by a per-sample regularised least-squares fit
  of their residuals, then evaluates F once.
- ``heavyball``: Polyak's heavy-ball iteration ``h <- h + s (F(h) - h) + mu (h - h_prev)``, the state
  momentum of :mod:`rfpn.recurrent.momentum` applied as a solver, with the same stopping rule;
  ``mu`` and ``s`` are given or set by :func:`~rfpn.recurrent.momentum.heavy_ball_parameters` from
  the contraction rate measured on the first plain steps.

Why not torchdeq: its solvers stop on the batch maximum but return, per sample, the
iterate with the lowest residual seen, drawn from different iterations. Under
batch-statistics norms F couples the samples, so such a mixture is not a state the batch
ever had; they also pass non-finite values on silently and use an absolute regulariser
that does not scale with the residuals. The solvers here always evaluate F on the whole
batch, return the last iterate, raise on non-finite states naming the step, scale the
regulariser to the residuals and fall back to a plain step where the fit fails.

Under autocast the cells compute in bf16/fp16, whose rounding leaves the relative residual
stalled near the dtype's unit roundoff (bf16: 2^-8). A solve asked for less than twice that
finishes in float32: once every sample is below :func:`full_precision_threshold`, the remaining
evaluations run with autocast off, so it stops where a float32 solve would, not at its cap.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .momentum import heavy_ball_parameters
from .options import SOLVERS
StepFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolverResult:
    """Outcome of a forward solve.

    ``state`` is the last point F was evaluated at and ``image`` = F(state), the solver's
    answer. Per-sample tensors (shape ``(B,)``): ``relative_residual`` =
    ``|image - state| / |image|``, ``mean_abs_update`` = mean ``|image - state|``,
    ``converged`` (``relative_residual < tol``) and ``steps_per_sample``: the function
    evaluation from which on the sample stayed below ``tol`` (``evals`` if it never did).
    ``evals`` counts evaluations of F on the batch, ``full_precision_evals`` those of them run
    with autocast off (see :func:`full_precision_threshold`); ``stop_reason`` is ``"converged"``
    (every sample below ``tol``) or ``"max_steps"``.
    """

    state: torch.Tensor
    image: torch.Tensor
    evals: int
    steps_per_sample: torch.Tensor
    relative_residual: torch.Tensor
    mean_abs_update: torch.Tensor
    converged: torch.Tensor
    stop_reason: str
    full_precision_evals: int = 0


def relative_residual(image: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|image - state|_2 / |image|_2``, shape ``(B,)``."""
    diff = (image - state).flatten(1).norm(dim=1)
    scale = image.flatten(1).norm(dim=1).clamp_min(torch.finfo(image.dtype).tiny)
    return diff / scale


def full_precision_threshold(tol: float, device_type: str) -> float | None:
    """The relative residual below which a solve to ``tol`` continues in float32 under autocast, or None.

    Reduced-precision cells know ``F(h)`` only to about the unit roundoff ``u`` (bf16 2^-8, fp16
    2^-11), so a residual below about ``u`` is rarely reached: measured on a trained bf16 Pathfinder
    hGRU, Anderson stalled at 1.4e-3 to 1.9e-3 where float32 reached 1e-3 in 24 steps. Tolerances
    below ``2u`` therefore switch to float32 at ``2u``; there the same solves reached 1e-3 in 27 to
    30 evaluations, 10 to 13 of them in float32 (switching at ``u``: 36 to 40; at ``4u``: 25 to 26 with 15 to 17).
    """
    if not torch.is_autocast_enabled(device_type):
        return None
    return full_precision_switch(tol, torch.get_autocast_dtype(device_type))


def full_precision_switch(tol: float, dtype: torch.dtype) -> float | None:
    """Where a solve to ``tol`` in ``dtype`` cells moves to float32 (twice the unit roundoff), or None when ``dtype`` resolves ``tol``."""
    switch = torch.finfo(dtype).eps
    return switch if 0 < tol < switch else None


def check_finite(state: torch.Tensor, step: int, total: int, solver: str = "fixed") -> None:
    """Raise ``FloatingPointError`` naming the step if ``state`` holds NaN or inf.

    A finite sum proves every entry finite at the cost of one reduction; only a
    non-finite sum pays for the elementwise check (a huge but finite state can overflow it).
    """
    if not torch.isfinite(state.detach().sum()) and not torch.isfinite(state).all():
        via = "" if solver == "fixed" else f" ({solver} solver)"
        raise FloatingPointError(
            f"Non-finite recurrent state at step {step} of {total}{via}. The dynamics diverged: lower the "
            "learning rate, raise the LCP weight, or lower LCP_LAMBDA."
        )


class AndersonMixer:
    """Per-sample Anderson extrapolation over rows of ``(B, D)`` tensors.

    Keeps the last ``m`` differences of iterates ``dX`` and of residuals ``dG``
    (``G = F(x) - x``) and returns ``x + beta G - (dX + beta dG) gamma`` with ``gamma``
    minimising ``|G - dG gamma|^2 + lam * mean(diag(dG dG^T)) |gamma|^2`` for each row.
    The ridge term scales with the residuals, so the fit stays well-posed when the
    history is nearly collinear or tiny; rows whose fit or extrapolation is not finite
    take the plain step ``x + beta G`` instead.
    """

    def __init__(self, m: int = 5, lam: float = 1e-4, beta: float = 1.0):
        if m < 1:
            raise ValueError(f"Anderson history m must be >= 1; got {m}.")
        if lam <= 0:
            raise ValueError(f"Anderson regularisation lam must be > 0; got {lam}.")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"Anderson mixing beta must lie in (0, 1]; got {beta}.")
        self.m, self.lam, self.beta = m, lam, beta
        self.count = 0
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dx = self.dg = self.gram = torch.empty(0)

    def step(self, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """Next iterate from the current one ``x`` and its image ``fx`` (both ``(B, D)``).

        Each call reads the history a few times (Gram row and right-hand side in one
        product, the extrapolation in two) and keeps the small Gram matrix up to date. The
        products run in the iterates' dtype even under autocast (the fit needs float32).
        """
        with torch.autocast(x.device.type, enabled=False):
            return self._step(x, fx)

    def _step(self, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        g = fx - x
        plain = x + self.beta * g
        if self.prev is None:
            self.prev = (x, g)
            return plain
        if self.count == 0:
            self.dx = x.new_zeros(x.shape[0], self.m, x.shape[1])
            self.dg = x.new_zeros(x.shape[0], self.m, x.shape[1])
            self.gram = torch.zeros(x.shape[0], self.m, self.m, dtype=torch.float64, device=x.device)
        slot = self.count % self.m
        self.dx[:, slot] = x - self.prev[0]
        self.dg[:, slot] = g - self.prev[1]
        self.prev = (x, g)
        self.count += 1
        k = min(self.count, self.m)
        dx, dg = self.dx[:, :k], self.dg[:, :k]
        products = torch.bmm(torch.stack([g, self.dg[:, slot]], 1), dg.transpose(1, 2)).double()  # (B, 2, k)
        self.gram[:, slot, :k] = products[:, 1]
        self.gram[:, :k, slot] = products[:, 1]
        gram = self.gram[:, :k, :k]
        ridge = self.lam * gram.diagonal(dim1=1, dim2=2).mean(1) + torch.finfo(torch.float64).tiny
        eye = torch.eye(k, dtype=torch.float64, device=x.device)
        gamma = torch.linalg.solve(gram + ridge.view(-1, 1, 1) * eye, products[:, 0].unsqueeze(2)).to(x.dtype)
        weights = gamma.transpose(1, 2)  # (B, 1, k)
        mixed = torch.baddbmm(plain.unsqueeze(1), weights, dx, alpha=-1.0)
        mixed = torch.baddbmm(mixed, weights, dg, alpha=-self.beta).squeeze(1)
        ok = torch.isfinite(mixed.sum(1)) & torch.isfinite(gamma).flatten(1).all(1)
        return mixed if bool(ok.all()) else torch.where(ok.unsqueeze(1), mixed, plain)


class HeavyBall:
    """Heavy-ball steps over rows of ``(B, D)`` tensors: ``x + s (F(x) - x) + mu (x - x_prev)``.

    With ``mu``/``s`` None the first ``warmup`` steps are plain (``x <- F(x)``); the median over
    samples of the last ratio of successive residual norms estimates the contraction rate ``rho``,
    and :func:`heavy_ball_parameters` turns it into ``(mu, s)`` (the optimum for a Jacobian with its
    spectrum in ``[-rho, rho]``). The rule sees only the first steps, never the solve's outcome; early
    ratios underestimate ``rho`` when the spectrum is spread (on a linear map with eigenvalues spread
    over [-0.95, 0.95] it reaches 1e-8 in 170 evaluations, plain iteration in 299, the true ``rho`` in 62).
    """

    def __init__(self, mu: float | None = None, s: float | None = None, warmup: int = 5):
        if (mu is None) != (s is None):
            raise ValueError("heavy-ball mu and s are set together, or both chosen by the rule (None).")
        self.mu, self.s, self.warmup = mu, s, warmup
        self.prev: torch.Tensor | None = None
        self.norms: list[torch.Tensor] = []

    def step(self, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            g = fx - x
            if self.mu is None:
                self.norms.append(g.norm(dim=1))
                if len(self.norms) < max(self.warmup, 2):
                    self.prev = x
                    return fx
                ratio = self.norms[-1] / self.norms[-2].clamp_min(torch.finfo(g.dtype).tiny)
                self.mu, self.s = heavy_ball_parameters(float(ratio.median()))
            nxt = x + self.s * g
            if self.prev is not None:
                nxt = nxt + self.mu * (x - self.prev)
            self.prev = x
            return nxt


def solve_fixed_point(
    f: StepFn,
    x0: torch.Tensor,
    solver: str,
    tol: float,
    max_steps: int,
    anderson_m: int = 5,
    anderson_lam: float = 1e-4,
    anderson_beta: float = 1.0,
    on_eval: Callable[[torch.Tensor], None] | None = None,
    heavy_ball: tuple[float | None, float | None] = (None, None),
) -> SolverResult:
    """Solve ``h = f(h)`` from ``x0`` with ``solver`` in :data:`SOLVERS`.

    Every step evaluates ``f`` once on the whole batch (``f`` may couple samples, as
    batch-statistics norms do); the solve stops when every sample's relative residual is
    below ``tol`` or after ``max_steps`` evaluations (``fixed`` or ``tol=0``: always
    ``max_steps``). ``on_eval`` sees each image (for recording states). With autograd on,
    the graph runs through every step (plain iteration only: back-propagating through
    Anderson's fit or heavy-ball's extrapolation is not supported). ``heavy_ball`` is ``(mu, s)``
    of the ``heavyball`` solver (``(None, None)``: by :class:`HeavyBall`'s rule). Raises ``FloatingPointError`` naming the step on
    NaN or inf.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown fixed-point solver {solver!r}; allowed values: {', '.join(SOLVERS)}.")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1; got {max_steps}.")
    if tol < 0:
        raise ValueError(f"tol must be >= 0 (0 runs all max_steps); got {tol}.")
    if solver == "anderson":
        mixer: AndersonMixer | HeavyBall | None = AndersonMixer(anderson_m, anderson_lam, anderson_beta)
    else:
        mixer = HeavyBall(*heavy_ball) if solver == "heavyball" else None
    batch = x0.shape[0]
    steps = torch.ones(batch, dtype=torch.long, device=x0.device)
    device_type = x0.device.type
    switch = full_precision_threshold(tol, device_type) if solver != "fixed" else None
    full_precision_evals, precise = 0, False
    x = x0
    for t in range(1, max_steps + 1):
        with torch.autocast(device_type, enabled=False) if precise else contextlib.nullcontext():
            fx = f(x)
        full_precision_evals += precise
        check_finite(fx, t, max_steps, solver)
        if mixer is not None and fx.requires_grad:
            raise ValueError(
                f"The {solver} solver runs without an autograd graph: call it under torch.no_grad() "
                "(RBP/C-RBP do), or use the iterate solver to back-propagate through the steps."
            )
        if on_eval is not None:
            on_eval(fx)
        rel = relative_residual(fx.detach(), x.detach())
        below = rel < tol if solver != "fixed" else torch.zeros_like(rel, dtype=torch.bool)
        steps = torch.where(below, steps, torch.full_like(steps, t + 1))
        if bool(below.all()) or t == max_steps:
            break
        precise = precise or (switch is not None and bool((rel < switch).all()))
        x = fx if mixer is None else mixer.step(x.flatten(1), fx.flatten(1)).view_as(x0)
    return SolverResult(
        state=x,
        image=fx,
        evals=t,
        steps_per_sample=steps.clamp_max(t).cpu(),
        relative_residual=rel,
        mean_abs_update=(fx.detach() - x.detach()).abs().flatten(1).mean(1),
        converged=below,
        stop_reason="converged" if bool(below.all()) else "max_steps",
        full_precision_evals=full_precision_evals,
    )

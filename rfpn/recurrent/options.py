"""The settings of :class:`~rfpn.recurrent.RecurrentDynamics`, grouped and validated in one place.

- :class:`ForwardOptions`: how the state is driven towards its fixed point (solver, tolerance,
  caps, inference steps);
- :class:`BackwardOptions`: how a gradient method forms its backward (Neumann series or
  Anderson solve for the implicit methods, damped steps for phantom gradients);
- :class:`PenaltyOptions`: the stability penalty (LCP or the Jacobian regulariser), its weight
  and its automatic adaptation.

Every field names its keyword of the flat ``RecurrentDynamics(...)`` API (``kw``) and its
``MODEL.RECURRENT`` config key (``key``), so an error names whichever the user wrote:
``validate(naming)`` takes ``keyword_names`` or ``config_names("MODEL.RECURRENT")``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

SOLVERS = ("fixed", "iterate", "anderson", "heavyball")
EXTRAPOLATING_SOLVERS = ("anderson", "heavyball")  # their iterates are not the model's recurrence
BACKWARD_SOLVERS = ("neumann", "anderson")
PENALTIES = ("none", "lcp", "jacobian")
COUPLINGS = ("momentum", "additive")

Naming = Callable[[Any], str]


def _opt(default: Any, kw: str, key: str, help: str) -> Any:
    return field(default=default, metadata={"kw": kw, "key": key, "help": help})


def keyword_names(f) -> str:
    """Name fields by their keyword in the flat ``RecurrentDynamics`` API."""
    return f.metadata["kw"]


def config_names(prefix: str) -> Naming:
    """Name fields by their config key under ``prefix`` (e.g. ``"MODEL.RECURRENT"``)."""
    return lambda f: f"{prefix}.{f.metadata['key']}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Validated:
    """Checks declared as ``{field: (predicate, allowed text)}``; the first failure raises."""

    CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {}

    def validate(self, naming: Naming = keyword_names) -> None:
        by_name = {f.name: f for f in fields(self)}
        for name, (ok, allowed) in self.CHECKS.items():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"{naming(by_name[name])}={value!r} is not valid; allowed values: {allowed}.")

    def field_name(self, name: str, naming: Naming) -> str:
        return naming(next(f for f in fields(self) if f.name == name))


def _choice(*allowed: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), ", ".join(allowed)


@dataclass
class ForwardOptions(_Validated):
    """How the forward pass runs: a fixed number of steps, or a solve to a tolerance."""

    solver: str = _opt("fixed", "solver", "SOLVER", "fixed | iterate | anderson")
    tol: float = _opt(1e-4, "tol", "TOL", "iterate/anderson stop once every sample's relative residual < tol")
    max_steps: int = _opt(100, "max_steps", "MAX_STEPS", "cap on cell evaluations of iterate/anderson")
    anderson_m: int = _opt(5, "anderson_m", "ANDERSON_M", "Anderson history (forward and backward)")
    test_solver: str | None = _opt(None, "test_solver", "TEST_SOLVER", "inference solver; '' or None reuses solver")
    test_steps: int | None = _opt(None, "test_steps", "TEST_STEPS", "inference steps of fixed; 0 or None reuses steps")
    eps: float = _opt(0.0, "eps", "EPS", "fixed inference: a sample stops once mean |h_{t+1} - h_t| < eps")
    heavy_ball_mu: float | None = _opt(None, "heavy_ball_mu", "HEAVY_BALL_MU", "heavyball momentum; None/< 0: by rule")
    heavy_ball_step: float | None = _opt(None, "heavy_ball_step", "HEAVY_BALL_STEP", "heavyball step; None/< 0: by rule")

    CHECKS = {
        "solver": _choice(*SOLVERS),
        "test_solver": ((lambda v: v is None or v in SOLVERS), "'' or None (reuse the solver), " + ", ".join(SOLVERS)),
        "tol": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
        "max_steps": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "anderson_m": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "test_steps": ((lambda v: v is None or (_is_int(v) and v >= 1)), "0 or None (reuse steps), an integer >= 1"),
        "eps": ((lambda v: _is_number(v) and v >= 0), "a number >= 0"),
        "heavy_ball_mu": ((lambda v: v is None or (_is_number(v) and 0 <= v < 1)), "a negative number (by rule), or [0, 1)"),
        "heavy_ball_step": ((lambda v: v is None or (_is_number(v) and 0 < v < 2)), "a negative number (by rule), or (0, 2)"),
    }

    def __post_init__(self) -> None:
        self.test_solver = self.test_solver or None
        self.test_steps = None if self.test_steps == 0 else self.test_steps
        for name in ("heavy_ball_mu", "heavy_ball_step"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                setattr(self, name, None)

    def validate(self, naming: Naming = keyword_names) -> None:
        super().validate(naming)
        if (self.heavy_ball_mu is None) != (self.heavy_ball_step is None):
            raise ValueError(
                f"{self.field_name('heavy_ball_mu', naming)} and {self.field_name('heavy_ball_step', naming)} are set "
                "together; allowed values: both negative (chosen by rule) or both given."
            )


@dataclass
class BackwardOptions(_Validated):
    """How a gradient method forms its backward pass (each method reads the fields it needs)."""

    solver: str = _opt("neumann", "backward_solver", "BACKWARD_SOLVER", "implicit backward: neumann | anderson")
    neumann_steps: int = _opt(15, "neumann_steps", "NEUMANN_STEPS", "max terms of the Neumann series")
    norm_cap: float = _opt(100.0, "neumann_norm_cap", "NEUMANN_NORM_CAP", "stop once |u| would pass norm_cap * |g|")
    neumann_tol: float = _opt(0.0, "neumann_tol", "NEUMANN_TOL", "stop once a term is below neumann_tol * |g|")
    tol: float = _opt(1e-5, "backward_tol", "BACKWARD_TOL", "anderson backward: relative residual to reach")
    max_steps: int = _opt(50, "backward_max_steps", "BACKWARD_MAX_STEPS", "anderson backward: cap on VJPs")
    anderson_m: int = _opt(5, "anderson_m", "ANDERSON_M", "Anderson history of the backward solve")
    phantom_steps: int = _opt(5, "phantom_steps", "PHANTOM_STEPS", "phantom: damped steps recorded with the graph")
    phantom_tau: float = _opt(0.5, "phantom_tau", "PHANTOM_TAU", "phantom: damping tau of h <- tau F + (1-tau) h")
    coupling: str = _opt("momentum", "coupling", "COUPLING", "reversible: how a step is made invertible")
    reversible_gamma: float = _opt(0.9, "reversible_gamma", "REVERSIBLE_GAMMA", "reversible momentum coupling gamma")
    reversible_exact: bool = _opt(False, "reversible_exact", "REVERSIBLE_EXACT", "reversible: fixed-point, bit-exact inverse")

    CHECKS = {
        "solver": _choice(*BACKWARD_SOLVERS),
        "neumann_steps": ((lambda v: _is_int(v) and v >= 0), "an integer >= 0"),
        "norm_cap": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
        "neumann_tol": ((lambda v: _is_number(v) and v >= 0), "a number >= 0"),
        "tol": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
        "max_steps": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "anderson_m": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "phantom_steps": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "phantom_tau": ((lambda v: _is_number(v) and 0 < v <= 1), "a number in (0, 1]"),
        "coupling": _choice(*COUPLINGS),
        "reversible_gamma": ((lambda v: _is_number(v) and 0 < v < 1), "a number in (0, 1)"),
        "reversible_exact": ((lambda v: isinstance(v, bool)), "True or False"),
    }


@dataclass
class PenaltyOptions(_Validated):
    """The stability penalty added to the loss as ``weight * aux["penalty"]``.

    ``kind=None`` takes the gradient method's default (the LCP for ``cbptt``/``crbp`` and the
    other ``c``-prefixed names, none otherwise). With ``auto``, ``weight`` is only the
    starting value of a multiplier adapted by dual ascent (see :mod:`rfpn.recurrent.penalty`).
    """

    kind: str | None = _opt(None, "penalty", "PENALTY", "none | lcp | jacobian; '' or None: the method's default")
    weight: float = _opt(1.0, "penalty_weight", "LCP_WEIGHT", "weight xi of the penalty (start value with auto)")
    lcp_lambda: float = _opt(0.9, "lcp_lambda", "LCP_LAMBDA", "contraction target lambda of the LCP")
    probes: int = _opt(1, "jacobian_probes", "JACOBIAN_PROBES", "Gaussian probes of the Jacobian regulariser")
    auto: bool = _opt(False, "auto_weight", "LCP_WEIGHT_AUTO", "adapt the weight so max(1^T J) <= lambda")
    rate: float = _opt(0.1, "auto_rate", "LCP_WEIGHT_RATE", "auto: largest change of log(weight) per step")

    CHECKS = {
        "kind": ((lambda v: v is None or v in PENALTIES), "'' or None (the method's default), " + ", ".join(PENALTIES)),
        "weight": ((lambda v: _is_number(v) and v >= 0), "a number >= 0"),
        "lcp_lambda": ((lambda v: _is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
        "probes": ((lambda v: _is_int(v) and v >= 1), "an integer >= 1"),
        "auto": ((lambda v: isinstance(v, bool)), "True, False"),
        "rate": ((lambda v: _is_number(v) and v > 0), "a number > 0"),
    }

    def __post_init__(self) -> None:
        self.kind = self.kind or None


GROUPS: dict[str, type[_Validated]] = {"forward": ForwardOptions, "backward": BackwardOptions, "penalty": PenaltyOptions}


def flat_keywords() -> dict[str, list[tuple[str, str]]]:
    """``{flat keyword: [(group, field), ...]}``; ``anderson_m`` sets both solves' history."""
    table: dict[str, list[tuple[str, str]]] = {}
    for group, cls in GROUPS.items():
        for f in fields(cls):
            table.setdefault(f.metadata["kw"], []).append((group, f.name))
    return table


def split_flat_keywords(kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sort flat keywords into ``{group: {field: value}}``; an unknown keyword is a ``TypeError``."""
    table = flat_keywords()
    grouped: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for kw, value in kwargs.items():
        if kw not in table:
            raise TypeError(f"RecurrentDynamics got an unexpected keyword argument {kw!r}; known: {', '.join(sorted(table))}.")
        for group, name in table[kw]:
            grouped[group][name] = value
    return grouped

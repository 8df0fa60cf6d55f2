"""rfpn.recurrent: recurrent cells, their dynamics and constant-memory gradients.

Pure PyTorch (no Detectron2), usable on its own::

    from rfpn.recurrent import HGRUCell, RecurrentDynamics
    dyn = RecurrentDynamics(HGRUCell(16, 7), steps=20, grad="crbp")
    h, aux = dyn(x)
    loss = task_loss(h) + aux["penalty_weight"] * aux["penalty"]

Gradient methods are registered classes (:mod:`rfpn.recurrent.methods`); a new one is one
class plus ``@register_gradient_method``.
"""
from .cells import GATES, NORMS, ConvLSTMCell, HGRUCell, make_norm
from .diagnostics import SpectralNormEstimate, capture_last_step, fixed_point_diagnostics, jacobian_spectral_norm
from .dynamics import RecurrentDynamics, validate_settings
from .gradients import BackwardStats, anderson_adjoint_solve, attach_implicit_backward, neumann_solve
from .memory import SavedTensorCounter, saved_tensor_bytes
from .momentum import (
    ConvMomentumLSTMCell,
    MomentumLSTMCell,
    StateMomentumCell,
    heavy_ball_parameters,
    momentum_inverse,
    momentum_step,
)
from .methods import (
    GRADS,
    GradientMethod,
    RecordedStep,
    presolve,
    register_gradient_method,
    resolve_gradient_method,
    solve_then_step,
)
from .reversible import (
    AdditiveCoupling,
    AdditiveCouplingCell,
    Coupling,
    MomentumCoupling,
    ReversibleChain,
    reversible_chain,
)
from .options import BACKWARD_SOLVERS, PENALTIES, SOLVERS, BackwardOptions, ForwardOptions, PenaltyOptions
from .penalty import column_sums, dual_ascent_step, jacobian_frobenius_penalty, lcp_penalty
from .solvers import (
    AndersonMixer,
    HeavyBall,
    SolverResult,
    full_precision_switch,
    full_precision_threshold,
    relative_residual,
    solve_fixed_point,
)

__all__ = [
    "AdditiveCoupling",
    "AdditiveCouplingCell",
    "Coupling",
    "MomentumCoupling",
    "ReversibleChain",
    "reversible_chain",
    "BACKWARD_SOLVERS",
    "GATES",
    "GRADS",
    "NORMS",
    "PENALTIES",
    "SOLVERS",
    "AndersonMixer",
    "BackwardOptions",
    "BackwardStats",
    "ConvLSTMCell",
    "ConvMomentumLSTMCell",
    "ForwardOptions",
    "GradientMethod",
    "HGRUCell",
    "HeavyBall",
    "MomentumLSTMCell",
    "PenaltyOptions",
    "RecordedStep",
    "RecurrentDynamics",
    "SavedTensorCounter",
    "SolverResult",
    "SpectralNormEstimate",
    "StateMomentumCell",
    "anderson_adjoint_solve",
    "attach_implicit_backward",
    "capture_last_step",
    "column_sums",
    "full_precision_switch",
    "full_precision_threshold",
    "dual_ascent_step",
    "fixed_point_diagnostics",
    "heavy_ball_parameters",
    "jacobian_frobenius_penalty",
    "jacobian_spectral_norm",
    "lcp_penalty",
    "make_norm",
    "momentum_inverse",
    "momentum_step",
    "neumann_solve",
    "presolve",
    "register_gradient_method",
    "relative_residual",
    "resolve_gradient_method",
    "saved_tensor_bytes",
    "solve_fixed_point",
    "solve_then_step",
    "validate_settings",
]

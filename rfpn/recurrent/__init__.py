"""rfpn.recurrent: recurrent cells, their dynamics and constant-memory gradients.

Pure PyTorch (no Detectron2), usable on its own::

    from rfpn.recurrent import HGRUCell, RecurrentDynamics
    dyn = RecurrentDynamics(HGRUCell(16, 7), steps=20, grad="crbp")
    h, aux = dyn(x)
    loss = task_loss(h) + xi * aux["penalty"]
"""
from .cells import GATES, NORMS, ConvLSTMCell, HGRUCell, make_norm
from .diagnostics import SpectralNormEstimate, capture_last_step, fixed_point_diagnostics, jacobian_spectral_norm
from .dynamics import GRADS, RecurrentDynamics
from .gradients import (
    BACKWARD_SOLVERS,
    NeumannStats,
    anderson_adjoint_solve,
    attach_implicit_backward,
    neumann_solve,
)
from .memory import SavedTensorCounter, saved_tensor_bytes
from .penalty import column_sums, lcp_penalty
from .solvers import SOLVERS, AndersonMixer, SolverResult, relative_residual, solve_fixed_point

__all__ = [
    "BACKWARD_SOLVERS",
    "GATES",
    "GRADS",
    "NORMS",
    "SOLVERS",
    "AndersonMixer",
    "ConvLSTMCell",
    "HGRUCell",
    "NeumannStats",
    "RecurrentDynamics",
    "SavedTensorCounter",
    "SolverResult",
    "SpectralNormEstimate",
    "anderson_adjoint_solve",
    "attach_implicit_backward",
    "capture_last_step",
    "column_sums",
    "fixed_point_diagnostics",
    "jacobian_spectral_norm",
    "lcp_penalty",
    "make_norm",
    "neumann_solve",
    "relative_residual",
    "saved_tensor_bytes",
    "solve_fixed_point",
]

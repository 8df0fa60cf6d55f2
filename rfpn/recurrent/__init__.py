"""rfpn.recurrent: recurrent cells, their dynamics and constant-memory gradients.

Pure PyTorch (no Detectron2), usable on its own::

    from rfpn.recurrent import HGRUCell, RecurrentDynamics
    dyn = RecurrentDynamics(HGRUCell(16, 7), steps=20, grad="crbp")
    h, aux = dyn(x)
    loss = task_loss(h) + xi * aux["penalty"]
"""
from .cells import GATES, NORMS, ConvLSTMCell, HGRUCell, make_norm
from .dynamics import GRADS, RecurrentDynamics
from .gradients import NeumannStats, attach_implicit_backward, neumann_solve
from .memory import SavedTensorCounter, saved_tensor_bytes
from .penalty import column_sums, lcp_penalty

__all__ = [
    "GATES",
    "GRADS",
    "NORMS",
    "ConvLSTMCell",
    "HGRUCell",
    "NeumannStats",
    "RecurrentDynamics",
    "SavedTensorCounter",
    "attach_implicit_backward",
    "column_sums",
    "lcp_penalty",
    "make_norm",
    "neumann_solve",
    "saved_tensor_bytes",
]

"""rfpn: recurrent vision models trained in constant memory (C-RBP) for Detectron2.

``import rfpn`` registers the Detectron2 parts (meta-architectures, heads, backbones, datasets,
evaluators, and the ``rfpn://`` scheme of the shipped checkpoints). ``rfpn.recurrent`` is plain PyTorch and imports without Detectron2.
"""
from importlib.util import find_spec

__version__ = "0.1.0"

if find_spec("detectron2") is not None:
    from . import config, data, evaluation, model_zoo, modeling  # noqa: F401  (import registers the Detectron2 parts)

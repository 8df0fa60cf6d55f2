"""Config plus weights to a model ready for evaluation, with one-line errors (for tools and tests)."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from rfpn.engine.checkpoint import CheckedCheckpointer

from .cli import UsageError, load_config

__all__ = ["build_eval_model", "load_eval_model"]


def build_eval_model(cfg: CfgNode, weights: str | None = None) -> torch.nn.Module:
    """``cfg``'s model with ``weights`` (default ``cfg.MODEL.WEIGHTS``; ``""``: none) loaded strictly, in eval mode."""
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    model = build_model(cfg)
    if weights:
        CheckedCheckpointer(model, partial=cfg.MODEL.ALLOW_PARTIAL_WEIGHTS).load(weights)
    return model.eval()


def load_eval_model(
    config_file: str,
    weights: str,
    opts: Sequence[str] = (),
    meta_architecture: str | None = None,
    check: Callable[[CfgNode], None] | None = None,
) -> tuple[CfgNode, torch.nn.Module]:
    """The checked config (file + ``KEY VALUE`` overrides), and its model with ``weights`` loaded, in eval mode.

    ``check`` may raise :class:`~rfpn.utils.cli.UsageError` for a config the calling tool cannot use.
    Raises ``UsageError`` for a bad config or a model of another ``meta_architecture``,
    ``FileNotFoundError`` naming the training command for missing weights (``weights`` may be a path or
    a URL Detectron2's path manager resolves, such as a shipped ``rfpn://`` checkpoint), and
    :class:`~rfpn.engine.checkpoint.CheckpointError` for weights that are unreadable or of another model.
    """
    cfg = load_config(config_file, opts)
    if meta_architecture and cfg.MODEL.META_ARCHITECTURE != meta_architecture:
        raise UsageError(
            f"{config_file}: MODEL.META_ARCHITECTURE={cfg.MODEL.META_ARCHITECTURE!r}; this tool needs a "
            f"{meta_architecture} config."
        )
    if check is not None:
        check(cfg)
    if not os.path.isfile(PathManager.get_local_path(weights)):  # rfpn:// names the shipped ones if absent
        raise FileNotFoundError(
            f"Weights {weights!r} do not exist; train the model first (tools/train_net.py --config-file {config_file})."
        )
    cfg.freeze()
    return cfg, build_eval_model(cfg, weights)

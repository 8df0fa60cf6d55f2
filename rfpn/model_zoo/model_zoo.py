"""Find, load and build the configs rfpn ships in the repository's top-level ``configs/``.

rfpn is installed editable (``pip install -e .``), so the configs are found next to the
package: ``<repo>/configs``. The CPU-scale Pathfinder configs that have a trained checkpoint
(``MODEL_ZOO.md``, :mod:`rfpn.model_zoo.trained`) load it with ``trained=True``; the others build
a freshly initialised model, and the trainer loads ``MODEL.WEIGHTS`` (ImageNet backbones).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from rfpn.config import add_rfpn_config

from .trained import weights_url

_CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


def get_config_root() -> Path:
    """The directory holding the packaged configs (``<repo>/configs``)."""
    if not _CONFIG_ROOT.is_dir():
        raise FileNotFoundError(
            f"rfpn's config directory {_CONFIG_ROOT} does not exist. The model zoo needs the repository "
            "checkout: install rfpn from it with `pip install -e .`."
        )
    return _CONFIG_ROOT


def list_configs() -> list[str]:
    """Every packaged config as a path relative to the config root, e.g. ``COCO-PanopticSegmentation/...``."""
    root = get_config_root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def get_config_file(config_path: str) -> str:
    """Absolute path of a packaged config given its path relative to ``configs/``."""
    path = get_config_root() / config_path
    if not path.is_file():
        available = "\n  ".join(list_configs())
        raise RuntimeError(f"{config_path!r} is not in rfpn's model zoo. Available configs:\n  {available}")
    return str(path)


def get_config(config_path: str, trained: bool = False) -> CfgNode:
    """A fresh ``CfgNode`` with every rfpn key, merged from the packaged config.

    ``trained=True`` sets ``MODEL.WEIGHTS`` to the config's shipped checkpoint (``rfpn://...``), or
    raises ``RuntimeError`` naming the configs that have one.
    """
    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.merge_from_file(get_config_file(config_path))
    if trained:
        cfg.MODEL.WEIGHTS = weights_url(config_path)
    return cfg


def get(config_path: str, trained: bool = False, device: str | None = None) -> nn.Module:
    """Build the model of a packaged config: randomly initialised, or with its shipped checkpoint (``trained``).

    ``device`` defaults to CUDA when available, else the CPU.
    """
    from rfpn.engine.checkpoint import CheckedCheckpointer

    cfg = get_config(config_path, trained)
    cfg.MODEL.DEVICE = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg)
    if trained:
        CheckedCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model

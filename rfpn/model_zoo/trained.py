"""Trained checkpoints that ship with rfpn, their ``rfpn://`` scheme and their published numbers.

The CPU-scale Pathfinder models are a few hundred kilobytes, so their weights (model only, float32)
live in the package under ``rfpn/model_zoo/weights/`` and ``trained.json`` records for each config
the checkpoint, its SHA-256, how it was trained and its IoU: on the 1,000 test images of its set
and on the first 100 of them (:func:`subset_iou`, which renders them in memory, so a test can check
a checkpoint without the dataset). ``MODEL.WEIGHTS rfpn://<path>`` loads a shipped checkpoint
through Detectron2's path manager, as ``detectron2://`` loads Detectron2's.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.utils.file_io import PathHandler, PathManager

__all__ = ["PREFIX", "RfpnHandler", "contour_length", "publish", "published", "sha256", "subset_iou", "weights_url"]

PREFIX = "rfpn://"
WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
MANIFEST = Path(__file__).resolve().parent / "trained.json"


class RfpnHandler(PathHandler):
    """Resolve ``rfpn://<path>`` to the checkpoint shipped at ``rfpn/model_zoo/weights/<path>``."""

    def _get_supported_prefixes(self) -> list[str]:
        return [PREFIX]

    def _get_local_path(self, path: str, **kwargs: Any) -> str:
        local = WEIGHTS_ROOT / path[len(PREFIX):]
        if not local.is_file():
            raise FileNotFoundError(
                f"{path} is not a shipped checkpoint ({local} does not exist); shipped: {', '.join(sorted(published())) or 'none'}."
            )
        return str(local)

    def _open(self, path: str, mode: str = "r", **kwargs: Any):
        return open(self._get_local_path(path), mode)


PathManager.register_handler(RfpnHandler())


def published() -> dict[str, dict[str, Any]]:
    """``{config path: entry}`` of every shipped checkpoint (``trained.json``)."""
    if not MANIFEST.is_file():
        return {}
    return json.loads(MANIFEST.read_text())


def weights_url(config_path: str) -> str:
    """``rfpn://...`` of the checkpoint trained with ``config_path``; ``RuntimeError`` naming those that exist."""
    entry = published().get(config_path)
    if entry is None:
        names = ", ".join(sorted(published())) or "none"
        raise RuntimeError(
            f"No trained checkpoint is published for {config_path!r}. Train it with tools/train_net.py --config-file "
            f"configs/{config_path}, or use a config that has one: {names}."
        )
    return entry["weights"]


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def subset_iou(model: torch.nn.Module, contour_length: int = 9, count: int = 100, seed: int = 0, batch: int = 50) -> float:
    """Pooled contour IoU of a Pathfinder model on the first ``count`` test images of the CPU preset.

    The images are rendered in memory exactly as ``datasets/prepare_pathfinder.py --preset cpu
    --contour-length N --seed S`` writes them (sample ``i`` of a split depends only on the seed, the
    split and ``i``), so the result equals the evaluator's on those files.
    """
    import dataclasses

    from rfpn.data.pathfinder_generator import PRESETS, render_sample, sample_rng
    from rfpn.evaluation.pathfinder_evaluation import contour_counts

    settings = dataclasses.replace(PRESETS["cpu"], contour_length=contour_length).resolved()
    model.eval()
    totals = np.zeros(4, dtype=np.int64)
    for start in range(0, count, batch):
        samples = [render_sample(settings, sample_rng(seed, "test", i)) for i in range(start, min(start + batch, count))]
        inputs = [{"image": torch.from_numpy(s.image)[None]} for s in samples]
        for s, out in zip(samples, model(inputs)):
            totals += contour_counts(out["sem_seg"].argmax(0).cpu(), torch.from_numpy((s.label > 0).astype(np.int64)))
    return float(totals[0] / max(totals[1], 1))


def contour_length(config_path: str) -> int:
    """The contour length of the CPU Pathfinder set ``config_path`` tests on (``pathfinder_cpuN_test``)."""
    from rfpn.data.pathfinder import implied_preset

    from .model_zoo import get_config

    test_set = get_config(config_path).DATASETS.TEST[0]
    preset = implied_preset(test_set.removesuffix("_test")) if test_set.endswith("_test") else None
    if preset is None or preset[0] != "cpu":
        raise ValueError(
            f"{config_path} tests on {test_set!r}; only models of the CPU Pathfinder sets (pathfinder_cpuN_test) ship "
            "with rfpn, because their test images can be rendered in memory."
        )
    return preset[1]


def publish(config_path: str, checkpoint: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Ship the model weights of ``checkpoint`` for ``config_path`` and record ``entry`` plus file, SHA-256, subset IoU."""
    from rfpn.engine.checkpoint import CheckedCheckpointer
    from rfpn.utils.files import atomic_write, write_json_atomic

    from .model_zoo import get

    entry = dict(entry, contour_length=contour_length(config_path))

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = {k: v.float() if v.is_floating_point() and v.dtype != torch.float64 else v for k, v in state["model"].items()}
    rel = Path(config_path).with_suffix(".pth")
    target = WEIGHTS_ROOT / rel
    atomic_write(target, lambda f: torch.save({"model": weights}, f))
    model = get(config_path, device="cpu")
    CheckedCheckpointer(model).load(str(target))
    record = dict(entry, weights=PREFIX + rel.as_posix(), sha256=sha256(target), bytes=target.stat().st_size)
    record["iou_first_100"] = subset_iou(model, entry["contour_length"])
    manifest = published()
    manifest[config_path] = record
    write_json_atomic(str(MANIFEST), dict(sorted(manifest.items())))
    return record

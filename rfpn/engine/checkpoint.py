"""Checkpoints that load strictly with one-line errors, and are written atomically.

Detectron2 (through fvcore) loads weights leniently: a parameter of another shape or a missing
one is skipped with a warning, so ``--eval-only`` with the checkpoint of another model evaluates
random weights and exits 0. :class:`CheckedCheckpointer` instead raises :class:`CheckpointError`
(a ``ValueError``: one line from the tools, exit code 1) naming the file and what does not match,
unless ``MODEL.ALLOW_PARTIAL_WEIGHTS`` asks for partial loading. Weights converted by name-matching
heuristics (Caffe2/ImageNet ``.pkl`` files loaded into a detector) keep Detectron2's warnings: a
backbone checkpoint is partial by nature. :class:`AtomicCheckpointer` adds atomic writes.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

from rfpn.utils.files import atomic_write

__all__ = ["AtomicCheckpointer", "CheckedCheckpointer", "CheckpointError"]

# Model keys a checkpoint may lack or carry without being another model (state that starts fresh).
_OPTIONAL_KEYS = ("auto_penalty_weight",)
_UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, OSError, KeyError, ValueError, AttributeError,
               ImportError, IndexError, TypeError, UnicodeDecodeError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model; the message names file and fix."""


def _listing(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class CheckedCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose loading fails loudly; ``partial=True`` restores Detectron2's leniency."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, partial: bool = False, **checkpointables: Any):
        super().__init__(model, save_dir, **checkpointables)
        self.partial = partial
        self._path = ""

    def load(self, path: str, checkpointables: list[str] | None = None) -> dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"Checkpoint {path!r} does not exist. Check MODEL.WEIGHTS (or, with --resume, OUTPUT_DIR's "
                "last_checkpoint); a finished training run leaves <OUTPUT_DIR>/model_final.pth."
            )
        self._path = path
        return super().load(path, checkpointables)

    def _load_file(self, filename: str) -> dict[str, Any]:
        try:
            loaded = super()._load_file(filename)
        except _UNREADABLE as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"Checkpoint {filename!r} cannot be read ({type(e).__name__}: {reason[:120]}): it is truncated or not a "
                "PyTorch/Detectron2 checkpoint. Copy it again, or retrain it."
            ) from None
        if not isinstance(loaded.get("model"), dict):
            raise CheckpointError(
                f"Checkpoint {filename!r} holds no model weights (a state dict under 'model', or one at the top level)."
            )
        return loaded

    def _load_model(self, checkpoint: dict[str, Any]):
        heuristic = bool(checkpoint.get("matching_heuristics", False))
        incompatible = super()._load_model(checkpoint)
        if heuristic or self.partial or incompatible is None:
            return incompatible
        optional = lambda key: key.rsplit(".", 1)[-1] in _OPTIONAL_KEYS  # noqa: E731
        reshaped = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in incompatible.missing_keys if not optional(k) and k not in reshaped]
        unexpected = [k for k in incompatible.unexpected_keys if not optional(k)]
        shapes = [f"{k}: checkpoint {tuple(a)}, model {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
        if not (missing or unexpected or shapes):
            return incompatible
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} parameter(s) of another shape ({_listing(shapes, 2)})")
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model ({_listing(unexpected)})")
        raise CheckpointError(
            f"Checkpoint {self._path!r} does not fit the model: {'; '.join(parts)}. Use the config it was trained with "
            "(its OUTPUT_DIR/config.yaml), or set MODEL.ALLOW_PARTIAL_WEIGHTS True to load only what matches."
        )


class AtomicCheckpointer(CheckedCheckpointer):
    """A :class:`CheckedCheckpointer` whose files appear whole or not at all.

    A process killed while saving (SIGKILL, out of memory, a pre-empted node) would leave a
    truncated ``model_XXXXXXX.pth`` or an empty ``last_checkpoint``, and ``--resume`` would then
    fail on it. Here both are written to a temporary file in the same folder and renamed into
    place, and ``last_checkpoint`` is updated only after the checkpoint is complete. Temporary
    files a killed writer left behind are removed when the same file is written again.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        if not os.path.isdir(self.save_dir):  # a remote path manager URI: no atomic rename there
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f), "wb", durable=True)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not os.path.isdir(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        last = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(last, lambda f: f.write(last_filename_basename), "w", durable=True)

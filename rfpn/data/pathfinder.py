"""Pathfinder datasets in Detectron2's DatasetCatalog and MetadataCatalog.

A dataset ``<name>`` written by ``datasets/prepare_pathfinder.py`` lives in
``<root>/pathfinder/<name>/{train,test}/`` (``<root>``: ``$DETECTRON2_DATASETS`` or
``./datasets``) and is registered as ``<name>_train`` and ``<name>_test``. Importing this
module registers the standard names (``pathfinder{9,14,20,25}`` at paper scale,
``pathfinder_cpu{6,9,12,14}`` at CPU scale) and every dataset directory found under
``<root>/pathfinder/``. Loading one that is missing raises ``FileNotFoundError`` with the
command that makes it.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .pathfinder_generator import (
    FORMAT_VERSION,
    PRESETS,
    SPLITS,
    PathfinderSettings,
    datasets_root,
    default_dataset_name,
    prepare_command,
)

__all__ = [
    "STANDARD_PATHFINDER_DATASETS",
    "implied_preset",
    "register_pathfinder",
    "register_all_pathfinder",
    "load_pathfinder_dicts",
    "read_pathfinder_image",
    "read_pathfinder_label",
]

PATHFINDER_CLASSES = ["background", "contour"]
# name -> (preset, contour length) of the datasets registered at import.
STANDARD_PATHFINDER_DATASETS: dict[str, tuple[str, int]] = {
    **{default_dataset_name("paper", n): ("paper", n) for n in (9, 14, 20, 25)},
    **{default_dataset_name("cpu", n): ("cpu", n) for n in (6, 9, 12, 14)},
}
_NAME_PATTERN = re.compile(r"^pathfinder(?:_(cpu))?(\d+)$")


def _dataset_dir(name: str, root: str | None) -> str:
    return os.path.join(datasets_root(root), "pathfinder", name)


def _read_summary(name: str, root: str | None) -> dict | None:
    """The dataset's ``dataset.json`` (settings, seed, sizes), or None if absent or unreadable."""
    try:
        with open(os.path.join(_dataset_dir(name, root), "dataset.json")) as f:
            summary = json.load(f)
        return summary if isinstance(summary, dict) else None
    except (OSError, ValueError):
        return None


def implied_preset(name: str) -> tuple[str, int] | None:
    """(preset, contour length) that a name such as ``pathfinder14`` or ``pathfinder_cpu9`` implies."""
    if name in STANDARD_PATHFINDER_DATASETS:
        return STANDARD_PATHFINDER_DATASETS[name]
    match = _NAME_PATTERN.match(name)
    return (match.group(1) or "paper", int(match.group(2))) if match else None


def _make_command(name: str, root: str | None, summary: dict | None = None) -> str:
    """The prepare command for ``name``: from its own summary if there is one, else from its name."""
    if summary is not None:
        try:
            settings = PathfinderSettings(**summary["settings"])
            sizes = summary["num_samples"]
            return prepare_command(name, summary["preset"], settings.contour_length, settings,
                                   sizes["train"], sizes["test"], summary["seed"], root)
        except (KeyError, TypeError):
            pass
    implied = implied_preset(name)
    if implied is not None:
        return prepare_command(name, *implied, root=root)
    return prepare_command(name, "cpu", "<N>", root=root) + "  (choose --preset and --contour-length)"


def load_pathfinder_dicts(name: str, split: str, root: str | None = None) -> list[dict]:
    """Detectron2 dataset dicts of ``split`` of Pathfinder dataset ``name``.

    Each dict has ``file_name``, ``sem_seg_file_name``, ``height``, ``width`` and ``image_id``.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; allowed values: {', '.join(SPLITS)}.")
    dataset_dir = _dataset_dir(name, root)
    split_dir = os.path.join(dataset_dir, split)
    index_path = os.path.join(split_dir, "index.json")
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(
            f"Pathfinder dataset '{name}' was not found at {dataset_dir}. Make it with:\n  {_make_command(name, root)}"
        )
    if not os.path.isfile(index_path):
        raise FileNotFoundError(
            f"Pathfinder dataset '{name}' is incomplete: {index_path} is missing. Regenerate it with:\n  "
            f"{_make_command(name, root, _read_summary(name, root))} --overwrite"
        )
    fix = f"{_make_command(name, root, _read_summary(name, root))} --overwrite"
    try:
        with open(index_path) as f:
            index = json.load(f)
        records = index["records"]
        if index.get("format") != "rfpn-pathfinder" or not isinstance(records, list):
            raise ValueError("not an rfpn Pathfinder index")
        if index.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {index.get('version')}, expected {FORMAT_VERSION}")
        if index.get("num_samples") != len(records):
            raise ValueError(f"{len(records)} records but num_samples={index.get('num_samples')}")
        dicts = [
            {
                "file_name": os.path.join(split_dir, r["file_name"]),
                "sem_seg_file_name": os.path.join(split_dir, r["sem_seg_file_name"]),
                "height": int(r["height"]),
                "width": int(r["width"]),
                "image_id": int(r["image_id"]),
            }
            for r in records
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Pathfinder index {index_path} is corrupt or truncated ({e}). Regenerate it with:\n  {fix}") from e
    for sub in ("images", "labels"):
        folder = os.path.join(split_dir, sub)
        found = len(os.listdir(folder)) if os.path.isdir(folder) else 0
        if found < len(dicts):
            raise FileNotFoundError(
                f"Pathfinder dataset '{name}' is incomplete: {folder} holds {found} of {len(dicts)} files. "
                f"Regenerate it with:\n  {fix}"
            )
    return dicts


def register_pathfinder(name: str, root: str | None = None) -> None:
    """Register ``<name>_train`` and ``<name>_test`` (replacing earlier registrations of them).

    Metadata: ``stuff_classes``, ``ignore_label``, ``evaluator_type="pathfinder"``,
    ``image_root``, ``sem_seg_root``, ``contour_length`` and ``image_size``. The last two come
    from the dataset on disk when it exists, else from the preset the name implies (None if
    the name implies none).
    """
    summary = _read_summary(name, root)
    contour_length = image_size = None
    if summary is not None and isinstance(summary.get("settings"), dict):
        contour_length = summary["settings"].get("contour_length")
        image_size = summary["settings"].get("image_size")
    elif implied_preset(name) is not None:
        preset, contour_length = implied_preset(name)
        image_size = PRESETS[preset].image_size
    for split in SPLITS:
        key = f"{name}_{split}"
        if key in DatasetCatalog.list():
            DatasetCatalog.remove(key)
            MetadataCatalog.remove(key)
        DatasetCatalog.register(key, lambda name=name, split=split, root=root: load_pathfinder_dicts(name, split, root))
        split_dir = os.path.join(_dataset_dir(name, root), split)
        MetadataCatalog.get(key).set(
            stuff_classes=list(PATHFINDER_CLASSES),
            ignore_label=255,
            evaluator_type="pathfinder",
            image_root=os.path.join(split_dir, "images"),
            sem_seg_root=os.path.join(split_dir, "labels"),
            contour_length=contour_length,
            image_size=image_size,
        )


def register_all_pathfinder(root: str | None = None) -> list[str]:
    """Register the standard names and every dataset directory under ``<root>/pathfinder/``."""
    names = list(STANDARD_PATHFINDER_DATASETS)
    parent = os.path.join(datasets_root(root), "pathfinder")
    if os.path.isdir(parent):
        names += sorted(
            d for d in os.listdir(parent)
            if not d.startswith(".") and d not in names and os.path.isdir(os.path.join(parent, d))
        )
    for name in names:
        register_pathfinder(name, root)
    return names


def _open_png(path: str, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "L":
                raise ValueError(f"mode {im.mode}, expected 8-bit grayscale (L)")
            return np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise OSError(
            f"Cannot read Pathfinder {what} {path} ({e}). The dataset is damaged: regenerate it with "
            "datasets/prepare_pathfinder.py ... --overwrite."
        ) from e


def read_pathfinder_image(path: str) -> np.ndarray:
    """A stimulus as a (H, W) uint8 array; unreadable or truncated files raise ``OSError`` naming them."""
    return _open_png(path, "image")


def read_pathfinder_label(path: str) -> np.ndarray:
    """A label PNG (0 background, 255 contour) as a (H, W) uint8 array of class ids 0/1."""
    label = _open_png(path, "label")
    if ((label != 0) & (label != 255)).any():
        raise ValueError(f"Pathfinder label {path} holds values other than 0 and 255; regenerate the dataset.")
    return (label == 255).astype(np.uint8)


register_all_pathfinder()

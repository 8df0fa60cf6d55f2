"""COCO panoptic annotations -> the semantic "stuff" PNGs Panoptic FPN trains its semantic head on.

Panoptic FPN ("separated" COCO panoptic in Detectron2) reads instances from the COCO instance
JSON and semantics from one PNG per image whose pixels hold a contiguous stuff id: every thing
category becomes 0, stuff categories 1..K in the order of the metadata's
``stuff_dataset_id_to_contiguous_id`` and unlabeled pixels 255. This module writes those PNGs
from a panoptic JSON + PNG folder. It is used for real COCO (``datasets/prepare_panoptic_fpn.py``)
and by the synthetic panoptic generator, so both go through the same conversion.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from rfpn.utils.files import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255

__all__ = [
    "PanopticFormatError",
    "IGNORE_LABEL",
    "atomic_write_json",
    "save_png",
    "read_panoptic_png",
    "rgb2id",
    "id2rgb",
    "stuff_id_map",
    "panoptic_to_stuff",
    "load_panoptic_json",
    "convert_panoptic_to_stuff",
]


class PanopticFormatError(ValueError):
    """A panoptic annotation file that exists but does not follow the COCO panoptic format."""


def atomic_write_json(path: str, obj: Any) -> None:
    """Dump ``obj`` as JSON to ``path`` atomically (keys sorted, so equal objects give equal bytes)."""
    write_json_atomic(path, obj, sort_keys=True)


def save_png(path: str, array: np.ndarray) -> None:
    """Save a uint8 (H, W) or (H, W, 3) array as a PNG, atomically."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colour (H, W, 3) -> segment id ``R + 256 G + 256^2 B`` (H, W) int64."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids (H, W) -> the COCO panoptic PNG colour (H, W, 3) uint8."""
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256**3):
        raise ValueError(f"panoptic segment ids must be in [0, 256^3), got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def read_panoptic_png(path: str) -> np.ndarray:
    """Read a COCO panoptic PNG and return its segment ids (H, W).

    Raises FileNotFoundError for a missing file and PanopticFormatError (naming the file)
    for one that does not decode or is not an RGB image.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Panoptic PNG not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            array = np.asarray(im.convert("RGB")) if mode in ("RGB", "RGBA") else None
    except (OSError, SyntaxError, ValueError) as e:
        raise PanopticFormatError(f"Cannot decode panoptic PNG {path}: {e}") from e
    if array is None:
        raise PanopticFormatError(f"Panoptic PNG {path} has mode {mode!r}; COCO panoptic PNGs are RGB")
    return rgb2id(array)


def stuff_id_map(metadata: Mapping[str, Any]) -> Dict[int, int]:
    """Dataset category id -> semantic label of the stuff PNG, from Detectron2 "separated" metadata.

    Things -> 0, stuff -> its contiguous id (1..K). ``metadata`` holds
    ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id`` as made by
    Detectron2's ``_get_builtin_metadata("coco_panoptic_separated")`` (whose stuff map also
    holds the key 0 for the merged "things" class, which is no dataset category).
    """
    try:
        things = metadata["thing_dataset_id_to_contiguous_id"]
        stuff = metadata["stuff_dataset_id_to_contiguous_id"]
    except KeyError as e:
        raise KeyError(
            f"metadata lacks {e}: pass Detectron2 'separated' panoptic metadata "
            "(e.g. MetadataCatalog.get('coco_2017_train_panoptic_separated'))"
        ) from None
    id_map = {int(k): int(v) for k, v in stuff.items() if int(k) != 0}
    if any(not 1 <= v < IGNORE_LABEL for v in id_map.values()):
        raise ValueError(f"stuff contiguous ids must lie in [1, {IGNORE_LABEL}), got {sorted(id_map.values())}")
    clash = set(id_map) & {int(k) for k in things}
    if clash:
        raise ValueError(f"category ids {sorted(clash)} are listed as both thing and stuff in the metadata")
    id_map.update({int(k): 0 for k in things})
    return id_map


def panoptic_to_stuff(
    segment_ids: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    id_map: Mapping[int, int],
    source: str = "",
) -> np.ndarray:
    """Turn one panoptic segment-id map (H, W) into the uint8 stuff map.

    Pixels of a segment get ``id_map[category_id]``; pixels of no listed segment (id 0 is
    COCO's "unlabeled") get 255. An unknown category id raises PanopticFormatError naming
    the id and ``source``.
    """
    out = np.full(segment_ids.shape, IGNORE_LABEL, dtype=np.uint8)
    for seg in segments_info:
        category_id = int(seg["category_id"])
        if category_id not in id_map:
            raise PanopticFormatError(
                f"Segment {seg['id']} of {source or 'a panoptic annotation'} has category_id={category_id}, "
                f"which the metadata does not know (known ids: {sorted(id_map)})"
            )
        out[segment_ids == int(seg["id"])] = id_map[category_id]
    return out


def load_panoptic_json(path: str, hint: str = "") -> Dict[str, Any]:
    """Load a COCO panoptic JSON, with errors that name the file (and ``hint``, the fix)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Panoptic JSON not found: {path}" + (f". {hint}" if hint else ""))
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise PanopticFormatError(f"Panoptic JSON {path} is not valid JSON: {e}") from e
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise PanopticFormatError(f"Panoptic JSON {path} lacks the COCO panoptic keys {missing}")
    return data


def _convert_one(task: Tuple[str, str, List[Dict[str, Any]], Dict[int, int]]) -> str:
    panoptic_png, stuff_png, segments_info, id_map = task
    stuff = panoptic_to_stuff(read_panoptic_png(panoptic_png), segments_info, id_map, source=panoptic_png)
    save_png(stuff_png, stuff)
    return stuff_png


def convert_panoptic_to_stuff(
    panoptic_json: str,
    panoptic_root: str,
    stuff_root: str,
    metadata: Mapping[str, Any],
    workers: int = 0,
    show_progress: bool = True,
) -> List[str]:
    """Write one stuff PNG per annotation of ``panoptic_json`` into ``stuff_root``.

    Args:
        panoptic_json: COCO panoptic JSON (``annotations/panoptic_val2017.json``).
        panoptic_root: folder of its panoptic PNGs (``panoptic_val2017/``).
        stuff_root: output folder (``panoptic_stuff_val2017/``); PNG names follow the panoptic PNGs,
            so Detectron2's ``load_sem_seg`` matches them to the images.
        metadata: Detectron2 separated-panoptic metadata (see :func:`stuff_id_map`).
        workers: processes; 0 picks ``min(4, cpu count)``, 1 converts in this process.

    Returns the written PNG paths (in annotation order).
    """
    data = load_panoptic_json(panoptic_json, hint="See datasets/README.md for the COCO panoptic layout")
    id_map = stuff_id_map(metadata)
    unknown = sorted({int(c["id"]) for c in data["categories"]} - set(id_map))
    if unknown:
        raise PanopticFormatError(
            f"Categories {unknown} of {panoptic_json} are absent from the metadata (known ids: {sorted(id_map)})"
        )
    tasks = [
        (
            os.path.join(panoptic_root, ann["file_name"]),
            os.path.join(stuff_root, ann["file_name"]),
            ann["segments_info"],
            id_map,
        )
        for ann in data["annotations"]
    ]
    os.makedirs(stuff_root, exist_ok=True)
    workers = workers or min(4, os.cpu_count() or 1)
    logger.info(f"Writing {len(tasks)} stuff PNGs from {panoptic_json} to {stuff_root} with {workers} worker(s)")
    bar = dict(total=len(tasks), desc=f"stuff PNGs -> {os.path.basename(stuff_root)}", disable=not show_progress)
    if workers <= 1 or len(tasks) < 2:
        return [_convert_one(t) for t in tqdm(tasks, **bar)]
    with mp.Pool(workers) as pool:
        return list(tqdm(pool.imap(_convert_one, tasks, chunksize=16), **bar))


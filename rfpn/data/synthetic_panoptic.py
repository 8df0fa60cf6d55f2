"""A small synthetic panoptic dataset written in exactly the COCO panoptic format.

Each image shows "stuff" regions (sky, grass, water, sand: wavy horizontal bands, each with
its own texture) under a few "things" (circles, squares, triangles with distinct textures)
that may overlap; later shapes occlude earlier ones and the panoptic PNG keeps only what is
visible. The files mirror COCO's layout so Detectron2's COCO panoptic loaders, mappers and
evaluators run on it unchanged::

    <root>/<name>/
      train/000000000001.jpg ...                 images ({train,val}2017/ in COCO)
      panoptic_train/000000000001.png ...        RGB-encoded segment ids
      panoptic_stuff_train/000000000001.png ...  stuff ids for Panoptic FPN (things 0, stuff 1..K)
      annotations/panoptic_train.json            images, annotations (segments_info), categories
      annotations/instances_train.json           COCO instances (polygons) for Mask R-CNN and COCOEvaluator
      (the same for val)

Generation is deterministic: sample ``i`` of a split uses its own generator seeded by
``(seed, split, i)``, so equal arguments give byte-identical files whatever the worker count.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from rfpn.utils.files import atomic_write

from .panoptic_stuff import atomic_write_json, convert_panoptic_to_stuff, id2rgb, save_png

logger = logging.getLogger(__name__)

__all__ = [
    "SYNTHETIC_PANOPTIC_CATEGORIES",
    "SYNTHETIC_SPLITS",
    "default_datasets_root",
    "synthetic_panoptic_paths",
    "synthetic_panoptic_metadata",
    "render_panoptic_sample",
    "generate_synthetic_panoptic",
]

# COCO-style categories: things get ids 1..T (contiguous, as Detectron2's instance loader
# expects); stuff ids leave a gap, like COCO's 92..200, so the id -> contiguous maps matter.
SYNTHETIC_PANOPTIC_CATEGORIES: List[Dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "supercategory": "shape", "isthing": 1, "color": [0, 0, 230]},
    {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1, "color": [250, 170, 30]},
    {"id": 11, "name": "sky", "supercategory": "region", "isthing": 0, "color": [70, 130, 180]},
    {"id": 12, "name": "grass", "supercategory": "region", "isthing": 0, "color": [107, 142, 35]},
    {"id": 13, "name": "water", "supercategory": "region", "isthing": 0, "color": [0, 80, 160]},
    {"id": 14, "name": "sand", "supercategory": "region", "isthing": 0, "color": [210, 190, 130]},
]
_THINGS = [c for c in SYNTHETIC_PANOPTIC_CATEGORIES if c["isthing"]]
_STUFF = [c for c in SYNTHETIC_PANOPTIC_CATEGORIES if not c["isthing"]]
_THING_IDS = {c["id"] for c in _THINGS}

# split name -> index used in seeds and image ids (val ids start at 1,000,001: disjoint from train).
SYNTHETIC_SPLITS: Dict[str, int] = {"train": 0, "val": 1}
_IMAGE_ID_STRIDE = 1_000_000
_MAX_THINGS = 5
_PLACEMENT_TRIES = 20
_JPEG_QUALITY = 95


def default_datasets_root() -> str:
    """Detectron2's convention: ``$DETECTRON2_DATASETS``, else ``./datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def synthetic_panoptic_paths(root: Optional[str], name: str, split: str) -> Dict[str, str]:
    """Paths of one split, with the keys of Detectron2's ``register_coco_panoptic_separated``."""
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"split must be one of {sorted(SYNTHETIC_SPLITS)}, got {split!r}")
    base = os.path.join(root if root is not None else default_datasets_root(), name)
    return {
        "image_root": os.path.join(base, split),
        "panoptic_root": os.path.join(base, f"panoptic_{split}"),
        "panoptic_json": os.path.join(base, "annotations", f"panoptic_{split}.json"),
        "sem_seg_root": os.path.join(base, f"panoptic_stuff_{split}"),
        "instances_json": os.path.join(base, "annotations", f"instances_{split}.json"),
    }


def synthetic_panoptic_metadata() -> Dict[str, Any]:
    """Metadata of the synthetic set, built like Detectron2's
    ``_get_builtin_metadata("coco_panoptic_separated")``: contiguous thing ids from 0, stuff ids
    from 1 with 0 standing for the merged "things" class of the semantic head.
    """
    return {
        "thing_classes": [c["name"] for c in _THINGS],
        "thing_colors": [c["color"] for c in _THINGS],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(_THINGS)},
        "stuff_classes": ["things"] + [c["name"] for c in _STUFF],
        "stuff_colors": [[82, 18, 128]] + [c["color"] for c in _STUFF],
        "stuff_dataset_id_to_contiguous_id": {0: 0, **{c["id"]: i + 1 for i, c in enumerate(_STUFF)}},
    }


# ---------------------------------------------------------------- rendering


def _stuff_texture(name: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W, 3) float texture of a stuff class; each class differs in colour and pattern."""
    h, w = yy.shape
    noise = rng.normal(0.0, 1.0, (h, w, 1))
    phase = rng.uniform(0, 2 * np.pi)
    if name == "sky":  # smooth vertical gradient
        t = (yy / max(h - 1, 1))[..., None]
        img = (1 - t) * np.array([100, 150, 225]) + t * np.array([185, 212, 245]) + 3 * noise
    elif name == "grass":  # grainy green with vertical blades
        blades = np.sin(xx * 1.9 + phase + 0.4 * np.sin(yy * 0.7))[..., None]
        img = np.array([60, 140, 50]) + 18 * noise + np.array([8, 22, 6]) * blades
    elif name == "water":  # horizontal ripples
        ripples = np.sin(yy * 0.9 + 2.0 * np.sin(xx * 0.15 + phase))[..., None]
        img = np.array([30, 85, 165]) + np.array([18, 25, 30]) * ripples + 4 * noise
    elif name == "sand":  # pale with dark speckles
        speckle = (rng.random((h, w, 1)) < 0.08) * np.array([-60, -55, -45])
        img = np.array([205, 185, 125]) + 6 * noise + speckle
    else:
        raise ValueError(f"unknown stuff class {name!r}")
    return img


def _thing_texture(name: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W, 3) float texture of a thing class, with per-instance period, phase and colour jitter."""
    jitter = rng.uniform(-20, 20, 3)
    period = rng.uniform(3.0, 6.0)
    oy, ox = rng.uniform(0, period, 2)
    if name == "circle":  # red diagonal stripes
        on = (np.floor((xx + yy + ox) / period) % 2)[..., None]
        img = on * np.array([225, 45, 40]) + (1 - on) * np.array([120, 15, 20])
    elif name == "square":  # blue and white checkerboard
        on = ((np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2)[..., None]
        img = on * np.array([235, 235, 245]) + (1 - on) * np.array([25, 35, 200])
    elif name == "triangle":  # yellow with a grid of dark dots
        dy = (yy + oy) % period - period / 2
        dx = (xx + ox) % period - period / 2
        on = (dx**2 + dy**2 < (0.3 * period) ** 2)[..., None]
        img = on * np.array([70, 50, 10]) + (1 - on) * np.array([235, 205, 40])
    else:
        raise ValueError(f"unknown thing class {name!r}")
    return img + jitter


def _shape_mask(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random filled circle / rotated square / rotated triangle as a bool (H, W) mask."""
    size = rng.uniform(0.14, 0.32) * min(h, w)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    angle = rng.uniform(0, 2 * np.pi)
    canvas = np.zeros((h, w), np.uint8)
    shift = 4  # sub-pixel vertex precision for cv2 drawing
    if name == "circle":
        center = (int(round(cx * (1 << shift))), int(round(cy * (1 << shift))))
        cv2.circle(canvas, center, int(round(size / 2 * (1 << shift))), 1, -1, cv2.LINE_8, shift)
        return canvas.astype(bool)
    if name == "square":
        corners, radius = 4, size / np.sqrt(2)
    elif name == "triangle":
        corners, radius = 3, size * 0.65
    else:
        raise ValueError(f"unknown thing class {name!r}")
    t = angle + 2 * np.pi * np.arange(corners) / corners
    pts = np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)
    cv2.fillPoly(canvas, [np.round(pts * (1 << shift)).astype(np.int32)], 1, cv2.LINE_8, shift)
    return canvas.astype(bool)


def _stuff_layout(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Stuff category id per pixel: 2-4 wavy horizontal bands of distinct stuff classes."""
    k = int(rng.integers(2, len(_STUFF) + 1))
    order = rng.permutation(len(_STUFF))[:k]
    cuts = np.sort(rng.uniform(0.15, 0.85, k - 1)) * h
    xx = np.arange(w)
    band = np.zeros((h, w), np.int64)
    yy = np.arange(h)[:, None]
    for cut in cuts:
        amp, freq, phase = rng.uniform(0, 0.08 * h), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
        boundary = cut + amp * np.sin(2 * np.pi * freq * xx / w + phase)
        band += yy >= boundary[None, :]
    ids = np.array([_STUFF[i]["id"] for i in order])
    return ids[band]


def _visible_ok(mask: np.ndarray, min_area: int, min_part: int) -> bool:
    """A visible thing mask is usable if it is large enough, has no holes and no tiny slivers,
    so its COCO polygons (outer contours) describe it well."""
    if mask.sum() < min_area:
        return False
    m = mask.astype(np.uint8)
    _, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is not None and (hierarchy[0][:, 3] >= 0).any():
        return False
    n, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    return bool((stats[1:n, cv2.CC_STAT_AREA] >= min_part).all())


def render_panoptic_sample(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[np.ndarray, np.ndarray, List[Dict[str, Any]]]:
    """Render one image and its panoptic labels.

    Returns ``(image, segment_ids, segments)``: image (H, W, 3) uint8; segment_ids (H, W) int64
    (every pixel belongs to one segment); segments: dicts with ``id``, ``category_id`` and the
    bool ``mask`` of the visible pixels, stuff first, then things bottom to top.
    """
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    stuff = _stuff_layout(rng, h, w)
    min_area = max(16, int(0.004 * h * w))
    min_part = 6

    things: List[Tuple[Dict[str, Any], np.ndarray]] = []  # (category, visible mask), bottom to top
    for _ in range(int(rng.integers(1, _MAX_THINGS + 1))):
        for _ in range(_PLACEMENT_TRIES):
            cat = _THINGS[int(rng.integers(len(_THINGS)))]
            new = _shape_mask(cat["name"], rng, h, w)
            occluded = [vis & ~new for _, vis in things]
            if _visible_ok(new, min_area, min_part) and all(
                _visible_ok(v, min_area, min_part) for v in occluded
            ):
                things = [(c, v) for (c, _), v in zip(things, occluded)] + [(cat, new)]
                break

    image = np.zeros((h, w, 3))
    for cat in _STUFF:
        region = stuff == cat["id"]
        if region.any():
            image[region] = _stuff_texture(cat["name"], rng, yy, xx)[region]
    covered = np.zeros((h, w), bool)
    for cat, vis in things:
        image[vis] = _thing_texture(cat["name"], rng, yy, xx)[vis]
        covered |= vis
    image = np.clip(np.round(image + rng.normal(0, 2.0, image.shape)), 0, 255).astype(np.uint8)

    segments: List[Dict[str, Any]] = []
    for cat in _STUFF:
        mask = (stuff == cat["id"]) & ~covered
        if mask.any():
            segments.append({"id": cat["id"] * 1000, "category_id": cat["id"], "mask": mask})
    for k, (cat, vis) in enumerate(things):
        segments.append({"id": cat["id"] * 1000 + k + 1, "category_id": cat["id"], "mask": vis})
    segment_ids = np.zeros((h, w), np.int64)
    for seg in segments:
        segment_ids[seg["mask"]] = seg["id"]
    return image, segment_ids, segments


# ---------------------------------------------------------------- COCO records


def _bbox_xywh(mask: np.ndarray) -> List[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons of a bool mask that rasterize back to exactly that mask.

    Contours traced on the 2x upsampled mask run through the centres of its boundary
    sub-pixels, a quarter pixel inside the true pixel edges: pycocotools then fills
    every pixel of the mask and no other (contours on the mask itself would cut the
    boundary pixels in half).
    """
    up = np.kron(mask.astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [[(float(v) + 0.5) / 2 for v in c.reshape(-1)] for c in contours if len(c) >= 3]


def _make_sample(task: Tuple[int, int, int, int, int, Dict[str, str]]) -> Dict[str, Any]:
    """Render sample ``index`` of a split, write its JPEG and panoptic PNG, return its records."""
    seed, split_index, index, height, width, paths = task
    rng = np.random.default_rng([seed, split_index, index])
    image, segment_ids, segments = render_panoptic_sample(rng, height, width)
    image_id = split_index * _IMAGE_ID_STRIDE + index + 1
    stem = f"{image_id:012d}"
    pil = Image.fromarray(image)
    atomic_write(
        os.path.join(paths["image_root"], stem + ".jpg"),
        lambda f: pil.save(f, format="JPEG", quality=_JPEG_QUALITY),
    )
    save_png(os.path.join(paths["panoptic_root"], stem + ".png"), id2rgb(segment_ids))

    segments_info, instances = [], []
    for seg in segments:
        area, bbox = int(seg["mask"].sum()), _bbox_xywh(seg["mask"])
        segments_info.append(
            {"id": seg["id"], "category_id": seg["category_id"], "area": area, "bbox": bbox, "iscrowd": 0}
        )
        if seg["category_id"] in _THING_IDS:
            instances.append(
                {
                    "image_id": image_id,
                    "category_id": seg["category_id"],
                    "segmentation": _polygons(seg["mask"]),
                    "area": float(area),
                    "bbox": [float(v) for v in bbox],
                    "iscrowd": 0,
                }
            )
    return {
        "image": {"id": image_id, "file_name": stem + ".jpg", "height": height, "width": width},
        "panoptic": {"image_id": image_id, "file_name": stem + ".png", "segments_info": segments_info},
        "instances": instances,
    }



def _remove_stale(folder: str, keep: Sequence[str]) -> None:
    """Delete files of an earlier, larger generation run that this run did not rewrite."""
    keep_set = set(keep)
    for f in os.listdir(folder):
        if f not in keep_set and os.path.isfile(os.path.join(folder, f)):
            os.remove(os.path.join(folder, f))


def _generate_split(
    split: str, num: int, root: str, name: str, size: Tuple[int, int], seed: int, workers: int, show_progress: bool
) -> None:
    paths = synthetic_panoptic_paths(root, name, split)
    # The JSONs go last: while they are missing the split reads as "not generated".
    for key in ("instances_json", "panoptic_json"):
        if os.path.exists(paths[key]):
            os.remove(paths[key])
    for key in ("image_root", "panoptic_root", "sem_seg_root"):
        os.makedirs(paths[key], exist_ok=True)
    os.makedirs(os.path.dirname(paths["panoptic_json"]), exist_ok=True)

    tasks = [(seed, SYNTHETIC_SPLITS[split], i, size[0], size[1], paths) for i in range(num)]
    bar = dict(total=num, desc=f"{name}/{split}", disable=not show_progress)
    if workers <= 1 or num < 2:
        samples = [_make_sample(t) for t in tqdm(tasks, **bar)]
    else:
        with mp.Pool(workers) as pool:
            samples = list(tqdm(pool.imap(_make_sample, tasks, chunksize=4), **bar))

    images = [s["image"] for s in samples]
    instances = [ann for s in samples for ann in s["instances"]]
    for ann_id, ann in enumerate(instances, start=1):
        ann["id"] = ann_id
    info = {"description": f"rfpn synthetic panoptic ({split})", "seed": seed, "version": "1.0"}
    atomic_write_json(
        paths["panoptic_json"],
        {
            "info": info,
            "licenses": [],
            "images": images,
            "annotations": [s["panoptic"] for s in samples],
            "categories": SYNTHETIC_PANOPTIC_CATEGORIES,
        },
    )
    convert_panoptic_to_stuff(
        paths["panoptic_json"],
        paths["panoptic_root"],
        paths["sem_seg_root"],
        synthetic_panoptic_metadata(),
        workers=workers,
        show_progress=show_progress,
    )
    for key, ext in (("image_root", ".jpg"), ("panoptic_root", ".png"), ("sem_seg_root", ".png")):
        _remove_stale(paths[key], [os.path.splitext(im["file_name"])[0] + ext for im in images])
    atomic_write_json(
        paths["instances_json"],
        {
            "info": info,
            "licenses": [],
            "images": images,
            "annotations": instances,
            "categories": [{k: c[k] for k in ("id", "name", "supercategory")} for c in _THINGS],
        },
    )
    logger.info(f"Wrote {num} {split} images with {len(instances)} things to {os.path.dirname(paths['image_root'])}")


def generate_synthetic_panoptic(
    root: Optional[str] = None,
    name: str = "synthetic_panoptic",
    num_train: int = 200,
    num_test: int = 50,
    image_size: Union[int, Tuple[int, int]] = 128,
    seed: int = 0,
    workers: int = 0,
    show_progress: bool = True,
) -> str:
    """Write the synthetic panoptic dataset to ``<root>/<name>/`` and return that folder.

    Args:
        root: datasets root; None means ``$DETECTRON2_DATASETS`` or ``./datasets``.
        name: folder name, also the prefix of the registered dataset names.
        num_train, num_test: images in the "train" and "val" (test) splits.
        image_size: side of the square images, or (height, width).
        seed: equal seeds give byte-identical files.
        workers: processes; 0 picks ``min(4, cpu count)``, 1 generates in this process.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"image_size must be an int or (height, width) of at least 32 pixels, got {image_size!r}")
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    root = root if root is not None else default_datasets_root()
    workers = workers or min(4, os.cpu_count() or 1)
    for split, num in (("train", num_train), ("val", num_test)):
        _generate_split(split, num, root, name, size, seed, workers, show_progress)
    return os.path.join(root, name)

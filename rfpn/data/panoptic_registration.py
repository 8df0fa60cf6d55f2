"""Registration and validation of COCO-format panoptic datasets for Panoptic FPN / R-FPN.

The synthetic set is registered through Detectron2's own
``register_coco_panoptic_separated`` with metadata built like Detectron2's
``_get_builtin_metadata("coco_panoptic_separated")``, so training and evaluation on it run the
same code as on COCO (``coco_2017_{train,val}_panoptic_separated``, which Detectron2 registers
itself). Names: ``<name>_train_separated`` (training set), ``<name>_val_separated`` (test set)
and Detectron2's ``..._stuffonly`` siblings.

Detectron2's loaders fail on broken data with bare asserts and KeyErrors far from the cause.
Here the synthetic loaders first run :func:`validate_panoptic_dataset`, which names the
missing or bad file, or the unknown category id, and the command that makes the data; the
builtin COCO loaders first run the cheap :func:`check_panoptic_paths`;
:class:`CheckedDatasetMapper` re-raises image decoding errors with the file's name.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_panoptic_separated

from .panoptic_stuff import IGNORE_LABEL, PanopticFormatError, load_panoptic_json, read_panoptic_png, stuff_id_map
from .synthetic_panoptic import SYNTHETIC_SPLITS, synthetic_panoptic_metadata, synthetic_panoptic_paths

logger = logging.getLogger(__name__)

__all__ = [
    "register_synthetic_panoptic",
    "check_panoptic_paths",
    "validate_panoptic_dataset",
    "CheckedDatasetMapper",
    "checked_mapper",
]

# Detectron2's builtin COCO panoptic sets in the form Panoptic FPN trains on (train / test / quick test).
COCO_PANOPTIC_SEPARATED = (
    "coco_2017_train_panoptic_separated",
    "coco_2017_val_panoptic_separated",
    "coco_2017_val_100_panoptic_separated",
)
_COCO_HINT = "Get COCO 2017 images, instance and panoptic annotations laid out as datasets/README.md shows"
_STUFF_HINT = "Make the stuff PNGs with `python datasets/prepare_panoptic_fpn.py`"


def _hint(meta: Any, stuff: bool = False) -> str:
    """The fix for a missing file: the dataset's own command (synthetic sets) or the COCO steps."""
    return meta.get("prepare_hint", None) or (_STUFF_HINT if stuff else _COCO_HINT)


def _require_file(path: str, what: str, hint: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}. {hint}")


def _require_dir(path: str, what: str, hint: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}. {hint}")


def _decode(path: str, what: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise PanopticFormatError(f"Cannot decode {what} {path}: {e}") from e


def check_panoptic_paths(dataset_name: str) -> Any:
    """Check that the JSONs and folders of a registered "separated" panoptic dataset exist.

    Cheap (no file is read), so it also guards Detectron2's builtin COCO sets. Raises
    FileNotFoundError naming the path and the fix; returns the dataset's metadata.
    """
    meta = MetadataCatalog.get(dataset_name)
    needed = ("panoptic_json", "panoptic_root", "image_root", "sem_seg_root", "json_file")
    missing = [k for k in needed if meta.get(k, None) is None]
    if missing:
        raise ValueError(
            f"{dataset_name!r} is not a registered 'separated' COCO panoptic dataset (metadata lacks {missing}); "
            f"registered datasets: {DatasetCatalog.list()}"
        )
    hint = _hint(meta)
    _require_file(meta.panoptic_json, "Panoptic JSON", hint)
    _require_file(meta.json_file, "Instance JSON", hint)
    _require_dir(meta.image_root, "Image", hint)
    _require_dir(meta.panoptic_root, "Panoptic PNG", hint)
    _require_dir(meta.sem_seg_root, "Stuff PNG", _hint(meta, stuff=True))
    return meta


def validate_panoptic_dataset(dataset_name: str, check_pixels: bool = True, show_progress: bool = False) -> Dict[str, int]:
    """Check a registered "separated" COCO panoptic dataset before Detectron2 loads it.

    Checks that the panoptic JSON, instance JSON and every image / panoptic PNG / stuff PNG
    exist, that every category id (panoptic segments and instances) is known to the
    dataset's metadata with the right thing/stuff role, and that image ids agree between the
    JSONs. With ``check_pixels`` every PNG is decoded: segment ids in a panoptic PNG must be
    listed in its segments_info and stuff PNG values must be valid contiguous stuff ids or 255.

    Raises FileNotFoundError (naming the file and the command that makes it) or
    PanopticFormatError (naming the file, image and id). Returns counts:
    ``{"images", "segments", "instances"}``.
    """
    meta = check_panoptic_paths(dataset_name)
    hint = _hint(meta)

    thing_map = meta.thing_dataset_id_to_contiguous_id
    id_map = stuff_id_map(meta.as_dict())
    pan = load_panoptic_json(meta.panoptic_json)
    for cat in pan["categories"]:
        cid = int(cat["id"])
        if cid not in id_map:
            raise PanopticFormatError(
                f"Category id {cid} ({cat.get('name')!r}) of {meta.panoptic_json} is absent from the metadata "
                f"of {dataset_name!r} (known ids: {sorted(id_map)})"
            )
        if bool(cat.get("isthing", cid in thing_map)) != (cid in thing_map):
            raise PanopticFormatError(
                f"Category id {cid} is isthing={cat.get('isthing')} in {meta.panoptic_json} but a "
                f"{'thing' if cid in thing_map else 'stuff'} class in the metadata of {dataset_name!r}"
            )

    with open(meta.json_file) as f:
        instances = json.load(f)
    inst_cats = {int(c["id"]) for c in instances.get("categories", [])}
    if inst_cats != set(thing_map):
        raise PanopticFormatError(
            f"Categories {sorted(inst_cats)} of {meta.json_file} differ from the thing ids "
            f"{sorted(thing_map)} of {dataset_name!r}"
        )
    for ann in instances.get("annotations", []):
        if int(ann["category_id"]) not in thing_map:
            raise PanopticFormatError(
                f"Instance annotation {ann.get('id')} of image {ann.get('image_id')} in {meta.json_file} has "
                f"category_id={ann['category_id']}, absent from the thing ids {sorted(thing_map)}"
            )
    inst_images = {int(im["id"]) for im in instances.get("images", [])}
    pan_images = {int(a["image_id"]) for a in pan["annotations"]}
    if inst_images != pan_images:
        diff = sorted(inst_images ^ pan_images)[:5]
        raise PanopticFormatError(
            f"{meta.json_file} and {meta.panoptic_json} list different image ids (e.g. {diff}); "
            "they must describe the same images"
        )

    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in pan["images"]}
    num_stuff = len(meta.stuff_classes)
    num_segments = 0
    for ann in tqdm(pan["annotations"], desc=f"validate {dataset_name}", disable=not show_progress):
        stem = os.path.splitext(ann["file_name"])[0]
        pan_png = os.path.join(meta.panoptic_root, ann["file_name"])
        stuff_png = os.path.join(meta.sem_seg_root, stem + ".png")
        _require_file(os.path.join(meta.image_root, stem + ".jpg"), "Image", hint)
        _require_file(pan_png, "Panoptic PNG", hint)
        _require_file(stuff_png, "Stuff PNG", _hint(meta, stuff=True))
        for seg in ann["segments_info"]:
            if int(seg["category_id"]) not in id_map:
                raise PanopticFormatError(
                    f"Segment {seg['id']} of image {ann['image_id']} ({pan_png}) in {meta.panoptic_json} has "
                    f"category_id={seg['category_id']}, absent from the metadata of {dataset_name!r} "
                    f"(known ids: {sorted(id_map)})"
                )
        num_segments += len(ann["segments_info"])
        if not check_pixels:
            continue
        ids = read_panoptic_png(pan_png)
        unknown = sorted(set(np.unique(ids).tolist()) - {int(s["id"]) for s in ann["segments_info"]} - {0})
        if unknown:
            raise PanopticFormatError(
                f"Panoptic PNG {pan_png} holds segment ids {unknown[:10]} that its segments_info in "
                f"{meta.panoptic_json} does not list"
            )
        expected = sizes.get(int(ann["image_id"]))
        stuff = _decode(stuff_png, "stuff PNG")
        if stuff.shape != ids.shape or (expected is not None and ids.shape != expected):
            raise PanopticFormatError(
                f"Size mismatch for image {ann['image_id']}: JSON {expected}, panoptic PNG {ids.shape}, "
                f"stuff PNG {stuff.shape} ({stuff_png})"
            )
        bad = sorted(set(np.unique(stuff).tolist()) - set(range(num_stuff)) - {IGNORE_LABEL})
        if bad:
            raise PanopticFormatError(
                f"Stuff PNG {stuff_png} holds labels {bad}; valid are 0..{num_stuff - 1} and {IGNORE_LABEL}. "
                f"{_hint(meta, stuff=True)}"
            )
    return {"images": len(pan["annotations"]), "segments": num_segments, "instances": len(instances["annotations"])}


def _checked_loader(
    checked_name: str, loader: Callable[[], List[Dict[str, Any]]], full: bool = True
) -> Callable[[], List[Dict[str, Any]]]:
    def load() -> List[Dict[str, Any]]:
        try:
            if full:
                validate_panoptic_dataset(checked_name)
            else:
                check_panoptic_paths(checked_name)
            return loader()
        except (KeyError, TypeError, IndexError, AttributeError, AssertionError, UnicodeDecodeError,
                json.JSONDecodeError) as e:
            # Structurally malformed JSON reaches code that indexes it (ours or Detectron2's):
            # name the annotation files instead of the line that tripped.
            meta = MetadataCatalog.get(checked_name)
            raise PanopticFormatError(
                f"The annotations of {checked_name!r} are malformed ({type(e).__name__}: {e}); check "
                f"{meta.get('panoptic_json', None)} and {meta.get('json_file', None)}. {_hint(meta)}"
            ) from e

    return load


def _guard_builtin_coco() -> None:
    """Make Detectron2's builtin COCO panoptic loaders say which file is missing and how to make it.

    Only paths are checked: reading COCO's large JSONs twice would slow every training start.
    """
    for name in COCO_PANOPTIC_SEPARATED:
        if name in DatasetCatalog.list():
            loader = DatasetCatalog[name]
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, _checked_loader(name, loader, full=False))


def register_synthetic_panoptic(name: str = "synthetic_panoptic", root: Optional[str] = None) -> List[str]:
    """Register the synthetic panoptic set under ``<root>/<name>/`` with Detectron2.

    Registers ``<name>_{train,val}_separated`` (``val`` is the test set) and the
    ``_stuffonly`` variants through ``register_coco_panoptic_separated``; loading validates
    the files first. Registration is lazy: the files may be generated later. Registering a
    name again with another root re-points it. Returns the ``_separated`` names.
    """
    hint_root = f" --root {root}" if root is not None else ""
    hint_name = f" --name {name}" if name != "synthetic_panoptic" else ""
    metadata = synthetic_panoptic_metadata()
    metadata["prepare_hint"] = f"Generate it with `python datasets/prepare_synthetic_panoptic.py{hint_root}{hint_name}`"
    names = []
    for split in SYNTHETIC_SPLITS:
        paths = synthetic_panoptic_paths(root, name, split)
        prefix = f"{name}_{split}"
        separated, stuffonly = f"{prefix}_separated", f"{prefix}_stuffonly"
        names.append(separated)
        if separated in DatasetCatalog.list():
            if MetadataCatalog.get(separated).get("panoptic_json") == paths["panoptic_json"]:
                continue
            logger.warning(f"Re-registering {separated} with the files under {os.path.dirname(paths['image_root'])}")
            for n in (separated, stuffonly):
                DatasetCatalog.remove(n)
                MetadataCatalog.remove(n)
        register_coco_panoptic_separated(
            prefix,
            metadata,
            paths["image_root"],
            paths["panoptic_root"],
            paths["panoptic_json"],
            paths["sem_seg_root"],
            paths["instances_json"],
        )
        for n in (separated, stuffonly):
            loader = DatasetCatalog[n]
            DatasetCatalog.remove(n)
            DatasetCatalog.register(n, _checked_loader(separated, loader))
    return names


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` whose image / PNG decoding and annotation errors name the bad file.

    A corrupt JPEG or stuff PNG otherwise surfaces as a bare PIL error inside a data-loader
    worker. Use it as ``build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True))``;
    :func:`checked_mapper` also adds the command that regenerates the dataset to its messages.
    """

    hint = ""  # how to make the files again, appended to every message

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError) as e:
            for key in ("file_name", "sem_seg_file_name", "pan_seg_file_name"):
                path = dataset_dict.get(key)
                if path is None:
                    continue
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"{key} of image {dataset_dict.get('image_id')} not found: {path}. {self.hint}".rstrip()
                    ) from e
                try:
                    with Image.open(path) as im:
                        im.load()
                except (OSError, SyntaxError, ValueError) as decode_error:
                    raise PanopticFormatError(
                        f"Cannot decode {key} {path} of image {dataset_dict.get('image_id')}: {decode_error}. "
                        f"{self.hint}".rstrip()
                    ) from e
            if isinstance(e, (TypeError, KeyError, IndexError)):  # junk in the image's annotation dicts
                raise PanopticFormatError(
                    f"The annotations of image {dataset_dict.get('image_id')} ({dataset_dict.get('file_name')}) are "
                    f"malformed ({type(e).__name__}: {e}); check the dataset's instance JSON."
                ) from e
            raise


def checked_mapper(cfg: Any, is_train: bool, dataset_names: Sequence[str]) -> CheckedDatasetMapper:
    """A :class:`CheckedDatasetMapper` whose errors end with the datasets' regeneration hint."""
    mapper = CheckedDatasetMapper(cfg, is_train)
    hints = dict.fromkeys(_hint(MetadataCatalog.get(n), stuff=False) for n in dataset_names)
    mapper.hint = " ".join(h if h.endswith(".") else h + "." for h in hints)
    return mapper


_guard_builtin_coco()
register_synthetic_panoptic()

"""Turns a Pathfinder dataset dict into the tensors a Pathfinder model takes."""
from __future__ import annotations

import numpy as np
import torch
from detectron2.config import configurable

from rfpn.config import validate_pathfinder_data_config

from .pathfinder import read_pathfinder_image, read_pathfinder_label

__all__ = ["PathfinderDatasetMapper"]


class PathfinderDatasetMapper:
    """Reads a stimulus and its label; flips both at random when training.

    Returns ``image`` (float32 (1, H, W), values 0..255), ``sem_seg`` (int64 (H, W), 0
    background / 1 contour), ``height``, ``width`` and ``file_name``. Test sets keep their
    labels too: the Pathfinder evaluator reads them from ``sem_seg``. Flips preserve the task
    (a flipped contour is still the contour that touches the marker), so they are free
    augmentation, as in the authors' training.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, flip: bool = True):
        self.is_train = is_train
        self.flip = flip

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict:
        validate_pathfinder_data_config(cfg)
        return {"is_train": is_train, "flip": cfg.INPUT.PATHFINDER_FLIP}

    def __call__(self, dataset_dict: dict) -> dict:
        d = dataset_dict
        image = read_pathfinder_image(d["file_name"])
        label = read_pathfinder_label(d["sem_seg_file_name"])
        expected = (d["height"], d["width"])
        for what, array, path in (("image", image, d["file_name"]), ("label", label, d["sem_seg_file_name"])):
            if array.shape != expected:
                raise ValueError(
                    f"Pathfinder {what} {path} is {array.shape[0]}x{array.shape[1]} but its index says "
                    f"{expected[0]}x{expected[1]}; regenerate the dataset with --overwrite."
                )
        if self.is_train and self.flip:
            if np.random.rand() < 0.5:
                image, label = image[:, ::-1], label[:, ::-1]
            if np.random.rand() < 0.5:
                image, label = image[::-1], label[::-1]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "sem_seg": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
            "height": d["height"],
            "width": d["width"],
            "file_name": d["file_name"],
        }

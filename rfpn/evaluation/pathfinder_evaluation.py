"""The paper's Pathfinder metric: IoU of the contour class over the whole test set.

IoU is pooled, not averaged per image: ``sum_i |P_i & G_i| / sum_i |P_i | G_i|`` over test
images ``i`` (prediction ``P`` = pixels whose contour score wins, ``G`` = label), so it can be
checked by hand from the pixel counts. With per-step outputs (``sem_seg_steps``, see
``MODEL.PATHFINDER.RETURN_STEPS``) it also reports the IoU the readout reaches after every step.
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["PathfinderEvaluator", "contour_counts"]


def contour_counts(pred: torch.Tensor, gt: torch.Tensor, ignore_label: int = 255) -> np.ndarray:
    """``[intersection, union, correct, valid]`` pixel counts of the contour class (label 1)."""
    if pred.shape != gt.shape:
        raise ValueError(f"Prediction shape {tuple(pred.shape)} does not match label shape {tuple(gt.shape)}.")
    valid = gt != ignore_label
    p, g = (pred == 1) & valid, (gt == 1) & valid
    return np.array(
        [int((p & g).sum()), int((p | g).sum()), int(((pred == gt) & valid).sum()), int(valid.sum())],
        dtype=np.int64,
    )


def batched_contour_counts(logits: torch.Tensor, labels: torch.Tensor, ignore_label: int = 255) -> np.ndarray:
    """``(..., B, 2)`` contour intersection and union per image from ``(..., B, 2, H, W)`` logits and ``(B, H, W)`` labels."""
    valid = labels != ignore_label
    pred = (logits.argmax(-3) == 1) & valid
    gt = (labels == 1) & valid
    return torch.stack([(pred & gt).flatten(-2).sum(-1), (pred | gt).flatten(-2).sum(-1)], -1).numpy()


def pooled_iou(counts: np.ndarray) -> float:
    """Contour IoU pooled over images: total intersection over total union (``[..., 0]`` / ``[..., 1]``)."""
    union = counts[..., 1].sum()
    return float(counts[..., 0].sum() / union) if union > 0 else float("nan")


class PathfinderEvaluator(DatasetEvaluator):
    """Pooled contour IoU (plus pixel accuracy and background IoU) and, if given, IoU per step.

    Labels come from the inputs' ``sem_seg`` (0 background, 1 contour, ``ignore_label``
    ignored), as the Pathfinder mapper provides them for test sets too. Results are fractions
    in [0, 1] under the ``"pathfinder"`` key: ``IoU``, ``IoU_background``, ``pixel_acc``,
    ``num_images`` and ``IoU@step{t}`` for every step.
    """

    def __init__(self, dataset_name: str = "", distributed: bool = True, ignore_label: int = 255):
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._ignore_label = ignore_label
        self._logger = logging.getLogger(__name__)
        self.reset()

    def reset(self) -> None:
        self._totals = np.zeros(4, dtype=np.int64)
        self._step_totals: np.ndarray | None = None
        self._num_images = 0

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for inp, out in zip(inputs, outputs):
            if "sem_seg" not in inp:
                raise KeyError(
                    f"PathfinderEvaluator needs the label as 'sem_seg' in each input dict (missing for "
                    f"{inp.get('file_name', '?')}); build the test loader with the PathfinderDatasetMapper."
                )
            gt = inp["sem_seg"].to("cpu", torch.long)
            self._totals += contour_counts(out["sem_seg"].argmax(0).cpu(), gt, self._ignore_label)
            if "sem_seg_steps" in out:
                preds = out["sem_seg_steps"].argmax(1).cpu()
                counts = np.stack([contour_counts(p, gt, self._ignore_label) for p in preds])
                if self._step_totals is None:
                    self._step_totals = np.zeros_like(counts)
                if counts.shape != self._step_totals.shape:
                    raise ValueError(
                        f"Every image must report the same number of steps; got {counts.shape[0]} and "
                        f"{self._step_totals.shape[0]} (per-step IoU needs a fixed step count: EPS = 0)."
                    )
                self._step_totals += counts
            self._num_images += 1

    def _gather(self) -> tuple[np.ndarray, np.ndarray | None, int]:
        if not self._distributed or comm.get_world_size() == 1:
            return self._totals, self._step_totals, self._num_images
        parts = comm.gather((self._totals, self._step_totals, self._num_images), dst=0)
        if not comm.is_main_process():
            return self._totals, None, -1
        totals = sum(p[0] for p in parts)
        steps = [p[1] for p in parts if p[1] is not None]
        return totals, (sum(steps) if steps else None), sum(p[2] for p in parts)

    @staticmethod
    def _iou(counts: np.ndarray) -> float:
        return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")

    def evaluate(self) -> OrderedDict:
        totals, step_totals, num_images = self._gather()
        if num_images < 0:
            return OrderedDict()
        if num_images == 0:
            self._logger.warning(f"PathfinderEvaluator on {self._dataset_name!r} received no images.")
            return OrderedDict()
        intersection, _, correct, valid = (int(v) for v in totals)
        # Background: both-0 pixels are the correct ones that are not contour; the union is every
        # valid pixel except those both call contour.
        res: dict[str, float] = {
            "IoU": self._iou(totals),
            "IoU_background": (correct - intersection) / max(valid - intersection, 1),
            "pixel_acc": correct / max(valid, 1),
            "num_images": num_images,
        }
        if step_totals is not None:
            for t, counts in zip(itertools.count(1), step_totals):
                res[f"IoU@step{t}"] = self._iou(counts)
        return OrderedDict(pathfinder=res)

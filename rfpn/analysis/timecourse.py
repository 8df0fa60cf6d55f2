"""What the readout says after every step (the paper's Fig. 1a) and how accurate it is.

- :func:`run_steps`: run a :class:`~rfpn.recurrent.RecurrentDynamics` for exactly ``T`` steps
  without a graph and return its per-step states (the fixed solver is used for the run, so
  step ``t`` is really ``F`` applied ``t`` times, whatever solver the model trained with);
- :class:`StepIoU`: pooled contour IoU (summed intersections over summed unions, the
  Pathfinder metric) after every step, accumulated over batches;
- :func:`select_steps`: which steps an image grid shows.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["StepIoU", "dataset_step_ious", "fixed_solver", "run_steps", "select_steps", "step_probabilities"]


@contextmanager
def fixed_solver(dynamics: nn.Module, steps: int | None = None) -> Iterator[nn.Module]:
    """Temporarily switch ``dynamics`` to the fixed-step solver with no early stop and, if
    ``steps`` is given, that many inference steps (so a model's own forward runs them)."""
    if not hasattr(dynamics, "solver") or not hasattr(dynamics, "cell"):
        raise TypeError(
            f"Expected a RecurrentDynamics core; got {type(dynamics).__name__}. Step-by-step analysis needs a "
            "recurrent model (a feed-forward control has no steps to run past N)."
        )
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    saved = dynamics.solver, dynamics.test_solver, dynamics.eps, dynamics.test_steps
    dynamics.solver, dynamics.test_solver, dynamics.eps = "fixed", None, 0.0
    if steps is not None:
        dynamics.test_steps = steps
    try:
        yield dynamics
    finally:
        dynamics.solver, dynamics.test_solver, dynamics.eps, dynamics.test_steps = saved


@torch.no_grad()
def run_steps(dynamics: nn.Module, drive: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Final readout and the list of ``steps`` per-step readouts (steps 1..T) for ``drive``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    with fixed_solver(dynamics):
        out, aux = dynamics(drive, steps=steps, eps=0.0, return_states=True)
    states = aux["states"]
    if len(states) != steps:
        raise RuntimeError(f"The dynamics recorded {len(states)} states for {steps} steps.")
    return out, states


@torch.no_grad()
def step_probabilities(model: nn.Module, images: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Contour probability after every step, (T, B, H, W), and the T states, of a Pathfinder segmentor.

    ``images`` are (B, 1, H, W) in [0, 1]; the core runs exactly ``steps`` fixed steps, whatever
    solver it trained with.
    """
    with fixed_solver(model.core, steps=steps):
        _, aux = model.features(images, return_states=True)
    states = aux["states"]
    return torch.stack([model.readout(s).softmax(1)[:, 1] for s in states]), states


class StepIoU:
    """Pooled IoU of the contour class (label 1) after every step, over any number of batches.

    ``update(step_probs, labels)``: ``step_probs`` (T, B, H, W) contour probabilities (or
    (T, B, 2, H, W) class scores), ``labels`` (B, H, W) with 0/1 and ``ignore_label``.
    """

    def __init__(self, threshold: float = 0.5, ignore_label: int = 255):
        self.threshold = threshold
        self.ignore_label = ignore_label
        self.counts: np.ndarray | None = None
        self.num_images = 0

    def update(self, step_probs: torch.Tensor, labels: torch.Tensor) -> None:
        if step_probs.dim() == 5:
            preds = step_probs.argmax(2)
        elif step_probs.dim() == 4:
            preds = (step_probs > self.threshold).long()
        else:
            raise ValueError(f"step_probs must be (T, B, H, W) or (T, B, 2, H, W); got {tuple(step_probs.shape)}.")
        if preds.shape[1:] != labels.shape:
            raise ValueError(f"Predictions {tuple(preds.shape[1:])} and labels {tuple(labels.shape)} differ in shape.")
        labels = labels.to(preds.device).long()
        valid = labels != self.ignore_label
        p, g = (preds == 1) & valid, (labels == 1) & valid
        counts = torch.stack([(p & g).flatten(1).sum(1), (p | g).flatten(1).sum(1)], 1).cpu().numpy()
        if self.counts is None:
            self.counts = np.zeros_like(counts)
        if counts.shape != self.counts.shape:
            raise ValueError(f"Every batch must have {self.counts.shape[0]} steps; got {counts.shape[0]}.")
        self.counts += counts
        self.num_images += labels.shape[0]

    def ious(self) -> np.ndarray:
        """(T,) IoU after each step (NaN where neither prediction nor label has contour pixels)."""
        if self.counts is None:
            raise RuntimeError("StepIoU.ious() called before any update().")
        inter, union = self.counts[:, 0].astype(np.float64), self.counts[:, 1].astype(np.float64)
        return np.divide(inter, union, out=np.full_like(inter, np.nan), where=union > 0)


def select_steps(total: int, n: int, count: int = 8) -> list[int]:
    """About ``count`` 1-based steps for a grid: spread over ``1..T`` and always including N and T."""
    if not 1 <= n <= total:
        raise ValueError(f"n={n} must lie in 1..{total}.")
    picks = set(np.unique(np.round(np.linspace(1, total, max(count - 1, 2))).astype(int)).tolist())
    picks |= {n, total}
    return sorted(picks)


@torch.no_grad()
def dataset_step_ious(model: nn.Module, cfg, dataset: str, steps: int, num_images: int, batch_size: int = 50) -> np.ndarray:
    """(steps,) pooled contour IoU after each step 1..``steps`` on the first ``num_images`` of ``dataset``.

    ``dataset`` is a registered Pathfinder split (e.g. ``pathfinder_cpu14_test``), mapped for
    inference as the evaluator maps it; the model's core runs ``steps`` fixed steps.
    """
    from detectron2.data import DatasetCatalog

    from rfpn.data.pathfinder_mapper import PathfinderDatasetMapper

    dicts = DatasetCatalog.get(dataset)[:num_images]
    mapper = PathfinderDatasetMapper(cfg, is_train=False)
    iou = StepIoU()
    for start in range(0, len(dicts), batch_size):
        batch = [mapper(d) for d in dicts[start : start + batch_size]]
        probs, _ = step_probabilities(model, model._images(batch), steps)
        iou.update(probs, torch.stack([d["sem_seg"] for d in batch]))
    return iou.ious()

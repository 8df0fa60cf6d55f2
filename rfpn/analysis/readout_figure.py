"""A figure a person can look at after training: test images and the readout after selected steps.

Each row is one test image, its label, then the model's contour probability after a few steps of
its recurrent core: on Pathfinder the readout starts at the marker and traces the contour step by
step, so the figure shows what the recurrence does, not only the final score.
"""
from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from torch import nn

from rfpn.data.pathfinder_mapper import PathfinderDatasetMapper

from . import figures
from .timecourse import select_steps, step_probabilities

__all__ = ["draw_test_readouts"]


def draw_test_readouts(model: nn.Module, cfg: CfgNode, dataset: str, path: str, count: int = 4) -> str:
    """Draw the first ``count`` images of ``dataset`` with ``model``'s readout per step; returns ``path``.

    The core runs ``MODEL.RECURRENT.TEST_STEPS`` fixed steps (``STEPS`` when unset); the column of
    ``STEPS``, the training step count, is titled in red.
    """
    rc = cfg.MODEL.RECURRENT
    total = rc.TEST_STEPS or rc.STEPS
    n = min(rc.STEPS, total)
    mapper = PathfinderDatasetMapper(cfg, is_train=False)
    samples = [mapper(d) for d in DatasetCatalog.get(dataset)[:count]]
    x = torch.stack([s["image"] for s in samples]).float() / 255.0
    was_training = model.training
    model.eval()
    try:
        probs, _ = step_probabilities(model, x.to(next(model.parameters()).device), total)
    finally:
        model.train(was_training)
    names = [f"test image {i}" for i in range(len(samples))]
    return figures.plot_readout_grid(
        path,
        {name: probs[:, i].float().cpu().numpy() for i, name in enumerate(names)},
        select_steps(total, n, 7),
        dict.fromkeys(names, n),
        image={name: s["image"][0].numpy() for name, s in zip(names, samples)},
        label={name: s["sem_seg"].numpy() for name, s in zip(names, samples)},
    )

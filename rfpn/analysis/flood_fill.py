"""The flood-fill comparison of R-FPN (the paper's Fig. 4).

The paper tessellates ground-truth object masks, flood-fills the tessellation step by step,
and compares that idealised routine with the masks the recurrent mask head gives after each
step. Here:

- :func:`voronoi_tessellation`: split a mask into cells around seed points (Voronoi cells);
- :func:`flood_fill_steps`: breadth-first flood fill over the cells' adjacency graph, one ring
  of neighbouring cells per step, from the cell holding a start pixel (default: the mask's
  most interior pixel);
- :func:`coverage`: fraction of the ground truth covered at every step;
- :func:`compare_fill_order`: how similar two timecourses are: per-step coverage of both, and
  the Spearman correlation between the steps at which each ground-truth pixel is first
  covered by the flood fill and by the model (1: the model fills pixels in the same order).
"""
from __future__ import annotations

from collections import deque

import numpy as np
from scipy import ndimage, stats

__all__ = ["compare_fill_order", "coverage", "first_cover_step", "flood_fill_steps", "interior_point", "voronoi_tessellation"]


def _as_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"Expected a 2-D mask (H, W); got shape {m.shape}.")
    if not m.any():
        raise ValueError("The mask is empty: nothing to tessellate or fill.")
    return m


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """The (row, col) of the mask pixel farthest from the background (ties: the first one)."""
    m = _as_mask(mask)
    dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c)


def voronoi_tessellation(mask: np.ndarray, num_cells: int = 16, seed: int = 0) -> np.ndarray:
    """Label map (H, W): 0 outside ``mask``, cells ``1..K`` inside, each pixel in its nearest seed's cell.

    ``num_cells`` seed pixels are drawn from the mask at random (``seed`` fixes them); fewer
    cells result when the mask has fewer pixels.
    """
    m = _as_mask(mask)
    coords = np.argwhere(m)
    rng = np.random.default_rng(seed)
    k = min(num_cells, len(coords))
    seeds = coords[rng.choice(len(coords), size=k, replace=False)]
    d2 = ((coords[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)
    labels = np.zeros(m.shape, dtype=np.int32)
    labels[coords[:, 0], coords[:, 1]] = d2.argmin(1) + 1
    return labels


def _adjacency(labels: np.ndarray) -> dict[int, set[int]]:
    """Cells sharing a 4-neighbour pixel edge (background 0 excluded)."""
    adj: dict[int, set[int]] = {int(c): set() for c in np.unique(labels) if c != 0}
    for a, b in ((labels[:-1, :], labels[1:, :]), (labels[:, :-1], labels[:, 1:])):
        edge = (a != b) & (a != 0) & (b != 0)
        for u, v in set(zip(a[edge].tolist(), b[edge].tolist())):
            adj[u].add(v)
            adj[v].add(u)
    return adj


def flood_fill_steps(labels: np.ndarray, steps: int, start: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean (steps, H, W): the region filled after each step of a flood fill over ``labels``' cells.

    Step 1 fills the cell holding ``start`` (default :func:`interior_point` of the labelled
    area); each later step adds every cell adjacent to the filled region. Cells not connected
    to the start are never filled.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D label map; got shape {labels.shape}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    start = interior_point(labels != 0) if start is None else start
    first = int(labels[start])
    if first == 0:
        raise ValueError(f"The start pixel {start} lies outside the labelled area.")
    adj = _adjacency(labels)
    depth = {first: 0}
    queue = deque([first])
    while queue:
        cell = queue.popleft()
        for nb in adj[cell]:
            if nb not in depth:
                depth[nb] = depth[cell] + 1
                queue.append(nb)
    reach = np.full(int(labels.max()) + 1, np.iinfo(np.int32).max, dtype=np.int64)
    for cell, d in depth.items():
        reach[cell] = d
    pixel_depth = reach[labels]
    pixel_depth[labels == 0] = np.iinfo(np.int32).max
    return np.stack([pixel_depth <= t for t in range(steps)])


def coverage(step_masks: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(T,) fraction of ground-truth pixels inside each step's mask."""
    masks = np.asarray(step_masks).astype(bool)
    g = _as_mask(gt)
    if masks.shape[1:] != g.shape:
        raise ValueError(f"Step masks {masks.shape[1:]} and ground truth {g.shape} differ in shape.")
    return (masks & g).reshape(len(masks), -1).sum(1) / g.sum()


def first_cover_step(step_masks: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Per ground-truth pixel, the first 1-based step whose mask covers it (T + 1 if none), flat over ``gt``."""
    masks = np.asarray(step_masks).astype(bool)
    g = _as_mask(gt)
    covered = masks[:, g]
    first = np.where(covered.any(0), covered.argmax(0) + 1, len(masks) + 1)
    return first


def compare_fill_order(model_masks: np.ndarray, flood_masks: np.ndarray, gt: np.ndarray) -> dict[str, object]:
    """Coverage curves of both timecourses and the Spearman correlation of their fill orders.

    ``model_masks`` (T, H, W) and ``flood_masks`` (T', H, W) are boolean (threshold model
    probabilities first). ``spearman`` is NaN when either timecourse fills every pixel at once.
    """
    g = _as_mask(gt)
    a, b = first_cover_step(model_masks, g), first_cover_step(flood_masks, g)
    if np.unique(a).size < 2 or np.unique(b).size < 2:
        rho = float("nan")
    else:
        rho = float(stats.spearmanr(a, b).statistic)
    return {
        "model_coverage": coverage(model_masks, g).tolist(),
        "flood_coverage": coverage(flood_masks, g).tolist(),
        "spearman": rho,
    }

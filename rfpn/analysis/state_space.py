"""State-space analysis of recurrent trajectories (the paper's Fig. 1b-c).

Inputs are the per-step states a model gives, e.g. ``aux["states"]`` of
``RecurrentDynamics(..., return_states=True)``: a list of ``T`` tensors ``(B, ...)``, the
state after steps ``1..T``. Steps are 1-based everywhere here: "step ``N``" is ``states[N - 1]``.

- :func:`stack_states`: the list as one ``(T, B, D)`` tensor of flattened states;
- :func:`state_distance`: per-image Euclidean distance between the states at two steps;
- :func:`fit_pca` / :class:`PCA`: the top principal axes of all states of all images;
- :func:`split_densities`: 2-D kernel densities of projected states for ``t <= N`` and ``t > N``;
- :func:`ks_test`: two-sample Kolmogorov-Smirnov test between two sets of distances.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import stats

__all__ = ["PCA", "KSResult", "fit_pca", "ks_test", "split_densities", "stack_states", "state_distance"]


def stack_states(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """``T`` states of shape ``(B, ...)`` -> one float tensor ``(T, B, D)`` of flattened states."""
    if len(states) == 0:
        raise ValueError("No states given: run the dynamics with return_states=True (at least one step).")
    shapes = {tuple(s.shape) for s in states}
    if len(shapes) != 1:
        raise ValueError(f"Every step's state must have one shape; got {sorted(shapes)}.")
    return torch.stack([s.detach().flatten(1).float().cpu() for s in states])


def _check_step(step: int, total: int, name: str) -> None:
    if not 1 <= step <= total:
        raise ValueError(f"{name}={step} is outside the recorded steps 1..{total}; run more steps or pick another.")


def state_distance(states: Sequence[torch.Tensor] | torch.Tensor, n: int, t: int) -> torch.Tensor:
    """Per-image Euclidean distance ``|h_t - h_n|`` between the states after steps ``n`` and ``t``.

    ``states``: a list from the dynamics or a ``(T, B, D)`` tensor from :func:`stack_states`.
    Returns shape ``(B,)``. Zero for a model that sits at its fixed point from step ``n`` on.
    """
    stacked = states if isinstance(states, torch.Tensor) else stack_states(states)
    _check_step(n, stacked.shape[0], "n")
    _check_step(t, stacked.shape[0], "t")
    return (stacked[t - 1] - stacked[n - 1]).norm(dim=1)


@dataclass
class PCA:
    """Principal axes of a point cloud: ``mean`` (D,), ``components`` (k, D) unit rows sorted by
    decreasing variance, ``explained_variance`` (k,) and ``explained_ratio`` (k,)."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_ratio: torch.Tensor

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """Coordinates of ``points`` (..., D) on the principal axes: shape (..., k)."""
        if points.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"Points have {points.shape[-1]} dimensions; this PCA was fit on {self.mean.shape[0]}.")
        return (points.float() - self.mean) @ self.components.T


def fit_pca(points: torch.Tensor, k: int = 2) -> PCA:
    """Exact PCA of ``points`` (M, D) (or (T, B, D): every step of every image is one point).

    Uses the ``M x M`` Gram matrix when there are fewer points than dimensions (hidden states
    of whole images have far more dimensions than there are images x steps), else the
    ``D x D`` covariance. Component signs are fixed so each one's largest entry is positive.
    """
    x = points.reshape(-1, points.shape[-1]).float()
    m, d = x.shape
    if m < 2:
        raise ValueError(f"PCA needs at least 2 points; got {m}.")
    if not 1 <= k <= min(m, d):
        raise ValueError(f"k={k} must lie in 1..{min(m, d)} for {m} points of dimension {d}.")
    mean = x.mean(0, dtype=torch.float64)
    xc = x - mean.float()
    if m < d:
        evals, evecs = torch.linalg.eigh((xc @ xc.T).double())
        evals, evecs = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k]
        comps = ((xc.T @ evecs.float()).double() / evals.sqrt().clamp_min(1e-12)).T
    else:
        evals, evecs = torch.linalg.eigh((xc.T @ xc).double())
        evals, comps = evals.flip(0)[:k].clamp_min(0), evecs.flip(1)[:, :k].T
    comps = comps / comps.norm(dim=1, keepdim=True).clamp_min(1e-12)
    biggest = comps.gather(1, comps.abs().argmax(1, keepdim=True))
    comps = comps * biggest.sign()
    variance = evals / (m - 1)
    total = xc.pow(2).sum(dtype=torch.float64) / (m - 1)
    return PCA(
        mean=mean.float(),
        components=comps.float(),
        explained_variance=variance.float(),
        explained_ratio=(variance / total.clamp_min(1e-30)).float(),
    )


def split_densities(
    projected: torch.Tensor | np.ndarray, n: int, grid: int = 80, margin: float = 0.1
) -> dict[str, np.ndarray]:
    """Gaussian kernel densities of 2-D projected states for steps ``1..n`` and ``n+1..T``.

    ``projected``: (T, B, 2). Returns ``x``, ``y`` (grid axes), ``early`` and ``late``
    (``grid x grid`` densities, rows along y; ``late`` is all zeros when ``T <= n``).
    """
    p = np.asarray(projected, dtype=np.float64)
    if p.ndim != 3 or p.shape[2] != 2:
        raise ValueError(f"projected must have shape (T, B, 2); got {p.shape}.")
    _check_step(n, p.shape[0], "n")
    pts = p.reshape(-1, 2)
    lo, hi = pts.min(0), pts.max(0)
    pad = (hi - lo) * margin + 1e-6
    xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid)
    ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid)
    gx, gy = np.meshgrid(xs, ys)
    where = np.vstack([gx.ravel(), gy.ravel()])

    def density(part: np.ndarray) -> np.ndarray:
        flat = part.reshape(-1, 2)
        if flat.shape[0] < 3:
            return np.zeros_like(gx)
        try:
            return stats.gaussian_kde(flat.T)(where).reshape(gx.shape)
        except np.linalg.LinAlgError:  # all points on a line (e.g. a model at its fixed point)
            jitter = flat + np.random.default_rng(0).normal(scale=1e-6 + 1e-3 * pad.mean(), size=flat.shape)
            return stats.gaussian_kde(jitter.T)(where).reshape(gx.shape)

    return {"x": xs, "y": ys, "early": density(p[:n]), "late": density(p[n:])}


@dataclass
class KSResult:
    """Two-sample Kolmogorov-Smirnov test: ``statistic`` (max CDF gap) and ``pvalue``."""

    statistic: float
    pvalue: float


def ks_test(a: Sequence[float] | torch.Tensor, b: Sequence[float] | torch.Tensor) -> KSResult:
    """Two-sided two-sample KS test of whether ``a`` and ``b`` come from one distribution."""
    a_np = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64).ravel()
    b_np = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64).ravel()
    if a_np.size == 0 or b_np.size == 0:
        raise ValueError(f"KS test needs two non-empty samples; got sizes {a_np.size} and {b_np.size}.")
    res = stats.ks_2samp(a_np, b_np)
    return KSResult(statistic=float(res.statistic), pvalue=float(res.pvalue))

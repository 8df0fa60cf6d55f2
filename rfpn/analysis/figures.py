"""Matplotlib figures of the dynamics analyses, written as PNG files.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, so nothing
here touches pyplot's global state or needs a display. Every function takes plain arrays
(from :mod:`rfpn.analysis`) and an output path, creates the parent directory and returns
the path it wrote.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from .generalization import GeneralizationMatrix
from .state_space import KSResult

__all__ = [
    "agg_figure",
    "plot_distances",
    "plot_flood_fill",
    "plot_generalization",
    "plot_gradient_agreement",
    "plot_learning_curves",
    "plot_long_contours",
    "plot_momentum_pathfinder",
    "plot_penalty_weight_curves",
    "plot_iou_vs_step",
    "plot_readout_grid",
    "plot_state_space",
    "plot_strip",
    "plot_training_diagnostics",
]

EARLY_COLOR, LATE_COLOR, EXEMPLAR_COLOR = "tab:red", "tab:blue", "gold"


def _style_iou_axis(ax, xlabel: str) -> None:
    """Labels, the [0, 1] IoU range and a legend, in the small fonts every figure here uses."""
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("IoU", fontsize=8)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def agg_figure(**kwargs) -> Figure:
    """A ``Figure`` on its own Agg canvas: no pyplot state, no display (``kwargs`` go to ``Figure``)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str, dpi: int = 100) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_readout_grid(
    path: str,
    timecourses: Mapping[str, np.ndarray],
    steps: Sequence[int],
    n: Mapping[str, int],
    image: np.ndarray | Mapping[str, np.ndarray] | None = None,
    label: np.ndarray | Mapping[str, np.ndarray] | None = None,
) -> str:
    """Rows: models (or images); columns: the readout (contour probability, (T, H, W) per row) at ``steps``.

    The column of each row's training step N is titled in red; ``image`` and ``label``, if
    given, fill two leading columns: one array for every row, or a mapping with one per row.
    """
    def per_row(arr, name):
        return arr[name] if isinstance(arr, Mapping) else arr

    lead = [a for a in (image, label) if a is not None]
    cols = len(lead) + len(steps)
    rows = len(timecourses)
    fig = Figure(figsize=(1.3 * cols + 0.8, 1.4 * rows + 0.3))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (name, probs) in enumerate(timecourses.items()):
        if max(steps) > len(probs):
            raise ValueError(f"{name}: {len(probs)} steps recorded, the grid asks for step {max(steps)}.")
        for c, (arr, title) in enumerate(zip(lead, ("image", "label"))):
            axes[r, c].imshow(per_row(arr, name), cmap="gray")
            axes[r, c].set_title(title, fontsize=8)
        for c, t in enumerate(steps, start=len(lead)):
            axes[r, c].imshow(probs[t - 1], cmap="magma", vmin=0, vmax=1)
            axes[r, c].set_title(f"t={t}", fontsize=8, color="red" if t == n[name] else "black")
        axes[r, 0].set_ylabel(name, fontsize=8)
        for ax in axes[r]:
            _off(ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_state_space(path: str, panels: Mapping[str, Mapping[str, object]]) -> str:
    """One panel per model: 2-D histogram of projected states (grey), densities for t <= N (red)
    and t > N (blue), and one exemplar image's trajectory (gold).

    Each panel maps ``projected`` (T, B, 2), ``densities`` (from
    :func:`rfpn.analysis.split_densities`), ``n`` and optionally ``exemplar`` (image index, 0).
    """
    fig = Figure(figsize=(3.6 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, p) in zip(axes, panels.items()):
        proj = np.asarray(p["projected"])
        dens = p["densities"]
        xs, ys = dens["x"], dens["y"]
        pts = proj.reshape(-1, 2)
        ax.hexbin(pts[:, 0], pts[:, 1], gridsize=40, cmap="Greys", mincnt=1, bins="log",
                  extent=(xs[0], xs[-1], ys[0], ys[-1]))
        for key, color in (("early", EARLY_COLOR), ("late", LATE_COLOR)):
            d = dens[key]
            if d.max() > 0:
                ax.contour(xs, ys, d, levels=4, colors=color, linewidths=1.0)
        traj = proj[:, int(p.get("exemplar", 0))]
        ax.plot(traj[:, 0], traj[:, 1], "-o", color=EXEMPLAR_COLOR, ms=2, lw=1)
        n = int(p["n"])
        ax.plot(traj[n - 1, 0], traj[n - 1, 1], "*", color=EARLY_COLOR, ms=10, label=f"t=N={n}")
        ax.plot(traj[-1, 0], traj[-1, 1], "*", color=LATE_COLOR, ms=10, label=f"t=T={len(traj)}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("PC 1", fontsize=8)
        ax.set_ylabel("PC 2", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_distances(
    path: str,
    distances: Mapping[str, np.ndarray],
    ks: Mapping[tuple[str, str], KSResult] | None = None,
    n: Mapping[str, int] | None = None,
    t: int | None = None,
) -> str:
    """Per-image distance between the states at t = N and t = T: one box per model with its mean,
    and the pairwise KS tests in the title."""
    fig = Figure(figsize=(1.6 * len(distances) + 2.4, 3.4))
    ax = fig.subplots()
    names = list(distances)
    data = [np.asarray(distances[k], dtype=np.float64) for k in names]
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    for i, d in enumerate(data, start=1):
        ax.plot(i, d.mean(), "D", color="black", ms=4)
        ax.annotate(f"mean {d.mean():.3g}", (i, d.mean()), textcoords="offset points", xytext=(6, 4), fontsize=7)
    if any(d.size and d.min() > 0 for d in data) and max(d.max() for d in data) / max(min(d.min() for d in data), 1e-30) > 100:
        ax.set_yscale("log")
    label = "|h_T - h_N|" if t is None else f"|h_{t} - h_N|"
    ax.set_ylabel(label, fontsize=8)
    if ks:
        lines = [f"{a} vs {b}: KS D={r.statistic:.2f}, p={r.pvalue:.1e}" for (a, b), r in ks.items()]
        ax.set_title("\n".join(lines), fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_iou_vs_step(path: str, curves: Mapping[str, np.ndarray], n: Mapping[str, int] | None = None) -> str:
    """IoU after every step, one line per model; a dashed line marks each model's training N."""
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.subplots()
    for i, (name, ious) in enumerate(curves.items()):
        color = f"C{i}"
        steps = np.arange(1, len(ious) + 1)
        ax.plot(steps, ious, color=color, label=name)
        if n and name in n:
            ax.axvline(n[name], color=color, ls="--", lw=0.8)
    _style_iou_axis(ax, "step t")
    fig.tight_layout()
    return _save(fig, path)


def plot_generalization(path: str, matrix: GeneralizationMatrix) -> str:
    """Heatmap of IoU (models x test lengths) with values written in, beside IoU-vs-length lines."""
    values = matrix.as_array()
    fig = Figure(figsize=(4.0 + 1.2 * len(matrix.test_lengths), 0.5 * len(matrix.models) + 2.6))
    ax_map, ax_line = fig.subplots(1, 2)
    im = ax_map.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    labels = [f"{m} (PF-{n})" for m, n in zip(matrix.models, matrix.train_lengths)]
    ax_map.set_xticks(range(len(matrix.test_lengths)), [f"PF-{n}" for n in matrix.test_lengths], fontsize=8)
    ax_map.set_yticks(range(len(labels)), labels, fontsize=8)
    ax_map.set_xlabel("test set", fontsize=8)
    for (r, c), v in np.ndenumerate(values):
        if not math.isnan(v):
            ax_map.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=ax_map, fraction=0.046)
    for i, (label, row) in enumerate(zip(labels, values)):
        ax_line.plot(matrix.test_lengths, row, "-o", color=f"C{i}", label=label, ms=3)
    _style_iou_axis(ax_line, "test contour length")
    fig.tight_layout()
    return _save(fig, path)


def plot_flood_fill(
    path: str, flood: np.ndarray, model: np.ndarray, steps: Sequence[int], comparison: Mapping[str, object]
) -> str:
    """Top row: the flood fill of the tessellated ground truth; bottom row: the model's per-step
    mask probabilities; right: coverage of the ground truth against step for both."""
    cols = len(steps) + 1
    fig = Figure(figsize=(1.3 * cols + 1.5, 3.0))
    axes = fig.subplots(2, cols, squeeze=False, gridspec_kw={"width_ratios": [1] * len(steps) + [2]})
    for c, t in enumerate(steps):
        axes[0, c].imshow(flood[min(t, len(flood)) - 1], cmap="magma", vmin=0, vmax=1)
        axes[1, c].imshow(model[t - 1], cmap="magma", vmin=0, vmax=1)
        axes[0, c].set_title(f"t={t}", fontsize=8)
        _off(axes[0, c])
        _off(axes[1, c])
    axes[0, 0].set_ylabel("flood fill", fontsize=8)
    axes[1, 0].set_ylabel("model", fontsize=8)
    gs = axes[0, -1].get_gridspec()
    axes[0, -1].remove()
    axes[1, -1].remove()
    ax = fig.add_subplot(gs[:, -1])
    ax.plot(np.arange(1, len(comparison["flood_coverage"]) + 1), comparison["flood_coverage"], label="flood fill")
    ax.plot(np.arange(1, len(comparison["model_coverage"]) + 1), comparison["model_coverage"], label="model")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("GT covered", fontsize=8)
    ax.set_title(f"fill-order Spearman {comparison['spearman']:.2f}", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_strip(path: str, frames: Sequence[np.ndarray], titles: Sequence[str], height: float = 1.6) -> str:
    """A horizontal strip of images (H, W) or (H, W, 3) with a title each (e.g. a mask timecourse)."""
    if len(frames) != len(titles) or not frames:
        raise ValueError(f"Need one title per frame and at least one frame; got {len(frames)} and {len(titles)}.")
    h, w = frames[0].shape[:2]
    fig = Figure(figsize=(height * w / h * len(frames) + 0.2, height + 0.35))
    axes = fig.subplots(1, len(frames), squeeze=False)[0]
    for ax, frame, title in zip(axes, frames, titles):
        ax.imshow(frame, cmap=None if frame.ndim == 3 else "magma")
        ax.set_title(title, fontsize=8)
        _off(ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_gradient_agreement(path: str, rows: Sequence) -> str:
    """Bars of each method's cosine to the exact implicit gradient (rows: ``GradientAgreement``)."""
    fig = Figure(figsize=(4.2, 2.6))
    ax = fig.add_subplot(1, 1, 1)
    names = [r.method for r in rows]
    ax.bar(names, [r.cosine for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i, r.cosine, f"{r.cosine:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(min(0.0, min(r.cosine for r in rows)), 1.08)
    ax.set_ylabel("cosine to exact implicit gradient", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_penalty_weight_curves(
    path: str, runs: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], lam: float
) -> str:
    """Constraint value ``max 1^T J`` (top) and penalty weight xi (bottom, log scale) over training.

    ``runs`` maps a run name to ``{"max_column_sum": [(iter, value)], "penalty_weight": [(iter, value)]}``.
    """
    fig = Figure(figsize=(5.0, 4.2))
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    for name, curves in runs.items():
        for ax, key in ((top, "max_column_sum"), (bottom, "penalty_weight")):
            points = curves.get(key) or []
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1)
    top.axhline(lam, color="k", linestyle="--", linewidth=0.8, label=f"lambda = {lam}")
    top.set_ylabel("max column sum of J", fontsize=8)
    bottom.set_ylabel("penalty weight xi", fontsize=8)
    bottom.set_yscale("log")
    bottom.set_xlabel("iteration", fontsize=8)
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curves(
    path: str, panels: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], ylabels: Mapping[str, str]
) -> str:
    """One panel per task: a curve per variant, ``(iteration, metric)`` (e.g. means over seeds)."""
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 3.2))
    for i, (task, curves) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for variant, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=variant, linewidth=1)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel(ylabels.get(task, ""), fontsize=8)
        if "MSE" in ylabels.get(task, ""):
            ax.set_yscale("log")  # the adding problem's MSE falls by orders of magnitude once it is solved
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_reconstruction_drift(path: str, curves: Mapping[str, Sequence[float]]) -> str:
    """Float32 error of the states a reversible backward rebuilds vs inversions (log scale), one line per coupling."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), [max(e, 1e-12) for e in curve], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("inversions from the last step")
    ax.set_ylabel("max |rebuilt - forward| (float32)")
    ax.set_title("reversible hGRU (float32): drift of the rebuilt states; exact mode rebuilds them bit for bit",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_backbone_memory(path: str, rows: Sequence[Mapping]) -> str:
    """Bars of MiB saved for backward and ms per training step, one bar per bottom-up network."""
    fig = Figure(figsize=(9, 3.4))
    names = [r["backbone"] for r in rows]
    for i, (key, scale, label) in enumerate((("saved_bytes", 2**20, "MiB saved for backward"),
                                             ("peak_rss_delta_mib", 1, "peak RSS increase (MiB)"),
                                             ("time_ms", 1, "ms / training step"))):
        ax = fig.add_subplot(1, 3, i + 1)
        values = [r[key] / scale for r in rows]
        ax.bar(range(len(rows)), values, color="tab:purple" if i == 0 else "tab:gray")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"bottom-up network, batch {rows[0]['batch']} at {rows[0]['size']}x{rows[0]['size']}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_pathfinder_benchmark(path: str, rows: Sequence[Mapping], train_set: str) -> str:
    """Test IoU and MiB saved for backward per method, and IoU vs contour length for the generalisation rows."""
    fig = Figure(figsize=(14, 4))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    names = [r["method"] for r in rows]
    axes[0].bar(names, [r["iou"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("test IoU (contour)")
    axes[0].set_ylim(0, 1)
    axes[0].set_title(f"{train_set}, equal budgets")
    axes[1].bar(names, [r["saved_bytes"] / 2**20 for r in rows], color="tab:orange")
    axes[1].set_ylabel("MiB saved for backward / iteration")
    axes[1].set_title("training memory")
    for r in rows:
        if r["generalisation"]:
            lengths = sorted(r["generalisation"], key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x))
            axes[2].plot(lengths, [r["generalisation"][x] for x in lengths], "o-", label=r["method"])
    axes[2].set_xlabel("test contour length (paddles)")
    axes[2].set_ylabel("test IoU")
    axes[2].set_ylim(0, 1)
    axes[2].set_title(f"trained on {train_set}")
    if any(r["generalisation"] for r in rows):
        axes[2].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return _save(fig, path)


def plot_momentum_pathfinder(path: str, rows: Sequence[Mapping], baselines: Mapping[str, float] | None = None) -> str:
    """Test IoU against the momentum mu of state-momentum rows (mu 0: the damped control), per gradient method.

    Solid lines: IoU at the training steps; dashed: IoU when run for 3x them (rows that have it).
    ``baselines`` (method -> IoU of the plain cell, no momentum and step 1) are drawn as dotted lines.
    """
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    colors = {}
    for grad in dict.fromkeys(r["method"].split(" ")[0] for r in rows):
        runs = sorted((r for r in rows if r["method"].split(" ")[0] == grad), key=lambda r: r["momentum"]["mu"])
        mus = [r["momentum"]["mu"] for r in runs]
        solver = runs[0].get("solver", "fixed")
        steps = f"{runs[0]['steps']} steps" if solver == "fixed" else f"{solver}, <= {runs[0]['steps']} steps"
        (line,) = ax.plot(mus, [r["iou"] for r in runs], "o-", label=f"{grad}, {steps}")
        colors[grad] = line.get_color()
        past = [(r["momentum"]["mu"], r["iou_past_training_steps"]) for r in runs if r.get("iou_past_training_steps")]
        if past:
            ax.plot([m for m, _ in past], [p["iou"] for _, p in past], "s--", color=line.get_color(),
                    label=f"{grad}, {past[0][1]['steps']} steps at test")
    for grad, iou in (baselines or {}).items():
        ax.axhline(iou, linestyle=":", color=colors.get(grad, "gray"), label=f"{grad}, no momentum (step 1)")
    ax.set_xticks(sorted({r["momentum"]["mu"] for r in rows}))
    ax.set_title(f"state momentum, step s = {rows[0]['momentum']['step']} (mu 0: the damped control)", fontsize=9)
    _style_iou_axis(ax, "momentum mu")
    fig.tight_layout()
    return _save(fig, path)


def plot_rfpn_benchmark(path: str, summary: Sequence[Mapping], sweep: Sequence[Mapping]) -> str:
    """PQ per model (bars: mean over seeds, dots: seeds), seconds per iteration, and mask-head bytes vs steps."""
    fig = Figure(figsize=(15, 4.2))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    if summary:
        names = [r["model"].replace("R-FPN ", "") for r in summary]
        axes[0].bar(names, [r["PQ"] for r in summary], color="tab:blue", alpha=0.7)
        for i, r in enumerate(summary):
            axes[0].plot([i] * len(r["PQ_runs"]), r["PQ_runs"], "k.")
        low = min(min(r["PQ_runs"]) for r in summary)
        axes[0].set_ylim(max(0.0, low - 5), None)
        axes[0].set_ylabel("PQ (val)")
        axes[0].set_title(f"PQ after {summary[0]['iters']} iterations (bars: mean, dots: seeds)")
        axes[1].bar(names, [r["sec_per_iter"] for r in summary], color="tab:gray")
        axes[1].set_ylabel("seconds / iteration")
        axes[1].set_title("training time per iteration")
        for ax in axes[:2]:
            ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    for grad, color in (("bptt", "tab:red"), ("crbp", "tab:green")):
        pts = [r for r in sweep if r["grad"] == grad]
        axes[2].plot([r["steps"] for r in pts], [r["bytes"] / 2**20 for r in pts], "o-", color=color, label=grad.upper())
    if sweep:
        axes[2].set_title(f"mask-head bytes kept for backward ({sweep[0]['rois']} RoIs)")
        axes[2].legend()
    axes[2].set_xlabel("recurrent steps")
    axes[2].set_ylabel("MB")
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_solver_residuals(path: str, traces: Mapping[str, Sequence[Mapping]], tols: Sequence[float], title: str) -> str:
    """Batch-max relative residual vs function evaluations, one line per solver; tolerances dashed."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for solver, trace in traces.items():
        residuals = [p["max_relative_residual"] for p in trace]
        ax.semilogy(range(1, len(residuals) + 1), residuals, label=solver)
    for tol in tols:
        ax.axhline(tol, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("function evaluations (cell calls on the batch)")
    ax.set_ylabel("max over batch of |F(h) - h| / |F(h)|")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_residual_stopping(path: str, models: Mapping[str, Mapping], steps: int) -> str:
    """IoU vs plain-iteration step (dashed: mean stop, dotted: twice it) and the relative state change per step."""
    fig = Figure(figsize=(10, 3.8))
    ax_iou, ax_res = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for (name, res), color in zip(models.items(), colors):
        iou = res["iou_per_step"]
        ax_iou.plot(range(1, len(iou) + 1), iou, color=color, label=f"{name} ({res['solver']})")
        ax_iou.axvline(res["stop_mean"], color=color, ls="--", lw=0.8)
        ax_iou.axvline(2 * res["stop_mean"], color=color, ls=":", lw=0.8)
        change = res["relative_change_per_step"]
        ax_res.semilogy(range(2, len(change) + 2), change, color=color, label=name)
        if res["tol"]:
            ax_res.axhline(res["tol"], color=color, ls="--", lw=0.8)
    ax_iou.axvline(steps, color="grey", lw=0.8)
    ax_iou.set_xlabel("step t of plain iteration (dashed: mean stop, dotted: 2x)")
    ax_iou.set_ylabel("pooled contour IoU")
    ax_iou.legend(fontsize=8)
    ax_res.set_xlabel("step t")
    ax_res.set_ylabel("mean |s_t - s_{t-1}| / |s_t| (readout state)")
    ax_res.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=80)


def plot_long_contours(path: str, summary: Sequence[Mapping], budget: Mapping) -> str:
    """Test IoU per method (bar: mean over seeds, dots: seeds) and MiB saved for backward, with C-RBP's budget."""
    fig = Figure(figsize=(10, 3.6))
    ax_iou, ax_mem = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = [s["method"] for s in summary]
    x = np.arange(len(summary))
    ax_iou.bar(x, [s["iou"]["mean"] for s in summary], color="tab:blue", alpha=0.7)
    for i, s in enumerate(summary):
        ax_iou.plot([i] * len(s["iou"]["runs"]), s["iou"]["runs"], "k.", markersize=5)
    ax_iou.set_ylim(0, 1)
    ax_iou.set_ylabel("test IoU (contour)", fontsize=8)
    ax_iou.set_title("pathfinder_cpu14, 3x3 kernels: IoU (dots: seeds)", fontsize=9)
    ax_mem.bar(x, [s["saved_bytes"] / 2**20 for s in summary], color="tab:orange")
    ax_mem.axhline(budget["crbp_bytes"] / 2**20, color="k", ls="--", lw=0.8, label="budget (C-RBP)")
    ax_mem.set_yscale("log")
    ax_mem.yaxis.set_major_formatter(ScalarFormatter())
    ax_mem.yaxis.set_minor_formatter(NullFormatter())
    ax_mem.set_ylabel("MiB saved for backward / iteration", fontsize=8)
    ax_mem.set_title(f"memory: {budget['bptt_steps']} BPTT steps fit the budget", fontsize=9)
    ax_mem.legend(fontsize=7)
    for ax in (ax_iou, ax_mem):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_training_diagnostics(path: str, runs: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]]) -> str:
    """Stability diagnostics over training, one panel per diagnostic and a line per run (``name, seed k``).

    Runs of one method share a colour. The spectral norm and the max column sum of ``1^T J`` get a
    line at 1: above it the dynamics are locally expansive. The last panel is the LCP weight (fixed,
    or adapted with ``LCP_WEIGHT_AUTO``).
    """
    panels = (("spectral_norm", "spectral norm of dF/dh", True), ("max_column_sum", "max column sum of 1^T J", True),
              ("relative_residual", "relative residual at the stop", False),
              ("neumann_terms", "Neumann terms summed (fewer: the series stopped shrinking)", False),
              ("neumann_cap_hits", "Neumann cap hits (norm cap, non-finite)", False),
              ("penalty_weight", "LCP weight xi", False))
    fig = Figure(figsize=(16, 6.5))
    methods = list(dict.fromkeys(name.split(",")[0] for name in runs))
    for i, (key, label, unit_line) in enumerate(panels, start=1):
        ax = fig.add_subplot(2, 3, i)
        for name, curves in runs.items():
            points = curves.get(key) or []
            if points:
                method = name.split(",")[0]
                ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{methods.index(method)}", lw=1,
                        label=method if name.endswith(f"seed {_first_seed(runs, method)}") else None)
        if unit_line:
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
        if key in ("relative_residual", "penalty_weight"):
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def _first_seed(runs: Mapping[str, object], method: str) -> str:
    return next(name.rsplit("seed ", 1)[-1] for name in runs if name.split(",")[0] == method)

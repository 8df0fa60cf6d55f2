#!/usr/bin/env python
"""Figure of Pathfinder stimuli and their labels for both presets (rendered in memory, no dataset needed).

    python tools/visualize_pathfinder.py                      # docs/figures/pathfinder_examples.png
    python tools/visualize_pathfinder.py --seed 3 --output out.png
"""
from __future__ import annotations

import argparse
import sys
import dataclasses
import os

import numpy as np

from rfpn.analysis.figures import agg_figure
from rfpn.data.pathfinder_generator import PRESETS, render_sample, sample_rng
from rfpn.utils import run_cli

ROWS = [("paper", 9), ("paper", 14), ("paper", 25), ("cpu", 6), ("cpu", 9), ("cpu", 14)]


def overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The stimulus in gray with the label in red."""
    rgb = np.repeat(image[..., None] / 255.0 * 0.6, 3, axis=2)
    rgb[label > 0] = (1.0, 0.15, 0.1)
    return rgb


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=3, help="stimuli per row")
    p.add_argument("--output", default="docs/figures/pathfinder_examples.png")
    args = p.parse_args(argv)

    fig = agg_figure(figsize=(2 * args.examples * 1.3, len(ROWS) * 1.4))
    axes = fig.subplots(len(ROWS), 2 * args.examples)
    for r, (preset, length) in enumerate(ROWS):
        settings = dataclasses.replace(PRESETS[preset], contour_length=length)
        for k in range(args.examples):
            sample = render_sample(settings, sample_rng(args.seed, "test", k))
            axes[r, 2 * k].imshow(sample.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axes[r, 2 * k + 1].imshow(overlay(sample.image, sample.label), interpolation="nearest")
        size = settings.image_size
        axes[r, 0].set_ylabel(f"{preset} N={length}\n{size}x{size}", fontsize=7)
    for k in range(args.examples):
        axes[0, 2 * k].set_title("image", fontsize=7)
        axes[0, 2 * k + 1].set_title("label (red)", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

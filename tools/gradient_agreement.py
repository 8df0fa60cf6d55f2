#!/usr/bin/env python
"""Cosine between each gradient method's gradient and the exact implicit gradient, on a trained model.

Loads a Pathfinder model (config + weights), draws a batch of generated stimuli of its contour
length, and compares the cell-parameter gradient of the task loss under ``bptt``, ``rbp``, ``jfb``
and ``phantom`` (each with the model's own solver settings) with the implicit gradient solved to
1e-10 at a fixed point solved to 1e-6 (:mod:`rfpn.analysis.gradient_agreement`). Writes
``gradient_agreement.json`` and ``.png`` under ``--output-dir``::

    python tools/gradient_agreement.py --config-file output/benchmark_pathfinder_methods/c-rbp-auto/config.yaml \\
        --weights output/benchmark_pathfinder_methods/c-rbp-auto/model_final.pth --copy-to-docs
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
import torch

from rfpn.analysis import gradient_agreement
from rfpn.analysis.figures import plot_gradient_agreement
from rfpn.data.pathfinder_generator import PRESETS, render_sample
from rfpn.modeling.pathfinder_segmentor import pixel_loss
from rfpn.utils import run_cli
from rfpn.utils.cli import tool_parser
from rfpn.utils.files import copy_to_docs, write_json_atomic
from rfpn.utils.models import load_eval_model



def parse_args(argv=None) -> argparse.Namespace:
    p = tool_parser(__doc__, threads=1, output_dir=os.path.join("output", "gradient_agreement"), copy_to_docs=True,
                    opts=True)
    p.add_argument("--config-file", required=True, help="the model's config (a training run writes config.yaml)")
    p.add_argument("--weights", required=True, help="the model's checkpoint")
    p.add_argument("--methods", nargs="+", default=["bptt", "rbp", "jfb", "phantom"])
    p.add_argument("--batch", type=int, default=8, help="generated stimuli in the batch")
    p.add_argument("--contour-length", type=int, default=9, help="paddles of the generated targets (CPU preset)")
    p.add_argument("--seed", type=int, default=123, help="seed of the stimuli")
    return p.parse_args(argv)


def stimuli(contour_length: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] ``(B, 1, S, S)`` and 0/1 contour labels ``(B, S, S)`` from the CPU preset."""
    settings = dataclasses.replace(PRESETS["cpu"], contour_length=contour_length).resolved()
    samples = [render_sample(settings, seed * 100_003 + i) for i in range(batch)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).unsqueeze(1).float() / 255.0
    labels = torch.from_numpy(np.stack([s.label for s in samples]) > 0).long()
    return images, labels


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, model = load_eval_model(args.config_file, args.weights, args.opts, "PathfinderSegmentor")
    images, labels = stimuli(args.contour_length, args.batch, args.seed)
    pf = cfg.MODEL.PATHFINDER
    with torch.no_grad():
        drive = model.input_conv(images).pow(2)

    def loss_fn(state: torch.Tensor) -> torch.Tensor:
        return pixel_loss(model.readout(state), labels, pf.LOSS, pf.FOCAL_GAMMA, pf.FG_WEIGHT)

    rows, reference = gradient_agreement(model.core, drive, loss_fn, args.methods)
    report = {
        "config": args.config_file,
        "weights": args.weights,
        "batch": args.batch,
        "contour_length": args.contour_length,
        "reference": reference,
        "rows": [row.__dict__ for row in rows],
    }
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "gradient_agreement.json")
    png_path = plot_gradient_agreement(os.path.join(args.output_dir, "gradient_agreement.png"), rows)
    write_json_atomic(json_path, report)
    if args.copy_to_docs:
        copy_to_docs(json_path)
        copy_to_docs(png_path)
    print("| method | cosine to exact implicit gradient | relative error | cell evaluations |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row.method} | {row.cosine:.4f} | {row.relative_error:.3f} | {row.steps} |")
    print(f"Reference: {reference['steps']} evaluations, forward {reference['forward_stop']}, backward {reference['backward_stop']}")
    print(f"Wrote {json_path} and {png_path}")
    return report


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])

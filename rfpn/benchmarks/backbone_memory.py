"""Activation memory and time of one training step of a Detectron2 bottom-up network (ResNet, RevNet, ...).

For each packaged config the backbone's bottom-up network runs forward and backward on a
random batch (the loss: the mean of every output feature map). Recorded per config:

- ``saved_bytes``: bytes the forward keeps for backward (``rfpn.recurrent.saved_tensor_bytes``);
  ``peak_saved_bytes``: the most held at once, backward's recomputations included;
- ``peak_rss_delta_mib``: peak resident memory of a fresh process during the step, minus its
  resident memory after the build (one subprocess per config). It includes the gradients
  (4 bytes per parameter) and backward's working memory, so activation savings show in it
  only where activations dominate (large images);
- ``time_ms``: median wall time of a step after a warm-up; ``parameters``.

Pairs of equal depth are compared as ratios (RevNet over ResNet) from one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from rfpn.utils.process_memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

MIB = 1024.0 * 1024.0
# label -> (packaged config, overrides); the ResNets use GroupNorm and no frozen stage, as the RevNets
BACKBONES: dict[str, tuple[str, list[str]]] = {
    "ResNet-18": ("Synthetic-Panoptic/panoptic_fpn_R_18.yaml", []),
    "RevNet-18": ("Synthetic-Panoptic/panoptic_fpn_RevNet_18.yaml", []),
    "RevNet-18 (plain autograd)": ("Synthetic-Panoptic/panoptic_fpn_RevNet_18.yaml", ["MODEL.REVNET.REVERSIBLE", "False"]),
    "ResNet-101": ("COCO-PanopticSegmentation/panoptic_fpn_R_101_3x.yaml",
                   ["MODEL.RESNETS.NORM", "GN", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.WEIGHTS", ""]),
    "RevNet-104": ("COCO-PanopticSegmentation/panoptic_fpn_RevNet_104_3x.yaml", []),
}
PAIRS = (("RevNet-18", "ResNet-18"), ("RevNet-104", "ResNet-101"))


def measure(label: str, batch: int, size: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """One training step of ``label``'s bottom-up network in this process (peak RSS valid in a fresh one)."""
    import torch
    from detectron2.modeling import build_backbone

    from rfpn import model_zoo
    from rfpn.recurrent import saved_tensor_bytes

    config, overrides = BACKBONES[label]
    cfg = model_zoo.get_config(config)
    cfg.merge_from_list(overrides + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(seed)
    network = build_backbone(cfg).bottom_up.train()
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def step() -> None:
        network.zero_grad(set_to_none=True)
        loss = sum(v.mean() for v in network(images).values())
        loss.backward()

    baseline = current_rss_bytes()
    reset = reset_peak_rss()
    with saved_tensor_bytes() as counter:
        network.zero_grad(set_to_none=True)
        loss = sum(v.mean() for v in network(images).values())
        kept = counter.forward_bytes  # what the forward keeps for backward
        loss.backward()  # recomputations in backward count toward the most held at once
    peak = peak_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return {
        "backbone": label,
        "config": config,
        "overrides": overrides,
        "batch": batch,
        "size": size,
        "parameters": sum(p.numel() for p in network.parameters()),
        "saved_bytes": kept,
        "peak_saved_bytes": counter.peak_bytes,
        "peak_rss_delta_mib": max(peak - baseline, 0) / MIB,
        "peak_rss_reset": reset,
        "time_ms": statistics.median(times),
        "time_ms_all": times,
    }


def measure_in_subprocess(label: str, batch: int, size: int, repeats: int, threads: int) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter with ``threads`` threads."""
    cmd = [sys.executable, "-m", __name__, "--single", label, "--batch", str(batch), "--size", str(size),
           "--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"Backbone {label!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(rows: list[dict]) -> list[dict]:
    """RevNet over ResNet ratios for every pair of :data:`PAIRS` that was measured."""
    by = {r["backbone"]: r for r in rows}
    out = []
    for rev, res in PAIRS:
        if rev in by and res in by:
            a, b = by[rev], by[res]
            out.append({"pair": f"{rev} / {res}", "saved_bytes": a["saved_bytes"] / b["saved_bytes"],
                        "peak_saved_bytes": a["peak_saved_bytes"] / b["peak_saved_bytes"],
                        "peak_rss_delta": a["peak_rss_delta_mib"] / max(b["peak_rss_delta_mib"], 1e-9),
                        "time": a["time_ms"] / b["time_ms"], "parameters": a["parameters"] / b["parameters"]})
    return out


def format_table(rows: list[dict], ratios: list[dict]) -> str:
    lines = ["| backbone | parameters | MiB saved for backward | MiB held at once | peak RSS increase (MiB) | ms / step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['parameters'] / 1e6:.1f}M | {r['saved_bytes'] / MIB:.1f} | "
                     f"{r['peak_saved_bytes'] / MIB:.1f} | {r['peak_rss_delta_mib']:.0f} | {r['time_ms']:.0f} |")
    for c in ratios:
        lines.append(f"\n{c['pair']}: saved bytes x{c['saved_bytes']:.2f}, held at once x{c['peak_saved_bytes']:.2f}, "
                     f"peak RSS increase x{c['peak_rss_delta']:.2f}, "
                     f"time x{c['time']:.2f}, parameters x{c['parameters']:.2f}")
    return "\n".join(lines)


def _single(argv: list[str]) -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--single", choices=list(BACKBONES), required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.single, args.batch, args.size, args.repeats)))


if __name__ == "__main__":
    _single(sys.argv[1:])

"""Peak activation memory of rfpn / Detectron2 models, and the ResNet stem vs the RNNPool stem (seed 004).

A :class:`Point` is a part of a model built from a config (``stem``, ``bottom_up``, ``backbone`` or
the whole ``model``) at one input size. :func:`measure_point` counts its inference with
:func:`rfpn.analysis.peak_ram.peak_ram` (operator rule, liveness, held) and its FLOPs
(``torch.utils.flop_counter``: convolutions and matrix products; element-wise ops, norms and pooling
are not counted); :func:`rss_in_fresh_process` runs the same inference in a new interpreter
(``python -m rfpn.benchmarks.peak_ram --single``) and reports its peak RSS increase, the allocator's
view that the liveness count is checked against. ``bottom_up`` and ``backbone`` inputs are padded
to the backbone's size divisibility (800x1333 becomes 800x1344), as Detectron2's ``ImageList`` does.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from detectron2.modeling import build_backbone, build_model

from rfpn import model_zoo
from rfpn.analysis.peak_ram import MIB, format_layer_table, peak_ram, peak_rss_increase, plot_peak_ram
from rfpn.utils.cli import UsageError, load_config
from rfpn.utils.files import copy_to_docs, write_json_atomic

PARTS = ("stem", "bottom_up", "backbone", "model")
# the stems compared: (label, model-zoo config, overrides)
STEMS = {
    "resnet": ("ResNet stem (7x7/2 conv, GN, ReLU, 3x3/2 max pool)", "Synthetic-Panoptic/panoptic_fpn_R_18.yaml", ()),
    "rnnpool": ("RNNPool stem, batched", "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool.yaml",
                ("MODEL.RNNPOOL.STREAM_ROWS", "0")),
    "rnnpool_stream": ("RNNPool stem, streaming (a row of patches at a time)",
                       "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool.yaml", ()),
}
STEM_GOAL_RATIO = 1 / 8  # streaming RNNPool stem vs ResNet stem at 800x1333
RSS_GOAL = 0.15  # liveness vs fresh-process peak RSS increase
RSS_MIN_BYTES = 16 * 2**20  # below this, RSS is dominated by what the trace cannot see (first-call kernel buffers, heap growth)
WARMUP_SIZE = 64  # a first inference at this size initialises lazy state before the RSS is measured
# with this environment glibc maps every block of 16 KiB or more on its own and unmaps it when freed, so
# the RSS follows the live blocks; by default it keeps freed blocks in its heap (about 3 MiB for the streaming stem)
MMAP_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "16384"}


@dataclass(frozen=True)
class Point:
    """``part`` of the model of ``config`` (a YAML path or a model-zoo name) at ``height x width``."""

    config: str
    part: str
    height: int
    width: int
    opts: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part={self.part!r} is not valid; allowed values: {', '.join(PARTS)}.")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"size={self.height}x{self.width} is not valid; allowed values: positive integers.")


def _config_path(config: str) -> str:
    return config if os.path.isfile(config) else model_zoo.get_config_file(config)


def build_point(point: Point):
    """The module of ``point`` (eval mode, seeded weights) and ``make_inputs(height, width)`` giving its inputs."""
    cfg = load_config(_config_path(point.config), list(point.opts))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(point.seed)
    if point.part == "model":
        def make_inputs(height: int, width: int) -> tuple:
            image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(point.seed + 1)) * 255
            return ([{"image": image, "height": height, "width": width}],)

        return build_model(cfg).eval(), make_inputs
    backbone = build_backbone(cfg).eval()
    module = {"stem": backbone.bottom_up.stem, "bottom_up": backbone.bottom_up, "backbone": backbone}[point.part]
    divisor = backbone.size_divisibility if point.part != "stem" else 1

    def make_inputs(height: int, width: int) -> tuple:
        if divisor > 1:
            height, width = -(-height // divisor) * divisor, -(-width // divisor) * divisor
        return (torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(point.seed + 1)),)

    return module, make_inputs


def measure_point(point: Point, depth: int | None = None):
    """Trace one inference of ``point``; returns ``(PeakRamReport, row)`` with the row's FLOPs and sizes."""
    module, make_inputs = build_point(point)
    inputs = make_inputs(point.height, point.width)
    report = peak_ram(module, *inputs, depth=depth)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        module(*inputs)
    first = inputs[0][0]["image"] if point.part == "model" else inputs[0]
    row = {**asdict(point), "input_shape": list(first.shape), "flops": flops.get_total_flops(),
           "parameters": sum(p.numel() for p in module.parameters()), **report.summary(),
           "layers": [asdict(r) for r in report.layers]}
    return report, row


def rss_increase(point: Point) -> dict[str, Any]:
    """In this process: a warm-up inference, then the peak RSS increase of one inference of ``point``."""
    module, make_inputs = build_point(point)
    with torch.no_grad():
        module(*make_inputs(WARMUP_SIZE, WARMUP_SIZE))
    inputs = make_inputs(point.height, point.width)
    gc.collect()
    with torch.no_grad():
        increase = peak_rss_increase(lambda: module(*inputs))
    return {"rss_increase_bytes": increase, "rss_increase_mib": increase / 2**20}


def rss_in_fresh_process(point: Point, threads: int = 1, mmap_malloc: bool = False) -> dict[str, Any]:
    """:func:`rss_increase` in a new interpreter (nothing allocated before it, ``threads`` intra-op threads).

    ``mmap_malloc`` runs it with :data:`MMAP_MALLOC`, so memory glibc keeps after a free is not counted.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **(MMAP_MALLOC if mmap_malloc else {}))
    cmd = [sys.executable, "-m", __name__, "--single", json.dumps(asdict(point))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"The fresh-process RSS measurement of {point} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_both_mallocs(point: Point, threads: int = 1) -> dict[str, Any]:
    """The fresh-process RSS increase with glibc's default malloc and with :data:`MMAP_MALLOC` (``rss_mmap_*``)."""
    mmap = rss_in_fresh_process(point, threads, mmap_malloc=True)
    return {**rss_in_fresh_process(point, threads), "rss_mmap_increase_bytes": mmap["rss_increase_bytes"],
            "rss_mmap_increase_mib": mmap["rss_increase_mib"]}


def rss_agreement(row: dict[str, Any], rss_key: str = "rss_increase_bytes") -> dict[str, float]:
    """Relative difference of the RSS increase from the liveness and held peaks of what the call allocated (inputs excluded)."""
    return {count: row[rss_key] / (row[f"{count}_peak_bytes"] - row["input_bytes"]) - 1
            for count in ("liveness", "held")}


def stem_points(points: list[tuple[str, int, int]]) -> dict[str, Point]:
    """Every stem variant at each ``(part, height, width)``, keyed ``<variant>/<part>/<H>x<W>``."""
    return {f"{key}/{part}/{h}x{w}": Point(_config_path(config), part, h, w, tuple(opts))
            for part, h, w in points for key, (_, config, opts) in STEMS.items()}


def check_goals(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Streaming stem vs ResNet stem at 800x1333 (each count), and liveness vs RSS where the call allocates enough."""
    goals: dict[str, Any] = {}
    stream, resnet = rows.get("rnnpool_stream/stem/800x1333"), rows.get("resnet/stem/800x1333")
    if stream and resnet:
        counts = [c for c in ("operator_rule_peak_bytes", "liveness_peak_bytes", "held_peak_bytes", "rss_increase_bytes")
                  if c in stream and c in resnet]
        ratios = {c: stream[c] / resnet[c] for c in counts}
        goals["stem_800x1333_streaming_over_resnet"] = {
            "goal": f"<= {STEM_GOAL_RATIO:g}", "ratios": ratios, "met": {c: r <= STEM_GOAL_RATIO for c, r in ratios.items()},
            "output_over_resnet": stream["output_bytes"] / resnet["liveness_peak_bytes"]}
    measured = {k: r for k, r in rows.items() if "rss_increase_bytes" in r}
    large = {k: rss_agreement(r) for k, r in measured.items() if r["liveness_peak_bytes"] - r["input_bytes"] >= RSS_MIN_BYTES}
    if measured:
        mmap = {k: rss_agreement(measured[k], "rss_mmap_increase_bytes") for k in large
                if "rss_mmap_increase_bytes" in measured[k]}
        goals["liveness_vs_rss"] = {
            "goal": f"|RSS increase / (liveness peak - inputs) - 1| <= {RSS_GOAL:g}",
            "relative_difference": large,
            "met": {k: abs(v["liveness"]) <= RSS_GOAL for k, v in large.items()},
            "relative_difference_mmap_malloc": mmap,
            "met_mmap_malloc": {k: abs(v["liveness"]) <= RSS_GOAL for k, v in mmap.items()},
            "not_judged": {k: f"allocates under {RSS_MIN_BYTES // 2**20} MiB: fixed costs the trace cannot see dominate "
                              "the RSS" for k in measured if k not in large},
        }
    return goals


def main(argv: list[str] | None = None) -> None:
    """The per-point child process of :func:`rss_in_fresh_process`: prints one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--single", required=True, help="a Point as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads(args.single)
    print(json.dumps(rss_increase(Point(**{**spec, "opts": tuple(spec["opts"])}))))



def _summary_line(label: str, row: dict) -> str:
    line = (f"{label:40s} operator rule {row['operator_rule_peak_mib']:8.2f} MiB | liveness "
            f"{row['liveness_peak_mib']:8.2f} | held {row['held_peak_mib']:8.2f} | input {row['input_bytes'] / MIB:6.2f}"
            f" | {row['flops'] / 1e9:7.2f} GFLOPs")
    if "rss_increase_bytes" in row:
        agree = rss_agreement(row)
        line += (f" | RSS +{row['rss_increase_mib']:.2f} MiB (vs liveness {agree['liveness']:+.0%}, "
                 f"held {agree['held']:+.0%})")
    if "rss_mmap_increase_bytes" in row:
        line += (f" | mmap malloc +{row['rss_mmap_increase_mib']:.2f} MiB "
                 f"({rss_agreement(row, 'rss_mmap_increase_bytes')['liveness']:+.0%})")
    return line


def report(args: argparse.Namespace) -> None:
    """``tools/peak_ram.py report``: one config, part and size; table, JSON and figure."""
    if not Path(args.config).is_file():
        raise UsageError(f"Config file {args.config!r} does not exist; rfpn's are under configs/.")
    point = Point(args.config, args.part, args.size[0], args.size[1], tuple(args.opts))
    result, row = measure_point(point, depth=args.depth)
    if args.rss:
        row.update(rss_both_mallocs(point, args.threads))
    print(format_layer_table(result, top=args.top))
    print(_summary_line(f"{args.part} {args.size[0]}x{args.size[1]}", row))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(out / "peak_ram.json"), {"command": _command(), "row": row})
    plot_peak_ram({f"{Path(args.config).stem}: {args.part} {args.size[0]}x{args.size[1]}": result},
                  out / "peak_ram.png")
    print(f"Wrote {out / 'peak_ram.json'} and {out / 'peak_ram.png'}")


def stems(args: argparse.Namespace) -> None:
    """``tools/peak_ram.py stems``: the ResNet stem vs the RNNPool stem (batched, streaming), with the goal checks."""
    rows, reports = {}, {}
    for key, point in stem_points(args.point).items():
        result, row = measure_point(point, depth=args.depth)
        if not args.no_rss:
            row.update(rss_both_mallocs(point, args.threads))
        row["variant"] = STEMS[key.split("/")[0]][0]
        rows[key], reports[f"{row['variant']}\n{point.part} {point.height}x{point.width}"] = row, result
        print(_summary_line(key, row), flush=True)
    goals = check_goals(rows)
    print(json.dumps(goals, indent=1))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "peak_ram.json", out / "peak_ram.png"
    write_json_atomic(str(json_path), {"command": _command(), "torch": torch.__version__, "threads": args.threads,
                                       "rows": rows, "goals": goals})
    plot_peak_ram(reports, png_path)
    if args.copy_to_docs:
        copy_to_docs(json_path)
        copy_to_docs(png_path)
    print(f"Wrote {json_path} and {png_path}")


def _command() -> str:
    return "python tools/peak_ram.py " + " ".join(sys.argv[1:])


if __name__ == "__main__":
    main()

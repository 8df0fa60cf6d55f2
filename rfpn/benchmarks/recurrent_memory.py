"""Memory and time of one training step of the recurrent core, per gradient method and step count.

For every (method, steps) point this records

- ``saved_bytes``: the bytes autograd keeps for backward during one training step
  (``rfpn.recurrent.saved_tensor_bytes``; independent of the allocator);
- ``peak_rss_delta_mib``: the peak resident memory of a *fresh* process running one
  training step, minus its resident memory after imports and model build;
- ``time_ms``: the median wall time of one training step (after a warm-up).

A training step is the forward pass of a Pathfinder-shaped model (a 1-channel image, a
conv stem, the hGRU dynamics, a 1x1 readout, per-pixel cross-entropy on random labels,
plus the weighted LCP for ``cbptt``/``crbp``) and its backward pass. No dataset needed.

Besides the registered gradient methods, the reversible variants (:data:`VARIANTS`) measure
the additive coupling and exact mode, and BPTT through the same coupled dynamics.

Each point runs in its own subprocess (``--single``), so peak RSS is not polluted by earlier
points. Results go to ``--output-dir`` as ``memory.json``, ``memory_vs_steps.png`` and
``table.md``; ``--copy-to-docs`` also refreshes the copies the README shows::

    python tools/benchmark_memory.py --copy-to-docs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from rfpn.recurrent import GRADS
from rfpn.utils.cli import tool_parser
from rfpn.utils.files import copy_to_docs
from rfpn.utils.process_memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

# name -> (gradient method, coupled cell, extra RecurrentDynamics keywords)
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "reversible-exact": ("reversible", "momentum", {"reversible_exact": True}),
    "reversible-additive": ("reversible", "additive", {"coupling": "additive"}),
    "reversible-additive-exact": ("reversible", "additive", {"coupling": "additive", "reversible_exact": True}),
    "bptt-momentum": ("bptt", "momentum", {}),  # BPTT through the momentum-coupled hGRU that reversible inverts
    "bptt-additive": ("bptt", "additive", {}),
}
# every reversible method and the BPTT through the same coupled dynamics its time is compared with
COUPLED_BPTT = {
    name: f"bptt-{coupling}"
    for name, (grad, coupling, _) in {"reversible": ("reversible", "momentum", {}), **VARIANTS}.items()
    if grad == "reversible"
}
METHODS = tuple(GRADS) + tuple(VARIANTS)
PRECISIONS = ("fp32", "bf16")
MIB = 1024.0 * 1024.0


@dataclass
class BenchmarkSettings:
    """Shapes and hyper-parameters shared by every point (CPU-scale Pathfinder by default)."""

    batch: int = field(default=8, metadata={"help": "images per training step"})
    channels: int = field(default=16, metadata={"help": "hGRU channels"})
    size: int = field(default=64, metadata={"help": "image side in pixels"})
    kernel: int = field(default=7, metadata={"help": "hGRU and stem kernel size (odd)"})
    norm: str = field(default="bn", metadata={"help": "hGRU norm: bn (batch statistics), gn or none"})
    neumann_steps: int = field(default=15, metadata={"help": "max Neumann terms of the rbp/crbp backward"})
    lcp_lambda: float = field(default=0.9, metadata={"help": "LCP target lambda (cbptt/crbp)"})
    penalty_weight: float = field(default=10.0, metadata={"help": "LCP weight in the loss"})
    phantom_steps: int = field(default=5, metadata={"help": "phantom/cphantom: damped steps with the graph"})
    phantom_tau: float = field(default=0.5, metadata={"help": "phantom/cphantom: damping tau"})
    reversible_gamma: float = field(default=0.9, metadata={"help": "reversible/creversible: momentum coupling gamma"})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16 (the forward under CPU autocast)"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    warmup: int = field(default=0, metadata={"help": "extra warm-up steps (the memory step already warms up)"})
    repeats: int = field(default=3, metadata={"help": "timed steps per point; the median is reported"})
    time_budget: float = field(default=60.0, metadata={"help": "seconds of timing per point; fewer repeats if slow"})
    seed: int = field(default=0, metadata={"help": "seed of weights and random data"})

    def validate(self) -> None:
        for name in ("batch", "channels", "size", "kernel", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}.")
        if self.kernel % 2 == 0:
            raise ValueError(f"--kernel must be odd (same-size convolutions); got {self.kernel}.")
        if self.warmup < 0 or self.neumann_steps < 0 or self.time_budget < 0:
            raise ValueError("--warmup, --neumann-steps and --time-budget must be >= 0.")
        if not 0.0 <= self.lcp_lambda < 1.0:
            raise ValueError(f"--lcp-lambda must lie in [0, 1); got {self.lcp_lambda}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}.")
        if self.norm not in ("bn", "gn", "none"):
            raise ValueError(f"--norm must be one of bn, gn, none; got {self.norm!r}.")

    def to_args(self) -> list[str]:
        """The command-line flags that reproduce these settings in a child process."""
        args: list[str] = []
        for f in fields(self):
            args += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return args


def build_step_model(settings: BenchmarkSettings, method: str, steps: int):
    """A Pathfinder-shaped model around ``RecurrentDynamics``; same weights for equal seeds."""
    import torch
    from torch import nn

    from rfpn.recurrent import AdditiveCouplingCell, HGRUCell, RecurrentDynamics, StateMomentumCell

    grad, coupling, extra = VARIANTS.get(method, (method, "", {}))

    class StepModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c, k = settings.channels, settings.kernel
            self.stem = nn.Conv2d(1, c, k, padding=k // 2)

            def make_cell(width: int) -> nn.Module:
                return HGRUCell(width, k, norm=settings.norm, timesteps=steps)

            cell = AdditiveCouplingCell(make_cell, c) if coupling == "additive" else make_cell(c)
            if grad == "bptt" and coupling == "momentum":
                cell = StateMomentumCell(cell, settings.reversible_gamma, 1 - settings.reversible_gamma)
            self.dynamics = RecurrentDynamics(
                cell,
                steps,
                grad=grad,
                neumann_steps=settings.neumann_steps,
                lcp_lambda=settings.lcp_lambda,
                phantom_steps=settings.phantom_steps,
                phantom_tau=settings.phantom_tau,
                reversible_gamma=settings.reversible_gamma,
                **extra,
            )
            self.head = nn.Conv2d(c, 2, 1)

        def forward(self, images, labels):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
                h, aux = self.dynamics(self.stem(images))
                loss = nn.functional.cross_entropy(self.head(h), labels)
                return loss + settings.penalty_weight * aux["penalty"], aux

    torch.manual_seed(settings.seed)
    return StepModel().train()


def _random_batch(settings: BenchmarkSettings):
    import torch

    gen = torch.Generator().manual_seed(settings.seed + 1)
    shape = (settings.batch, 1, settings.size, settings.size)
    images = torch.rand(shape, generator=gen)
    labels = torch.randint(0, 2, (settings.batch, settings.size, settings.size), generator=gen)
    return images, labels


def _train_step(model, images, labels):
    model.zero_grad(set_to_none=True)
    loss, aux = model(images, labels)
    loss.backward()
    return aux


def measure_point(settings: BenchmarkSettings, method: str, steps: int) -> dict[str, Any]:
    """Measure one (method, steps) point in this process.

    Peak RSS is only meaningful when this is the first training step of the process, which
    ``--single`` guarantees. Returns a JSON-serialisable dict.
    """
    import torch

    from rfpn.recurrent import saved_tensor_bytes

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; allowed values: {', '.join(METHODS)}.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    torch.set_num_threads(settings.threads)
    model = build_step_model(settings, method, steps)
    images, labels = _random_batch(settings)

    baseline = current_rss_bytes()
    peak_reset = reset_peak_rss()
    start = time.perf_counter()
    with saved_tensor_bytes() as counter:
        aux = _train_step(model, images, labels)
    first_step = time.perf_counter() - start
    peak = peak_rss_bytes()
    point: dict[str, Any] = {
        "method": method,
        "steps": steps,
        "precision": settings.precision,
        "saved_bytes": counter.forward_bytes,
        "saved_tensors": counter.tensors,
        "saved_mib": counter.forward_bytes / MIB,
        # most held at once: differs from the total for methods that rebuild graphs in backward (reversible)
        "peak_saved_bytes": counter.peak_bytes,
        "peak_saved_mib": counter.peak_bytes / MIB,
        "baseline_rss_mib": baseline / MIB,
        "peak_rss_mib": peak / MIB,
        "peak_rss_delta_mib": max(peak - baseline, 0) / MIB,
        "peak_rss_reset": peak_reset,
        "residual": aux["residual"],
        "penalty": aux["penalty"].item(),
    }
    if model.dynamics.method.implicit:
        stats = aux["backward_stats"]
        point["neumann_terms"], point["neumann_stop"] = stats.terms, stats.stop_reason

    # The memory step above is the warm-up; long points get fewer repeats (budget per point).
    for _ in range(settings.warmup):
        _train_step(model, images, labels)
    repeats = max(1, min(settings.repeats, int(settings.time_budget // max(first_step, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _train_step(model, images, labels)
        times.append((time.perf_counter() - start) * 1000.0)
    point["time_ms"] = statistics.median(times)
    point["time_ms_all"] = times
    return point


def run_point_in_subprocess(settings: BenchmarkSettings, method: str, steps: int) -> dict[str, Any]:
    """Run :func:`measure_point` in a fresh interpreter and return its result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads))
    cmd = [sys.executable, "-m", __name__, "--single", "--method", method, "--point-steps", str(steps)]
    proc = subprocess.run(cmd + settings.to_args(), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"Benchmark point {method} at {steps} steps failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


def _find(points: list[dict], method: str, steps: int, precision: str = "fp32") -> dict | None:
    return next(
        (p for p in points if (p["method"], p["steps"], p.get("precision", "fp32")) == (method, steps, precision)), None
    )


def check_goals(points: list[dict]) -> dict[str, Any]:
    """C-RBP at 80 steps within 10% of 5 steps and below BPTT at 6 steps; JFB >= 1.4x faster than C-RBP at 20."""
    crbp5, crbp80, bptt6 = _find(points, "crbp", 5), _find(points, "crbp", 80), _find(points, "bptt", 6)
    goals: dict[str, Any] = {}
    for key, label in (("saved_bytes", "saved"), ("peak_rss_delta_mib", "peak_rss")):
        if crbp5 and crbp80:
            ratio = crbp80[key] / crbp5[key]
            goals[f"crbp80_over_crbp5_{label}"] = ratio
            goals[f"crbp80_within_10pct_of_crbp5_{label}"] = abs(ratio - 1.0) <= 0.10
        if crbp80 and bptt6:
            ratio = crbp80[key] / bptt6[key]
            goals[f"crbp80_over_bptt6_{label}"] = ratio
            goals[f"crbp80_below_bptt6_{label}"] = ratio < 1.0
    crbp20, jfb20 = _find(points, "crbp", 20), _find(points, "jfb", 20)
    if crbp20 and jfb20:
        goals["jfb20_speedup_over_crbp20"] = crbp20["time_ms"] / jfb20["time_ms"]
        goals["jfb20_at_least_1.4x_faster_than_crbp20"] = goals["jfb20_speedup_over_crbp20"] >= 1.4
    for p in points:
        full = _find(points, p["method"], p["steps"]) if p.get("precision", "fp32") != "fp32" else None
        if full:
            name = f"{p['method']}{p['steps']}_{p['precision']}"
            goals[f"{name}_speedup_over_fp32"] = full["time_ms"] / p["time_ms"]
            goals[f"{name}_saved_bytes_over_fp32"] = p["saved_bytes"] / full["saved_bytes"]
    return goals


def add_time_ratios(points: list[dict]) -> None:
    """``time_vs_bptt``: time over BPTT's at the same steps (timings on a shared CPU are noisy); for the
    reversible variants also ``time_vs_coupled_bptt``, over BPTT through the same coupled dynamics."""
    for p in points:
        ref = _find(points, "bptt", p["steps"], p.get("precision", "fp32"))
        p["time_vs_bptt"] = p["time_ms"] / ref["time_ms"] if ref else None
        if p["method"] in COUPLED_BPTT:
            coupled = _find(points, COUPLED_BPTT[p["method"]], p["steps"], p.get("precision", "fp32"))
            p["time_vs_coupled_bptt"] = p["time_ms"] / coupled["time_ms"] if coupled else None


def format_table(report: dict[str, Any]) -> str:
    """A markdown table: one row per (method, steps)."""
    rows = [
        "| method | steps | precision | saved for backward (MiB) | held at once (MiB) | peak RSS increase (MiB) | ms / step | time vs BPTT |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for p in report["points"]:
        ratio = f"{p['time_vs_bptt']:.2f}" if p.get("time_vs_bptt") is not None else "-"
        rows.append(
            f"| {p['method']} | {p['steps']} | {p.get('precision', 'fp32')} | {p['saved_mib']:.1f} "
            f"| {p.get('peak_saved_mib', p['saved_mib']):.1f} | {p['peak_rss_delta_mib']:.1f} | {p['time_ms']:.0f} | {ratio} |"
        )
    return "\n".join(rows)


def plot_report(report: dict[str, Any], path: Path) -> None:
    from matplotlib.ticker import LogFormatter, NullFormatter, StrMethodFormatter

    panels = (
        ("peak_saved_mib", "held for backward at once (MiB)"),
        ("peak_rss_delta_mib", "peak RSS increase, fresh process (MiB)"),
        ("time_ms", "wall time per training step (ms)"),
    )
    from rfpn.analysis.figures import agg_figure

    fig = agg_figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    for ax, (key, title) in zip(axes, panels):
        for method in METHODS:
            for precision in PRECISIONS:
                pts = sorted(
                    (p for p in report["points"] if (p["method"], p.get("precision", "fp32")) == (method, precision)),
                    key=lambda p: p["steps"],
                )
                label = method if precision == "fp32" else f"{method} ({precision})"
                if pts:
                    values = [p.get(key, p.get("saved_mib", 0.0)) for p in pts]  # older results lack peak_saved_mib
                    ax.plot([p["steps"] for p in pts], [max(v, 1e-3) for v in values], marker="o", label=label,
                            linestyle="-" if precision == "fp32" else "--")
        ax.set_xscale("log")
        ax.set_xticks(sorted({p["steps"] for p in report["points"]}))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))
        ax.set_xlabel("recurrent steps")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    s = report["settings"]
    fig.suptitle(
        f"hGRU ({s['norm']}), batch {s['batch']}, {s['channels']} channels, {s['size']}x{s['size']}, "
        f"{s['kernel']}x{s['kernel']} kernels, {s['threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run_benchmark(
    settings: BenchmarkSettings, grid: list[tuple], output_dir: Path, in_process: bool = False
) -> dict[str, Any]:
    """Measure every point of ``grid``, then write ``memory.json``, the PNG plot and ``table.md``.

    ``in_process`` skips the fresh subprocess per point (fast, for tests; peak RSS is then
    not meaningful).
    """
    from tqdm import tqdm

    settings.validate()
    info = machine_info()
    points = []
    started = time.time()
    with tqdm(grid, desc="benchmark", unit="point") as bar:
        for method, steps, *precision in bar:
            point_settings = replace(settings, precision=precision[0]) if precision else settings
            bar.set_postfix_str(f"{method} steps={steps} {point_settings.precision}")
            if in_process:
                points.append(measure_point(point_settings, method, steps))
            else:
                points.append(run_point_in_subprocess(point_settings, method, steps))
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
    add_time_ratios(points)
    report = {
        "description": "One training step (forward + backward) of the hGRU core per gradient method and step count.",
        "settings": asdict(settings),
        "fresh_process_per_point": not in_process,
        "machine": info,
        "torch_version": info["torch"],
        "total_seconds": time.time() - started,
        "points": points,
        "goals": check_goals(points),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "memory.json").write_text(json.dumps(report, indent=1) + "\n")
    (output_dir / "table.md").write_text(format_table(report) + "\n")
    plot_report(report, output_dir / "memory_vs_steps.png")
    return report


def make_grid(
    methods: list[str], steps: list[int], bptt_extra_steps: list[int], precisions: list[str] | None = None
) -> list[tuple]:
    """``(method, steps)`` points, or ``(method, steps, precision)`` with ``precisions`` (interleaved per point)."""
    grid: list[tuple] = []
    for method in methods:
        extra = bptt_extra_steps if method == "bptt" else []
        for n in sorted(set(steps) | set(extra)):
            grid += [(method, n, p) for p in precisions] if precisions else [(method, n)]
    if any(point[1] < 1 for point in grid):
        raise ValueError(f"Every step count must be >= 1; got {sorted({point[1] for point in grid})}.")
    return grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = BenchmarkSettings()
    parser = tool_parser(__doc__.split("\n\n")[0], output_dir="output/benchmark_memory", copy_to_docs=True)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10, 20, 40, 80])
    parser.add_argument(
        "--bptt-extra-steps", nargs="*", type=int, default=[6], help="extra steps for bptt only (the C-RBP goal)"
    )
    for f in fields(BenchmarkSettings):
        default = getattr(defaults, f.name)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(default), default=default, help=f.metadata["help"]
        )
    parser.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS,
        help="measure every point in each of these precisions (ratios from one run); overrides --precision",
    )
    parser.add_argument("--single", action="store_true", help="internal: measure one point, print its JSON")
    parser.add_argument("--method", choices=METHODS, help="with --single: the gradient method")
    parser.add_argument("--point-steps", type=int, help="with --single: the number of steps")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = BenchmarkSettings(**{f.name: getattr(args, f.name) for f in fields(BenchmarkSettings)})
    settings.validate()
    if args.single:
        if args.method is None or args.point_steps is None:
            raise SystemExit("--single needs --method and --point-steps.")
        print(json.dumps(measure_point(settings, args.method, args.point_steps)))
        return
    grid = make_grid(args.methods, args.steps, args.bptt_extra_steps, args.precisions)
    out = Path(args.output_dir)
    report = run_benchmark(settings, grid, out)
    print(format_table(report))
    print(json.dumps(report["goals"], indent=1))
    print(f"Wrote {out / 'memory.json'} and {out / 'memory_vs_steps.png'}")
    if args.copy_to_docs:
        for path in (out / "memory.json", out / "memory_vs_steps.png"):
            print(f"Copied to {copy_to_docs(path)}")


if __name__ == "__main__":  # the per-point subprocess (run_point_in_subprocess)
    from rfpn.utils import run_cli

    run_cli(main, sys.argv[1:])

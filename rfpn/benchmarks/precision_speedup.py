"""bf16 over fp32, across hGRU sizes: one table and one figure from several ``benchmark_memory`` runs.

``tools/benchmark_memory.py --precisions fp32 bf16`` measures both precisions of every point in one
run (one channel count and kernel per run); this module gathers such runs into the speed-up and
memory ratios per (channels, kernel, method, steps) and checks them against the mixed-precision
goals: a C-RBP-20 training step at least 2x faster in bf16 at 25 channels and 7x7 kernels, at least
3.5x at 15x15, and no more bytes saved for backward than fp32.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rfpn.utils.files import atomic_write, report_written, write_json_atomic

GOALS = {7: 2.0, 15: 3.5}  # kernel -> least bf16 speed-up of a 25-channel C-RBP-20 step


def precision_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, steps) measured in both fp32 and bf16 in ``report`` (a ``memory.json``)."""
    settings = report["settings"]
    by_key = {(p["method"], p["steps"], p.get("precision", "fp32")): p for p in report["points"]}
    rows = []
    for (method, steps, precision), half in sorted(by_key.items()):
        full = by_key.get((method, steps, "fp32"))
        if precision == "fp32" or full is None:
            continue
        rows.append({
            "channels": settings["channels"],
            "kernel": settings["kernel"],
            "norm": settings["norm"],
            "threads": settings["threads"],
            "method": method,
            "steps": steps,
            "precision": precision,
            "fp32_ms": full["time_ms"],
            "reduced_ms": half["time_ms"],
            "speedup": full["time_ms"] / half["time_ms"],
            "saved_bytes_ratio": half["saved_bytes"] / full["saved_bytes"],
            "machine": report.get("machine", {}).get("cpu", ""),
        })
    return rows


def check_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mixed-precision goals, for the C-RBP-20 rows at 25 channels that are present."""
    goals: dict[str, Any] = {}
    for row in rows:
        if (row["method"], row["steps"], row["channels"]) != ("crbp", 20, 25) or row["kernel"] not in GOALS:
            continue
        name = f"crbp20_c25_k{row['kernel']}"
        goals[f"{name}_speedup"] = row["speedup"]
        goals[f"{name}_at_least_{GOALS[row['kernel']]:g}x"] = row["speedup"] >= GOALS[row["kernel"]]
        goals[f"{name}_saved_bytes_not_above_fp32"] = row["saved_bytes_ratio"] <= 1.0
    return goals


def plot_speedups(rows: list[dict[str, Any]], path) -> None:
    """Grouped bars: bf16 speed-up per step count, one group per (channels, kernel)."""
    from rfpn.analysis.figures import agg_figure

    configs = sorted({(r["channels"], r["kernel"]) for r in rows}, key=lambda c: (c[1], c[0]))
    steps = sorted({r["steps"] for r in rows})
    width = 0.8 / max(len(steps), 1)
    fig = agg_figure(figsize=(8, 4.2))
    ax = fig.subplots()
    for i, n in enumerate(steps):
        values = [
            next((r["speedup"] for r in rows if (r["channels"], r["kernel"], r["steps"]) == (*c, n)), 0.0)
            for c in configs
        ]
        bars = ax.bar([k + (i - (len(steps) - 1) / 2) * width for k in range(len(configs))], values, width,
                      label=f"{n} steps")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    for k, (channels, kernel) in enumerate(configs):
        if channels == 25 and kernel in GOALS:
            ax.hlines(GOALS[kernel], k - 0.45, k + 0.45, colors="k", linestyles="--", linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(configs)), [f"{c} ch, {k}x{k}" for c, k in configs])
    ax.set_ylabel("fp32 time / bf16 time, one training step")
    methods = ", ".join(sorted({r["method"] for r in rows}))
    machines = ", ".join(sorted({r["machine"] for r in rows if r["machine"]})) or "this CPU"
    ax.set_title(f"bf16 autocast speed-up, {methods}, {machines} (dashed: goal at 20 steps)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")


def summarize(report_paths: list[Path], output: Path) -> dict[str, Any]:
    """Write ``output`` (JSON) and its PNG from the ``memory.json`` files of mixed-precision runs."""
    rows: list[dict[str, Any]] = []
    for path in report_paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: run tools/benchmark_memory.py --precisions fp32 bf16 --output-dir DIR first."
            )
        rows += precision_rows(json.loads(path.read_text()))
    if not rows:
        raise ValueError("None of the reports measured a point in both fp32 and bf16 (use --precisions fp32 bf16).")
    summary = {
        "description": "bf16 autocast over fp32, one hGRU training step (median of the timed steps), per run",
        "sources": [str(p) for p in report_paths],
        "rows": rows,
        "goals": check_goals(rows),
    }
    write_json_atomic(output, summary)
    figure = output.with_suffix(".png")
    atomic_write(figure, lambda tmp: plot_speedups(rows, tmp))
    report_written(output, figure)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="memory.json files of --precisions fp32 bf16 runs")
    parser.add_argument("--output", type=Path, default=Path("output/precision_speedup.json"))
    args = parser.parse_args(argv)
    summary = summarize(args.reports, args.output)
    for row in summary["rows"]:
        print(f"{row['channels']:>3} ch {row['kernel']:>2}x{row['kernel']:<2} {row['method']} {row['steps']:>3} steps: "
              f"{row['speedup']:.2f}x faster, saved bytes x{row['saved_bytes_ratio']:.2f}")
    print(json.dumps(summary["goals"], indent=1))
    return summary

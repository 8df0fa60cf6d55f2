"""Function evaluations and wall time to reach the fixed point: plain iteration vs Anderson vs heavy ball.

The model is a Pathfinder segmentor (squared Gabor/DoG input filters, then the hGRU). By
default it is randomly initialised at the CPU scale (16 channels, 7x7 kernels, 64x64
images); ``--config-file`` and ``--weights`` load a trained one instead::

    python tools/benchmark_solvers.py --copy-to-docs
    python tools/benchmark_solvers.py --config-file output/pf/config.yaml --weights output/pf/model_final.pth

The drive comes from a batch of generated Pathfinder images. Each solver solves
``h = F(x, h)`` from ``h = 0`` under ``torch.no_grad()`` with the stopping rule of
:func:`rfpn.recurrent.solve_fixed_point` (every sample's ``|F(h) - h| / |F(h)| < tol``).
For every tolerance it records the function evaluations (cell calls on the batch) and the
wall time; a run to the smallest tolerance also records the batch-max relative residual
after every evaluation for the plot. Results: ``solvers.json`` and
``residual_vs_evals.png`` in ``--output-dir``. The command line is ``tools/benchmark_solvers.py``.
"""
from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from rfpn.analysis.figures import plot_solver_residuals
from rfpn.utils.cli import tool_parser
from rfpn.utils.files import copy_to_docs, write_json_atomic

SOLVERS = ("iterate", "anderson", "heavyball")
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "Pathfinder" / "cpu" / "hgru16_random_init.yaml")

logger = logging.getLogger("rfpn.benchmark_solvers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__.split("\n\n")[0], threads=2, output_dir="output/benchmark_solvers", copy_to_docs=True,
                         opts=True)
    parser.add_argument("--config-file", default="", help="rfpn Pathfinder config (default: a random-init 16-channel hGRU)")
    parser.add_argument("--weights", default="", help="checkpoint to load (default: random initialisation)")
    parser.add_argument("--preset", default="cpu", choices=("cpu", "paper"), help="Pathfinder image generator preset")
    parser.add_argument("--batch", type=int, default=8, help="images in the batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and of the random initialisation")
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-5], help="relative-residual tolerances")
    parser.add_argument("--max-steps", type=int, default=500, help="cap on function evaluations per solve")
    parser.add_argument("--anderson-m", type=int, default=5, help="Anderson history length")
    parser.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS),
                        help="solvers to compare (heavyball picks its momentum by its rule: the first plain steps' contraction)")
    parser.add_argument("--repeats", type=int, default=3, help="timed solves per (solver, tol); the median is kept")
    parser.add_argument("--heavy-ball-grid", type=float, nargs="+", default=[], metavar="MU",
                        help="also count heavy ball's evaluations with fixed parameters, every MU with every "
                             "--heavy-ball-steps S: the best any rule for choosing them could do on this model")
    parser.add_argument("--heavy-ball-steps", type=float, nargs="+", default=[1.0], metavar="S",
                        help="heavy-ball steps s of --heavy-ball-grid")
    args = parser.parse_args(argv)
    if args.weights and not args.config_file:
        parser.error("--weights needs the --config-file the checkpoint was trained with.")
    if args.batch < 1 or args.max_steps < 1 or args.repeats < 1 or any(t <= 0 for t in args.tols):
        parser.error("--batch, --max-steps and --repeats must be >= 1 and every --tols value > 0.")
    if any(not 0 <= mu < 1 for mu in args.heavy_ball_grid) or any(step <= 0 for step in args.heavy_ball_steps):
        parser.error("--heavy-ball-grid values must be in [0, 1) and --heavy-ball-steps values > 0.")
    return args


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The Pathfinder segmentor of ``--config-file`` (default: :data:`DEFAULT_CONFIG`), weights loaded if given."""
    from rfpn.utils.cli import load_config
    from rfpn.utils.models import build_eval_model

    cfg = load_config(args.config_file or DEFAULT_CONFIG, args.opts + ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(args.seed)
    model = build_eval_model(cfg, args.weights)
    if getattr(getattr(model, "core", None), "cell", None) is None:
        raise ValueError("The model has no recurrent core (MODEL.PATHFINDER.CORE must be 'recurrent').")
    return model


def make_images(preset: str, batch: int, seed: int) -> torch.Tensor:
    """A ``(batch, 1, S, S)`` batch of generated Pathfinder stimuli in [0, 1]."""
    from rfpn.data.pathfinder_generator import PRESETS, render_sample

    settings = PRESETS[preset].resolved()
    images = [torch.from_numpy(render_sample(settings, seed * 100_003 + i).image) for i in range(batch)]
    return torch.stack(images).unsqueeze(1).float() / 255.0


def capture_drive(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The drive the model feeds its recurrent core for ``images``."""
    captured: list[torch.Tensor] = []
    handle = model.core.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            model.features(images)
    finally:
        handle.remove()
    return captured[0]


def solve(cell, drive: torch.Tensor, solver: str, tol: float, max_steps: int, m: int, trace: list | None = None,
          heavy_ball: tuple[float | None, float | None] = (None, None)):
    """One timed solve; ``trace`` (if given) collects (seconds, batch-max relative residual) per evaluation;
    ``heavy_ball`` is the ``heavyball`` solver's ``(mu, s)`` (``None``: its rule)."""
    from rfpn.recurrent import relative_residual, solve_fixed_point

    start = time.perf_counter()

    def step(h: torch.Tensor) -> torch.Tensor:
        out = cell(drive, h)
        if trace is not None:
            trace.append((time.perf_counter() - start, float(relative_residual(out, h).max())))
        return out

    with torch.no_grad():
        result = solve_fixed_point(step, cell.init_state(drive), solver, tol, max_steps, anderson_m=m,
                                   heavy_ball=heavy_ball)
    return result, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = build_model(args)
    drive = capture_drive(model, make_images(args.preset, args.batch, args.seed))
    cell = model.core.cell
    logger.info("drive %s, cell %s", tuple(drive.shape), type(cell).__name__)
    traces: dict[str, list[tuple[float, float]]] = {}
    for solver in args.solvers:
        traces[solver] = []
        solve(cell, drive, solver, min(args.tols), args.max_steps, args.anderson_m, traces[solver])
    rows = []
    for tol in sorted(args.tols, reverse=True):
        times: dict[str, list[float]] = {solver: [] for solver in args.solvers}
        results = {}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits every solver alike
            for solver in args.solvers:
                results[solver], seconds = solve(cell, drive, solver, tol, args.max_steps, args.anderson_m)
                times[solver].append(seconds)
        for solver, result in results.items():
            rows.append(
                {
                    "solver": solver,
                    "tol": tol,
                    "evals": result.evals,
                    "stop_reason": result.stop_reason,
                    "converged_fraction": float(result.converged.float().mean()),
                    "max_relative_residual": float(result.relative_residual.max()),
                    "steps_per_sample": result.steps_per_sample.tolist(),
                    "wall_s": statistics.median(times[solver]),
                }
            )
            logger.info(
                "%-8s tol %.0e: %d evaluations (%s), %.2f s", solver, tol, result.evals, result.stop_reason,
                rows[-1]["wall_s"],
            )
    speedups: dict[str, dict[str, dict]] = {}
    for tol in args.tols:
        by_solver = {r["solver"]: r for r in rows if r["tol"] == tol}
        plain = by_solver.get("iterate")
        for solver, row in by_solver.items():
            if plain is None or solver == "iterate":
                continue
            both = plain["stop_reason"] == row["stop_reason"] == "converged"
            speedups.setdefault(solver, {})[f"{tol:g}"] = {
                "evals_ratio": plain["evals"] / row["evals"] if both else None,
                "wall_ratio": plain["wall_s"] / row["wall_s"] if both else None,
            }
    return {
        "settings": {k: v for k, v in vars(args).items() if k not in ("copy_to_docs",)},
        "heavy_ball_grid": heavy_ball_grid(cell, drive, args),
        "drive_shape": list(drive.shape),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "results": rows,
        "speedup_iterate_over_anderson": speedups.get("anderson", {}),
        "speedup_over_iterate": speedups,
        "traces": {s: [{"wall_s": t, "max_relative_residual": r} for t, r in tr] for s, tr in traces.items()},
    }


def heavy_ball_grid(cell, drive: torch.Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluations of heavy ball with every fixed ``(mu, s)`` of ``--heavy-ball-grid`` x ``--heavy-ball-steps``, per tolerance."""
    rows = []
    for mu in args.heavy_ball_grid:
        for step in args.heavy_ball_steps:
            for tol in sorted(args.tols, reverse=True):
                result, _ = solve(cell, drive, "heavyball", tol, args.max_steps, args.anderson_m, heavy_ball=(mu, step))
                rows.append({"mu": mu, "step": step, "tol": tol, "evals": result.evals, "stop_reason": result.stop_reason})
                logger.info("heavy ball mu %.2f s %.2f tol %.0e: %d evaluations (%s)", mu, step, tol, result.evals,
                            result.stop_reason)
    return rows


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    write_json_atomic(out / "solvers.json", report)
    source = "trained" if report["settings"]["weights"] else "random init"
    plot_solver_residuals(str(out / "residual_vs_evals.png"), report["traces"], report["settings"]["tols"],
                          f"hGRU fixed point ({source}, drive {tuple(report['drive_shape'])})")
    logger.info("wrote %s and %s", out / "solvers.json", out / "residual_vs_evals.png")
    for solver, by_tol in report["speedup_over_iterate"].items():
        for tol, ratio in by_tol.items():
            logger.info("tol %s: plain iteration / %s = %s evaluations, %s wall time", tol, solver,
                        ratio["evals_ratio"], ratio["wall_ratio"])
    if args.copy_to_docs:
        copy_to_docs(out / "solvers.json")
        copy_to_docs(out / "residual_vs_evals.png", "solver_residuals.png")




"""Statistics over training seeds that the benchmarks share: per-method spread and paired differences."""
from __future__ import annotations

import statistics
from typing import Any, Mapping

__all__ = ["paired_difference", "spread"]


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max of one metric over seeds."""
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def paired_difference(values: Mapping[tuple[str, int], float], model: str, baseline: str) -> dict[str, Any] | None:
    """``values[(model, seed)] - values[(baseline, seed)]`` over the seeds both ran: mean and a 95% t-interval.

    A seed sets the initialisation and the data order of both runs, so the difference is paired by
    seed; None with fewer than two common seeds.
    """
    from scipy import stats

    seeds = sorted(seed for key, seed in values if key == model and (baseline, seed) in values)
    if len(seeds) < 2:
        return None
    diffs = [values[(model, s)] - values[(baseline, s)] for s in seeds]
    mean, sem = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * sem
    return {"model": model, "baseline": baseline, "seeds": seeds, "differences": diffs, "mean": mean,
            "ci95": [mean - half, mean + half]}

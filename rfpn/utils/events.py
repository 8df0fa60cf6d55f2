"""Read back what Detectron2's ``JSONWriter`` logged during a training run (``metrics.json``).

A run that was interrupted and resumed appends to the same file and logs some iterations twice;
:func:`metric_history` keeps the last value written for each iteration, so the history covers the
whole run whatever its interruptions (the trainer's in-memory storage covers only the last process).
"""
from __future__ import annotations

import json
import os

__all__ = ["metric_history", "metric_mean"]


def metric_history(output_dir: str, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(iteration, value), ...]}`` in iteration order, for every metric starting with ``prefix``."""
    path = os.path.join(output_dir, "metrics.json")
    by_iter: dict[str, dict[int, float]] = {}
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            it = record.get("iteration")
            if it is None:
                continue
            for key, value in record.items():
                if key != "iteration" and key.startswith(prefix) and isinstance(value, (int, float)):
                    by_iter.setdefault(key, {})[int(it)] = float(value)
    return {key: sorted(values.items()) for key, values in by_iter.items()}


def metric_mean(output_dir: str, key: str, from_iter: int = 0) -> float | None:
    """Mean of ``key`` over the logged iterations >= ``from_iter`` (None when it was never logged)."""
    values = [v for it, v in metric_history(output_dir, key).get(key, []) if it >= from_iter]
    return sum(values) / len(values) if values else None

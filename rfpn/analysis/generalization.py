"""Train-length x test-length generalisation matrix (the paper's Fig. 2a, c).

Each row is a model (its name and the contour length it was trained on), each column a test
set (its contour length); cells hold IoU. :class:`GeneralizationMatrix` collects the numbers
and writes them as JSON and as a Markdown table; :func:`rfpn.analysis.figures.plot_generalization`
draws them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GeneralizationMatrix"]


@dataclass
class GeneralizationMatrix:
    """IoU of models (rows) on test sets of several contour lengths (columns)."""

    test_lengths: list[int]
    models: list[str] = field(default_factory=list)
    train_lengths: list[int] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)

    def add(self, model: str, train_length: int, ious: dict[int, float]) -> None:
        """Add one model's row; ``ious`` maps test contour length -> IoU (missing lengths: NaN)."""
        unknown = sorted(set(ious) - set(self.test_lengths))
        if unknown:
            raise ValueError(f"Test lengths {unknown} are not columns of this matrix ({self.test_lengths}).")
        if model in self.models:
            raise ValueError(f"Model {model!r} already has a row; give each model a unique name.")
        self.models.append(model)
        self.train_lengths.append(int(train_length))
        self.rows.append([float(ious.get(n, math.nan)) for n in self.test_lengths])

    def as_array(self) -> np.ndarray:
        return np.asarray(self.rows, dtype=np.float64).reshape(len(self.models), len(self.test_lengths))

    def to_dict(self) -> dict:
        return {
            "test_lengths": self.test_lengths,
            "models": [
                {"name": m, "train_length": n, "iou": dict(zip(map(str, self.test_lengths), row))}
                for m, n, row in zip(self.models, self.train_lengths, self.rows)
            ],
        }

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "GeneralizationMatrix":
        matrix = cls(test_lengths=[int(n) for n in data["test_lengths"]])
        for row in data["models"]:
            matrix.add(row["name"], row["train_length"], {int(k): v for k, v in row["iou"].items()})
        return matrix

    def to_markdown(self, digits: int = 3) -> str:
        """A Markdown table: one row per model, one IoU column per test length."""
        head = "| model | trained on | " + " | ".join(f"test PF-{n}" for n in self.test_lengths) + " |"
        sep = "|---|---|" + "---|" * len(self.test_lengths)
        lines = [head, sep]
        for m, n, row in zip(self.models, self.train_lengths, self.rows):
            cells = " | ".join("n/a" if math.isnan(v) else f"{v:.{digits}f}" for v in row)
            lines.append(f"| {m} | PF-{n} | {cells} |")
        return "\n".join(lines)

"""Where MomentumRNN made its claim: sequence tasks, the momentum LSTM and the reviewers' controls.

Pure PyTorch (plus scikit-learn for its bundled data); nothing is downloaded.

Tasks (:data:`TASKS`):

- ``digits`` / ``permuted_digits``: scikit-learn's 1,797 real 8x8 digit images read pixel by pixel
  (64 steps, one input), in order or under a fixed permutation: the seed's pixel-MNIST and
  permuted MNIST, scaled down. 80% train, 20% test (a fixed split). Metric: test accuracy.
- ``adding``: the adding problem (Hochreiter and Schmidhuber 1997): ``length`` steps of (value in
  [0, 1], marker); the target is the sum of the two marked values. Predicting 1 scores an MSE of
  about 0.167. Metric: MSE on a fixed held-out batch.

Variants (:data:`VARIANTS`), all the same cell and parameter count:

- ``lstm``: the momentum LSTM with ``mu = 0, s = 1``, i.e. an LSTM;
- ``momentum``: ``mu = 0.6, s = 0.6`` (the authors' sequential-MNIST recipe);
- ``rescaled`` (control): ``mu = 0, s = 0.6``, the same input scaling without momentum;
- ``damped`` (control): an LSTM whose state moves only part of the way each step,
  ``(h, c) <- (h, c) + 0.6 ((h, c)' - (h, c))``, a damped update with no memory.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from rfpn.recurrent.momentum import MomentumLSTMCell

__all__ = ["TASKS", "VARIANTS", "RunResult", "SequenceModel", "make_task", "train_run"]

VARIANTS: dict[str, dict[str, float]] = {
    "lstm": {"mu": 0.0, "s": 1.0, "damping": 1.0},
    "momentum": {"mu": 0.6, "s": 0.6, "damping": 1.0},
    "rescaled": {"mu": 0.0, "s": 0.6, "damping": 1.0},
    "damped": {"mu": 0.0, "s": 1.0, "damping": 0.6},
}
TASKS = ("digits", "permuted_digits", "adding")
logger = logging.getLogger(__name__)


@dataclass
class Task:
    """Data and metric of one task: ``batch(rng, n)`` gives training sequences ``(n, T, d)`` and targets."""

    name: str
    input_size: int
    outputs: int
    batch: Callable[[np.random.Generator, int], tuple[torch.Tensor, torch.Tensor]]
    test: tuple[torch.Tensor, torch.Tensor]
    classification: bool
    threshold: float  # accuracy to reach (classification) or MSE to get below (regression)


def _digits(permuted: bool) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images.reshape(-1, 64, 1) / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    split = np.random.default_rng(12345).permutation(len(y))  # fixed for every seed: same test set
    if permuted:
        x = x[:, np.random.default_rng(54321).permutation(64)]
    train, test = split[: int(0.8 * len(y))], split[int(0.8 * len(y)):]

    def batch(rng: np.random.Generator, n: int):
        idx = rng.choice(train, n, replace=False)
        return x[idx], y[idx]

    name = "permuted_digits" if permuted else "digits"
    return Task(name, 1, 10, batch, (x[test], y[test]), True, 0.8)


def _adding(length: int) -> Task:
    def sample(rng: np.random.Generator, n: int):
        values = rng.random((n, length))
        markers = np.zeros((n, length))
        for row in range(n):
            first, second = rng.choice(length // 2), length // 2 + rng.choice(length - length // 2)
            markers[row, [first, second]] = 1.0
        x = torch.tensor(np.stack([values, markers], -1), dtype=torch.float32)
        return x, torch.tensor((values * markers).sum(1, keepdims=True), dtype=torch.float32)

    return Task("adding", 2, 1, sample, sample(np.random.default_rng(999), 500), False, 0.05)


def make_task(name: str, length: int = 200) -> Task:
    """The task ``name`` (``length``: steps of the adding problem)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not valid; allowed values: {', '.join(TASKS)}.")
    return _adding(length) if name == "adding" else _digits(name == "permuted_digits")


class SequenceModel(nn.Module):
    """A momentum-LSTM variant read out from its last hidden state."""

    def __init__(self, input_size: int, hidden: int, outputs: int, variant: str):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not valid; allowed values: {', '.join(VARIANTS)}.")
        v = VARIANTS[variant]
        self.cell = MomentumLSTMCell(input_size, hidden, mu=v["mu"], s=v["s"])
        self.damping = v["damping"]
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.cell.init_state(x[:, 0])
        for t in range(x.shape[1]):
            h, c, v = self.cell(x[:, t], state)
            if self.damping != 1.0:
                h, c = torch.lerp(state[0], h, self.damping), torch.lerp(state[1], c, self.damping)
            state = (h, c, v)
        return self.head(state[0])


@dataclass
class RunResult:
    task: str
    variant: str
    seed: int
    final_metric: float
    iterations_to_threshold: int | None  # first evaluation that reached the threshold (None: never)
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def _metric(model: SequenceModel, task: Task) -> float:
    with torch.no_grad():
        out = model(task.test[0])
    if task.classification:
        return float((out.argmax(1) == task.test[1]).float().mean())
    return float(nn.functional.mse_loss(out, task.test[1]))


def train_run(task: Task, variant: str, seed: int, iters: int, hidden: int = 64, batch: int = 64, lr: float = 1e-3,
              eval_every: int = 25, log_every: int = 250) -> RunResult:
    """Train one variant with Adam from ``seed`` and evaluate every ``eval_every`` iterations.

    Every ``log_every`` iterations the ``rfpn.sequences`` logger reports the metric and the ETA.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SequenceModel(task.input_size, hidden, task.outputs, variant)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.functional.cross_entropy if task.classification else nn.functional.mse_loss
    reached, curve, start = None, [], time.perf_counter()
    for it in range(1, iters + 1):
        x, y = task.batch(rng, batch)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it % eval_every == 0 or it == iters:
            metric = _metric(model, task)
            curve.append((it, metric))
            good = metric >= task.threshold if task.classification else metric <= task.threshold
            if good and reached is None:
                reached = it
        if it % log_every == 0 and curve:
            elapsed = time.perf_counter() - start
            logger.info(f"{task.name} {variant} seed {seed}: iter {it}/{iters}, metric {curve[-1][1]:.4f}, "
                        f"ETA {elapsed / it * (iters - it) / 60:.1f} min")
    return RunResult(task.name, variant, seed, curve[-1][1], reached, curve, time.perf_counter() - start)

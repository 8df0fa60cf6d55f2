"""Run benchmark work in child processes, a few at a time, and keep their results safely.

On a small CPU machine the efficient way to run several trainings is one process per training
with one thread each (two one-thread processes on two cores barely slow each other down, while
oversubscribed threads slow down several-fold). The benchmarks hand their runs to
:func:`run_child_jobs` and collect each run's result from a JSON file the child wrote with
:func:`write_json_atomic`, so an interrupted benchmark keeps every finished run.
"""
from __future__ import annotations

import logging
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from .files import write_json_atomic

__all__ = ["ChildJob", "run_child_jobs", "write_json_atomic"]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildJob:
    """One child process: a name for the log, its command line, where its output goes, its threads."""

    name: str
    argv: Sequence[str]
    log_path: str
    threads: int = 1


def _run(job: ChildJob) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(job.log_path)), exist_ok=True)
    logger.info(f"{job.name}: running in a child process, log in {job.log_path}")
    env = dict(os.environ, OMP_NUM_THREADS=str(job.threads), MKL_NUM_THREADS=str(job.threads))
    with open(job.log_path, "w") as log:
        done = subprocess.run(list(job.argv), stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{job.name} failed (exit {done.returncode}); see {job.log_path}")
    logger.info(f"{job.name}: done")


def run_child_jobs(jobs: Sequence[ChildJob], parallel: int) -> None:
    """Run ``jobs`` with at most ``parallel`` at once; raise after all ended if any failed.

    Every job runs to its end even when another fails, so a failure costs only its own run.
    """
    if parallel < 1:
        raise ValueError(f"parallel={parallel} is not valid; allowed values: an integer >= 1.")
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(_run, job) for job in jobs]
    errors = [str(f.exception()) for f in futures if f.exception() is not None]
    if errors:
        raise RuntimeError("; ".join(errors))

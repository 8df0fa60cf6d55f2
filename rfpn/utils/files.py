"""Writing result files safely, and publishing them to the places the docs read.

Every file rfpn generates goes through :func:`atomic_write`: a temporary in the same folder,
renamed into place, so a reader (or a rerun after a kill) never sees a half-written file.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

__all__ = ["RESULTS_DIR", "FIGURES_DIR", "atomic_write", "copy_to_docs", "report_written", "write_json_atomic"]

_REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = _REPO / "benchmarks" / "results"  # JSON results the docs quote
FIGURES_DIR = _REPO / "docs" / "figures"  # figures the README and docs show


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", durable: bool = False) -> None:
    """Write ``path`` through ``<path>.tmp-<pid>``, then rename it into place.

    Temporaries a killed writer left for the same path are removed first. ``durable`` also
    flushes the file to disk before the rename (checkpoints: a power cut keeps the old or the new).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
        try:
            os.remove(stale)
        except OSError:
            pass
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, payload: Any, sort_keys: bool = False) -> None:
    """Dump ``payload`` as indented JSON to ``path`` atomically (``sort_keys``: equal objects, equal bytes)."""
    atomic_write(path, lambda f: json.dump(payload, f, indent=1, sort_keys=sort_keys), mode="w")


def copy_to_docs(path: str | os.PathLike, name: str | None = None) -> Path:
    """Copy a result to ``benchmarks/results`` (``.json``) or a figure to ``docs/figures`` (anything else)."""
    path = Path(path)
    folder = RESULTS_DIR if path.suffix == ".json" else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or path.name)
    shutil.copyfile(path, target)
    return target


def report_written(*paths: str | os.PathLike, to_docs: bool = False) -> None:
    """Print where a tool wrote its results; with ``to_docs``, also copy them (:func:`copy_to_docs`)."""
    if to_docs:
        for path in paths:
            copy_to_docs(path)
    print("Wrote " + " and ".join(str(p) for p in paths) + (" (copied to the docs)" if to_docs else ""))

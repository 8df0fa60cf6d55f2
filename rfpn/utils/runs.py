"""Finished benchmark runs, kept on disk so an interrupted benchmark trains only what is missing.

A run owns ``<root>/<slug>/``: its training output, its log and ``row.json``, the result it
finished with. The slug is the run's name in lower case with spaces as underscores, plus
``_seed<N>`` for seeded runs. ``row.json`` is written atomically and last, so its presence
means the run finished. A kept row is reused only if it matches the caller's settings
(``match``): a rerun with other iterations or another sequence length trains again instead
of mixing results.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterable, Mapping

from rfpn.utils.files import write_json_atomic

__all__ = ["ROW_FILE", "adopt_rows", "load_run", "run_dir", "save_run"]

ROW_FILE = "row.json"

logger = logging.getLogger(__name__)


def run_dir(root: str | os.PathLike, name: str, seed: int | None = None) -> str:
    """The folder of run ``name`` (and ``seed``) under ``root``."""
    slug = name.replace(" ", "_").lower()
    return os.path.join(os.fspath(root), slug if seed is None else f"{slug}_seed{seed}")


def load_run(root: str | os.PathLike, name: str, seed: int | None = None,
             match: Mapping[str, Any] | None = None) -> dict | None:
    """The row run ``name`` finished with; ``None`` if it has not finished or differs from ``match``."""
    path = os.path.join(run_dir(root, name, seed), ROW_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        row = json.load(f)
    differing = {k: row.get(k) for k, v in (match or {}).items() if row.get(k) != v}
    if differing:
        logger.info(f"{path} was made with {differing}, not {({k: match[k] for k in differing})}: not reused")
        return None
    return row


def save_run(root: str | os.PathLike, row: Mapping[str, Any], name: str, seed: int | None = None) -> str:
    """Keep ``row`` as the result of run ``name`` (and ``seed``); return the file written."""
    path = os.path.join(run_dir(root, name, seed), ROW_FILE)
    write_json_atomic(path, row)
    return path


def adopt_rows(root: str | os.PathLike, rows: Iterable[Mapping[str, Any]], name_key: str,
               match: Mapping[str, Any] | None = None, source: str = "an earlier summary") -> int:
    """Keep the rows of an earlier summary as finished runs under ``root``; return how many were new.

    Only rows that agree with ``match`` are taken, and a run that already finished keeps its own
    row. Each row is named by its ``name_key`` field and its ``seed`` (if any). ``source`` names
    the summary in the log line.
    """
    adopted = 0
    for row in rows:
        if any(row.get(k) != v for k, v in (match or {}).items()):
            continue
        name, seed = row[name_key], row.get("seed")
        if load_run(root, name, seed) is None:
            save_run(root, row, name, seed)
            adopted += 1
    logger.info(f"{adopted} finished runs taken from {source}")
    return adopted

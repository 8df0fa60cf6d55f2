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
from typing import Any, Mapping

from rfpn.utils.files import write_json_atomic

__all__ = ["ROW_FILE", "load_run", "run_dir", "save_run"]

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

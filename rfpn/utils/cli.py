"""Clear command-line errors for rfpn's tools.

A misspelt config key or a missing file should end a command with one line that names the
problem and the fix, not with a traceback from deep inside yacs or PIL. Tools load their config
with :func:`load_config` (which raises :class:`UsageError`) and run their entry point through
:func:`run_cli`:

- :class:`UsageError` (command-line misuse: a missing config file, an unknown key or dataset,
  a bad value): ``<tool>: error: <message>`` on stderr, exit code 2 (as ``argparse`` does);
- ``OSError`` / ``ValueError`` (the data layer's clear errors, e.g. a truncated image named with
  the command that regenerates it): the same one-line form, exit code 1.

Errors of a worker process (``--num-gpus N``) are judged by the worker's own exception. Tools that
merge configs or look up datasets themselves also get one line (exit code 2) for the missing-file and
unknown-key errors of Detectron2's config and the unregistered-dataset error of its catalog.

Set ``RFPN_TRACEBACK=1`` to print the full traceback as well.

The flags the tools share (``--model``, ``--threads``, ``--output-dir``, ``--copy-to-docs``, trailing
config overrides) come from :func:`tool_parser` / :func:`add_common_arguments`, so that every tool
spells, types and explains them the same way.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml
from detectron2.config import CfgNode, get_cfg

__all__ = [
    "UsageError", "add_common_arguments", "check_bases", "load_config", "check_registered_datasets", "run_cli",
    "short_message", "tool_parser",
]


class UsageError(Exception):
    """Command-line misuse, with a message that names the problem and the fix."""


def _all_keys(cfg: CfgNode, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys += _all_keys(v, full + ".") if isinstance(v, CfgNode) else [full]
    return keys


def _unknown_key_error(cfg: CfgNode, key: str, source: str) -> UsageError:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return UsageError(
        f"Unknown config key {key} ({source}).{hint} Fix the spelling or remove it; rfpn's keys are listed in "
        "rfpn/config.py, Detectron2's in detectron2/config/defaults.py."
    )


def check_bases(config_file: str) -> None:
    """Raise :class:`UsageError` naming the file whose ``_BASE_`` (or a base's base) does not exist."""
    seen = set()
    path = config_file
    while path and path not in seen:
        seen.add(path)
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return  # merging reports unreadable files with their own message
        base = data.get("_BASE_") if isinstance(data, dict) else None
        if not isinstance(base, str) or "://" in base:
            return
        base = os.path.expanduser(base)
        resolved = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(resolved):
            raise UsageError(
                f"Config file {path} has _BASE_: {base!r}, which does not exist (looked for {resolved}); the path is "
                "relative to the folder of the file that names it."
            )
        path = resolved


def load_config(
    config_file: str,
    opts: Sequence[str] = (),
    add_config: Callable[[CfgNode], None] | None = None,
    validators: Iterable[Callable[[CfgNode], None]] = (),
) -> CfgNode:
    """``get_cfg()`` + ``add_config`` + the YAML file + ``KEY VALUE`` overrides, checked, not frozen.

    Raises :class:`UsageError` naming the file or key for a missing or unparsable file, an unknown
    key, an odd number of overrides, a value of the wrong type, or a value a ``validators``
    function rejects (``ValueError``).
    """
    if add_config is None:
        from rfpn.config import add_rfpn_config as add_config
    cfg = get_cfg()
    add_config(cfg)
    defaults = cfg.clone()
    if not config_file:
        raise UsageError("No config given: pass --config-file, e.g. --config-file configs/Pathfinder/cpu/Base-Pathfinder-CPU.yaml.")
    if not os.path.isfile(config_file):
        raise UsageError(
            f"Config file {config_file!r} does not exist. Pass the path of a YAML config; rfpn's are under configs/ "
            "(Pathfinder/, COCO-PanopticSegmentation/, Synthetic-Panoptic/)."
        )
    check_bases(config_file)
    if len(opts) % 2:
        raise UsageError(
            f"Config overrides must come in KEY VALUE pairs; got {len(opts)} words: {' '.join(map(str, opts))}."
        )
    for source, merge, arg in (
        (f"in {config_file}", cfg.merge_from_file, config_file),
        ("on the command line", cfg.merge_from_list, list(opts)),
    ):
        try:
            merge(arg)
        except yaml.YAMLError as e:
            raise UsageError(f"Config file {config_file} is not valid YAML ({e}). Fix its syntax.") from None
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            message = str(e.args[0]) if e.args else str(e)
            # yacs says "Non-existent config key: K" (files) or "Non-existent key: K" (overrides).
            match = re.match(r"Non-existent (?:config )?key: (\S+)", message)
            if match:
                raise _unknown_key_error(cfg, match.group(1), source) from None
            raise UsageError(f"Bad config value {source}: {message}") from None
    _check_no_none(cfg, defaults)
    for validate in validators:
        try:
            validate(cfg)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return cfg


def _check_no_none(cfg: CfgNode, defaults: CfgNode, prefix: str = "") -> None:
    """yacs lets ``None`` replace any value; refuse it for keys whose default is not ``None``."""
    for key, default in defaults.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if isinstance(default, CfgNode) and isinstance(value, CfgNode):
            _check_no_none(value, default, f"{prefix}{key}.")
        elif value is None and default is not None:
            raise UsageError(
                f"{prefix}{key}=None is not valid; allowed values: a value of type {type(default).__name__}, as its "
                f"default {default!r}."
            )


def check_registered_datasets(cfg: CfgNode, keys: Sequence[str] = ("TRAIN", "TEST")) -> None:
    """Raise :class:`UsageError` for any name in ``DATASETS.<key>`` that no one registered."""
    from detectron2.data import DatasetCatalog

    known = set(DatasetCatalog.list())
    for key in keys:
        for name in cfg.DATASETS.get(key):
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
                hint = f" Did you mean {' or '.join(close)}?" if close else ""
                raise UsageError(
                    f"DATASETS.{key} names {name!r}, which is not a registered dataset.{hint} Pathfinder sets are "
                    "made by datasets/prepare_pathfinder.py and synthetic panoptic sets by "
                    "datasets/prepare_synthetic_panoptic.py (see datasets/README.md); set $DETECTRON2_DATASETS to "
                    "the root they were written to."
                )


_COMMON_HELP = {
    "model": "a model: its name, config file and checkpoint (repeat for several)",
    "threads": "torch intra-op threads",
    "output_dir": "folder the results are written to",
    "copy_to_docs": "also copy the JSON to benchmarks/results and the PNG to docs/figures",
}


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    models: bool = False,
    threads: int | None = None,
    output_dir: str | None = None,
    copy_to_docs: bool = False,
    opts: bool = False,
    helps: Mapping[str, str] | None = None,
) -> argparse.ArgumentParser:
    """Add the flags rfpn's tools share to ``parser`` (or a sub-parser), only those asked for; return ``parser``.

    ``models``: the required, repeatable ``--model NAME CONFIG WEIGHTS``. ``threads``, ``output_dir``:
    ``--threads`` (int) and ``--output-dir`` (a ``str`` in every tool) with that default; ``None`` adds no flag.
    ``copy_to_docs``: ``--copy-to-docs``. ``opts``: the trailing ``KEY VALUE`` config overrides (applied to every
    model, with ``models``). ``helps`` replaces a flag's help, keyed by its dest, where a tool has more to say.
    """
    helps = {**_COMMON_HELP, **(helps or {})}
    if models:
        parser.add_argument("--model", nargs=3, action="append", required=True, metavar=("NAME", "CONFIG", "WEIGHTS"),
                            help=helps["model"])
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help=helps["threads"])
    if output_dir is not None:
        parser.add_argument("--output-dir", default=output_dir, help=helps["output_dir"])
    if copy_to_docs:
        parser.add_argument("--copy-to-docs", action="store_true", help=helps["copy_to_docs"])
    if opts:
        default_help = "KEY VALUE config overrides" + (" applied to every model" if models else "")
        parser.add_argument("opts", nargs=argparse.REMAINDER, help=helps.get("opts", default_help))
    return parser


def tool_parser(description: str | None, **common: Any) -> argparse.ArgumentParser:
    """A tool's parser: ``description`` (a module docstring, shown as written) and the flags ``common`` asks
    :func:`add_common_arguments` for (``threads=2, output_dir="output/x", opts=True``, ...)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_common_arguments(parser, **common)


# Exception names whose messages are written for users (as raised by rfpn's checks and loaders).
_CLEAR_ERRORS = {"UsageError", "OSError", "FileNotFoundError", "ValueError", "PanopticFormatError"}


def short_message(error: BaseException) -> str:
    """The error's own message; for an error re-raised from a worker, the original's last line."""
    text = str(error).strip() or type(error).__name__
    if "Traceback (most recent call last)" in text:  # a DataLoader or launch worker's error
        text = text.splitlines()[-1]
        head, sep, tail = text.partition(": ")
        if sep and head.replace(".", "").isidentifier():  # "OSError: Cannot read ..." -> "Cannot read ..."
            text = tail
    return text


def run_cli(main: Callable[..., Any], *args: Any, prog: str | None = None) -> Any:
    """Call ``main(*args)``; turn :class:`UsageError` (exit 2) and ``OSError``/``ValueError`` (exit 1) into one line."""
    prog = prog or os.path.basename(sys.argv[0]) or "rfpn"
    from torch.multiprocessing import ProcessRaisedException

    try:
        return main(*args)
    except UsageError as e:
        code, error = 2, e
    except (OSError, ValueError) as e:
        code, error = 1, e
    except (KeyError, AssertionError) as e:  # yacs's and Detectron2's catalog's words for a misspelt name
        message = str(e.args[0]) if e.args else ""
        if re.match(r"Non-existent (config )?key: ", message):
            code, error = 2, UsageError(
                f"Unknown config key {message.split(':', 1)[1].strip()}. Fix the spelling or remove it; rfpn's keys "
                "are listed in rfpn/config.py, Detectron2's in detectron2/config/defaults.py."
            )
        elif re.match(r"Config file '.*' does not exist", message):
            code, error = 2, UsageError(f"{message.rstrip('!')}. Pass the path of a YAML config; rfpn's are under configs/.")
        elif re.match(r"Dataset '.*' is not registered", message):
            code, error = 2, UsageError(
                f"{message.split('!')[0]}. Pathfinder sets are made by datasets/prepare_pathfinder.py, synthetic panoptic "
                "sets by datasets/prepare_synthetic_panoptic.py; set $DETECTRON2_DATASETS to their root."
            )
        else:
            raise
    except ProcessRaisedException as e:  # a worker of a multi-process run failed: judge its own error
        last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        name = last.partition(":")[0].rsplit(".", 1)[-1]
        if name not in _CLEAR_ERRORS:
            raise
        code, error = (2 if name == "UsageError" else 1), e
    if os.environ.get("RFPN_TRACEBACK"):
        traceback.print_exception(error)
    print(f"{prog}: error: {short_message(error)}", file=sys.stderr)
    sys.exit(code)

"""Fuzz tools/train_net.py: a bad value for any rfpn key or for the Detectron2 keys a run depends on.

Every case ends with exit code 1 or 2 and a message of at most three lines, or, when the value
happens to be valid, with a finished one-iteration run; never with a traceback.
"""
from __future__ import annotations

import logging
import random

import pytest
from detectron2.config import get_cfg

from rfpn.config import add_rfpn_config

from test_bad_input import _tool
from test_train_net import CPU_BASE, tiny_pathfinder  # noqa: F401 (fixture)

DETECTRON2_KEYS = [
    "SOLVER.IMS_PER_BATCH", "SOLVER.MAX_ITER", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.STEPS", "SOLVER.BASE_LR",
    "SOLVER.WARMUP_ITERS", "TEST.EVAL_PERIOD", "MODEL.DEVICE", "DATALOADER.NUM_WORKERS",
]
# Values that are wrong for most keys: wrong types, signs, ranges, spellings; none is so large that a
# valid reading would run for long (a run is capped at a few iterations of a 4-channel model).
BAD_VALUES = [
    "-1", "0", "-0.5", "1.5", "2", "nan", "inf", "'x'", "'fixedd'", "''", "()", "(0,)", "(3, 1)", "True", "[]",
    "None", "'cuda:9'", "7", "0.0", "'GN'",
]
CASES_PER_KEY = 4


def _rfpn_keys() -> list[str]:
    base, cfg = get_cfg(), get_cfg()
    add_rfpn_config(cfg)

    def flat(node, prefix=""):
        out = []
        for k, v in node.items():
            out += flat(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k]
        return out

    return sorted(set(flat(cfg)) - set(flat(base)))


def _cases() -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [(key, value) for key in _rfpn_keys() + DETECTRON2_KEYS for value in rng.sample(BAD_VALUES, CASES_PER_KEY)]


CASES = _cases()
BASE_OPTS = [
    "DATASETS.TRAIN", "('pf_tiny_tn_train',)", "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.KERNEL_SIZE", "3", "MODEL.RECURRENT.STEPS", "2",
    "MODEL.PATHFINDER.INPUT_KERNEL_SIZE", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "1",
    "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0",
]


@pytest.fixture(autouse=True)
def _no_stale_log_streams():
    """In-process runs add console handlers on pytest's per-test streams; drop them between cases."""
    yield
    for logger in [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]:
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)


def test_there_are_at_least_200_cases():
    assert len(CASES) >= 200


@pytest.mark.parametrize("key,value", CASES)
def test_a_bad_value_ends_cleanly(tiny_pathfinder, tmp_path, capsys, monkeypatch, key, value):  # noqa: F811
    train_net = _tool("tools/train_net.py")
    monkeypatch.delenv("RFPN_TRACEBACK", raising=False)
    argv = ["train_net.py", "--config-file", CPU_BASE, *BASE_OPTS, "OUTPUT_DIR", str(tmp_path), key, value]
    monkeypatch.setattr("sys.argv", argv)
    try:
        train_net.invoke_main()
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 0:
        assert (tmp_path / "model_final.pth").is_file(), f"{key}={value} was accepted but the run did not finish"
        return
    assert code in (1, 2), (key, value, code)
    message = err[err.index("train_net.py: error: "):].strip().splitlines()
    assert 1 <= len(message) <= 3, message

"""Bad input: fuzzed dataset files for both tasks, and the command-line config checks.

The fuzz cases copy a tiny generated dataset, damage one file (random bytes, a truncated
prefix, a wrong image mode or size, or a JSON document with one value replaced by junk), and
load every record through the task's loader and mapper. Each case must either load or raise the
project's clear error: an ``OSError`` / ``ValueError`` whose message names a file of that
dataset. Any other exception, or a hang (a 20 s alarm per case), fails the test.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import signal

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from rfpn import model_zoo
from rfpn.data import CheckedDatasetMapper, PathfinderDatasetMapper, register_synthetic_panoptic
from rfpn.data.pathfinder import load_pathfinder_dicts
from rfpn.data.pathfinder_generator import PRESETS, generate_pathfinder
from rfpn.data.synthetic_panoptic import generate_synthetic_panoptic
from rfpn.utils import UsageError, check_registered_datasets, load_config, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PF_CONFIG = os.path.join(REPO, "configs", "Pathfinder", "cpu", "Base-Pathfinder-CPU.yaml")


# ---------------------------------------------------------------------------------------------
# Damage makers: each takes the file's bytes and an RNG and returns the damaged bytes.
# ---------------------------------------------------------------------------------------------


def _random_bytes(data: bytes, rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))


def _truncated(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randint(0, max(0, len(data) - 1))]


def _empty(data: bytes, rng: random.Random) -> bytes:
    return b""


def _flipped_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(8):
        out[rng.randrange(len(out))] = rng.getrandbits(8)
    return bytes(out)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _rgb_png(data: bytes, rng: random.Random) -> bytes:
    return _png(np.full((8, 8, 3), 255, np.uint8))


def _gray_png(data: bytes, rng: random.Random) -> bytes:
    return _png(np.full((9, 7), 7, np.uint8))


_JUNK = [None, -1, 0, 3.5, 10**12, "", "x", "../../nope.png", [], {}, [1, "a"], {"a": 1}, True]


def _paths(value, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths(v, prefix + (i,))


def _json_mutation(data: bytes, rng: random.Random) -> bytes:
    """The document with one value (anywhere, the root included) replaced by junk or deleted."""
    doc = json.loads(data)
    path = rng.choice(list(_paths(doc)))
    junk = rng.choice(_JUNK)
    if not path:
        return json.dumps(junk).encode()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = junk
    return json.dumps(doc).encode()


BYTE_DAMAGE = [_random_bytes, _truncated, _empty, _flipped_bytes]
PNG_DAMAGE = BYTE_DAMAGE + [_rgb_png, _gray_png]
JSON_DAMAGE = [_random_bytes, _truncated, _empty] + [_json_mutation] * 8


@contextlib.contextmanager
def _time_limit(seconds: int):
    def fail(signum, frame):
        raise TimeoutError(f"loading did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _assert_loads_or_clear_error(load, dataset_dir: str, case: str) -> None:
    """``load()`` succeeds, or raises OSError/ValueError naming a file of ``dataset_dir``."""
    try:
        with _time_limit(20):
            load()
    except (OSError, ValueError) as e:
        if isinstance(e, TimeoutError):
            raise AssertionError(f"{case}: hung") from e
        message = str(e)
        assert os.path.basename(dataset_dir) in message, f"{case}: the error does not name the file: {message!r}"
        assert len(message) < 2000, f"{case}: the error is not short: {message[:300]}..."


def _damage(path: str, how, seed: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(how(data, random.Random(seed)))


# ---------------------------------------------------------------------------------------------
# Pathfinder: rfpn/data/pathfinder.py (index) + PathfinderDatasetMapper (PNGs)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pathfinder_source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pf_fuzz"))
    settings = dataclasses.replace(PRESETS["cpu"], contour_length=3, image_size=24, paddle_length=4.0, paddle_margin=2.0,
                                   marker_radius=2.0, distractor_paddles=3)
    generate_pathfinder("pf_src", settings, 2, 1, seed=0, root=root, workers=1, preset="cpu", progress=False)
    return root


def _pathfinder_cases():
    files = [("train/index.json", JSON_DAMAGE), ("train/images/{0}", PNG_DAMAGE), ("train/labels/{0}", PNG_DAMAGE)]
    return [(f, how, seed) for f, damages in files for seed, how in enumerate(damages)]


@pytest.mark.parametrize("rel,how,seed", _pathfinder_cases(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_pathfinder_loader_fuzz(pathfinder_source, rel, how, seed):
    root = pathfinder_source
    name = f"pf_fuzz_{rel.split('/')[1].split('.')[0]}_{seed}"
    src, dst = os.path.join(root, "pathfinder", "pf_src"), os.path.join(root, "pathfinder", name)
    shutil.copytree(src, dst)
    if "{0}" in rel:
        folder = os.path.join(dst, os.path.dirname(rel))
        rel = rel.format(sorted(os.listdir(folder))[0])
    _damage(os.path.join(dst, rel), how, seed)
    mapper = PathfinderDatasetMapper(is_train=True, flip=True)

    def load():
        for d in load_pathfinder_dicts(name, "train", root):
            out = mapper(d)
            assert out["image"].shape[-2:] == out["sem_seg"].shape

    _assert_loads_or_clear_error(load, dst, f"{rel} damaged by {how.__name__}")


# ---------------------------------------------------------------------------------------------
# Panoptic: rfpn/data/panoptic_registration.py (validated registration) + CheckedDatasetMapper
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def panoptic_source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pan_fuzz"))
    generate_synthetic_panoptic(root, "pan_src", num_train=2, num_test=1, image_size=32, seed=0, workers=1,
                                show_progress=False)
    cfg = model_zoo.get_config("Synthetic-Panoptic/panoptic_fpn_R_18.yaml")
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", (32,), "INPUT.MAX_SIZE_TRAIN", 32])
    return root, cfg


def _panoptic_cases():
    files = [
        ("annotations/panoptic_train.json", JSON_DAMAGE),
        ("annotations/instances_train.json", JSON_DAMAGE),
        ("panoptic_train/{0}", PNG_DAMAGE),
        ("panoptic_stuff_train/{0}", PNG_DAMAGE),
        ("train/{0}", BYTE_DAMAGE),
    ]
    return [(f, how, seed) for f, damages in files for seed, how in enumerate(damages)]


@pytest.mark.parametrize("rel,how,seed", _panoptic_cases(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_panoptic_loader_fuzz(panoptic_source, rel, how, seed):
    root, cfg = panoptic_source
    name = f"pan_fuzz_{rel.split('/')[0].split('.')[0]}_{rel.split('/')[-1].split('.')[0]}_{seed}".replace("{0}", "png")
    src, dst = os.path.join(root, "pan_src"), os.path.join(root, name)
    shutil.copytree(src, dst)
    if "{0}" in rel:
        folder = os.path.join(dst, os.path.dirname(rel))
        rel = rel.format(sorted(os.listdir(folder))[0])
    _damage(os.path.join(dst, rel), how, seed)
    train, _ = register_synthetic_panoptic(name, root)
    mapper = CheckedDatasetMapper(cfg, is_train=True)

    def load():
        for d in DatasetCatalog.get(train):
            out = mapper(d)
            assert out["image"].shape[0] == 3

    _assert_loads_or_clear_error(load, dst, f"{rel} damaged by {how.__name__}")


# ---------------------------------------------------------------------------------------------
# Command-line checks: rfpn.utils.cli
# ---------------------------------------------------------------------------------------------


def test_missing_config_file_names_it():
    with pytest.raises(UsageError, match=r"'configs/nope\.yaml' does not exist.*configs/"):
        load_config("configs/nope.yaml")


def test_unknown_config_key_names_key_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {PF_CONFIG}\nMODEL:\n  RECURRENT:\n    STEPZ: 3\n")
    with pytest.raises(UsageError, match=r"Unknown config key MODEL\.RECURRENT\.STEPZ \(in .*bad\.yaml\)\. "
                                         r"Did you mean MODEL\.RECURRENT\.STEPS"):
        load_config(str(bad))
    with pytest.raises(UsageError, match=r"Unknown config key SOLVER\.BASE_LRR \(on the command line\)"):
        load_config(PF_CONFIG, ["SOLVER.BASE_LRR", "0.1"])
    with pytest.raises(UsageError, match="KEY VALUE pairs"):
        load_config(PF_CONFIG, ["SOLVER.BASE_LR"])
    bad.write_text("MODEL: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(str(bad))


def test_bad_config_value_names_key():
    from rfpn.config import validate_training_safety_config

    with pytest.raises(UsageError, match=r"SOLVER\.NONFINITE='maybe' is not valid; allowed values: raise, skip"):
        load_config(PF_CONFIG, ["SOLVER.NONFINITE", "maybe"], validators=[validate_training_safety_config])
    cfg = load_config(PF_CONFIG, ["SOLVER.NONFINITE", "skip"], validators=[validate_training_safety_config])
    assert cfg.SOLVER.NONFINITE == "skip"


def test_unknown_dataset_name_suggests_registered_one():
    cfg = load_config(PF_CONFIG, ["DATASETS.TRAIN", "('pathfinder_cpu9_trian',)"])
    with pytest.raises(UsageError, match=r"DATASETS\.TRAIN names 'pathfinder_cpu9_trian'.*Did you mean "
                                         r"pathfinder_cpu9_train.*prepare_pathfinder\.py"):
        check_registered_datasets(cfg)


def test_run_cli_prints_one_line_and_exit_codes(capsys):
    def misuse():
        raise UsageError("Config file 'x.yaml' does not exist.")

    def damaged_in_worker():  # how a DataLoader worker's error reaches the main process
        raise OSError("Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                      '  File "a.py", line 1, in f\nOSError: Cannot read Pathfinder image /d/0.png (truncated).')

    def bug():
        raise RuntimeError("not a known input error")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(misuse, prog="tool")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "tool: error: Config file 'x.yaml' does not exist.\n"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(damaged_in_worker, prog="tool")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "tool: error: Cannot read Pathfinder image /d/0.png (truncated).\n"
    with pytest.raises(RuntimeError):  # anything else keeps its traceback
        run_cli(bug, prog="tool")
    assert run_cli(lambda x: x + 1, 1) == 2


# ---------------------------------------------------------------------------------------------
# The command-line tools end to end (in this process: each call is a full `main`)
# ---------------------------------------------------------------------------------------------


def _tool(relpath: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"rfpn_tool_{os.path.basename(relpath)[:-3]}",
                                                  os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit_code_and_stderr(capsys, monkeypatch, entry, argv):
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        entry()
    err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    return exit_info.value.code, err


@pytest.mark.parametrize(
    "extra,code,expected",
    [
        (["--config-file", "configs/Pathfinder/none.yaml"], 2, "Config file 'configs/Pathfinder/none.yaml' does not exist"),
        (["--config-file", PF_CONFIG, "MODEL.RECURRENT.GARD", "bptt"], 2, "Unknown config key MODEL.RECURRENT.GARD"),
        (["--config-file", PF_CONFIG, "DATASETS.TRAIN", "('no_such_set',)"], 2, "'no_such_set', which is not a registered"),
        (["--config-file", PF_CONFIG, "--num-gpus", "0"], 2, "use --num-gpus >= 1"),
    ],
)
def test_train_net_misuse_exits_2_with_one_line(capsys, monkeypatch, extra, code, expected):
    train_net = _tool("tools/train_net.py")
    got, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main, ["train_net.py", *extra])
    assert got == code and len(err) == 1 and expected in err[0], err


def test_train_net_truncated_image_exits_1_naming_it(pathfinder_source, tmp_path, capsys, monkeypatch):
    from rfpn.data.pathfinder import register_pathfinder

    root = pathfinder_source
    dst = os.path.join(root, "pathfinder", "pf_cli_truncated")
    shutil.copytree(os.path.join(root, "pathfinder", "pf_src"), dst)
    images = os.path.join(dst, "train", "images")
    for image in os.listdir(images):
        _damage(os.path.join(images, image), _truncated, 0)
    register_pathfinder("pf_cli_truncated", root=root)
    opts = ["OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", "('pf_cli_truncated_train',)", "DATASETS.TEST", "()",
            "DATALOADER.NUM_WORKERS", "0", "MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.STEPS", "2",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2"]
    train_net = _tool("tools/train_net.py")
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main,
                                      ["train_net.py", "--config-file", PF_CONFIG, *opts])
    assert code == 1 and len(err) == 1, err
    assert "Cannot read Pathfinder image" in err[0] and "pf_cli_truncated" in err[0] and "--overwrite" in err[0]


@pytest.mark.parametrize("script", ["datasets/prepare_pathfinder.py", "datasets/prepare_synthetic_panoptic.py"])
def test_prepare_scripts_report_an_unusable_root_in_one_line(script, tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    tool = _tool(script)
    argv = [script, "--root", str(not_a_dir), "--num-train", "1", "--num-test", "1"]
    if "pathfinder" in script:
        argv += ["--preset", "cpu", "--no-progress", "--workers", "1"]
    code, err = _exit_code_and_stderr(capsys, monkeypatch, lambda: run_cli(tool.main, prog=script), argv)
    assert code == 1 and len(err) == 1 and str(not_a_dir) in err[0], err


def test_train_net_refuses_a_cpu_model_for_nccl_workers(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    train_net = _tool("tools/train_net.py")
    argv = ["train_net.py", "--config-file", PF_CONFIG, "--num-gpus", "2"]
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main, argv)
    assert code == 2 and len(err) == 1 and "add MODEL.DEVICE cuda" in err[0], err
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main,
                                      argv[:-1] + ["4", "MODEL.DEVICE", "cuda"])
    assert code == 2 and len(err) == 1 and "has 2 GPU(s)" in err[0], err


@pytest.mark.parametrize(
    "error,expected",
    [
        (KeyError("Non-existent config key: MODEL.FOO"), "Unknown config key MODEL.FOO."),
        (AssertionError("Non-existent key: SOLVER.BAR"), "Unknown config key SOLVER.BAR."),
        (AssertionError("Config file 'x.yaml' does not exist!"), "Config file 'x.yaml' does not exist. Pass"),
        (KeyError("Dataset 'pf_x_train' is not registered! Available datasets are: a, b"),
         "Dataset 'pf_x_train' is not registered. Pathfinder sets are made by datasets/prepare_pathfinder.py"),
    ],
)
def test_run_cli_translates_detectron2_misuse_errors(error, expected, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, prog="tool")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tool: error: {expected}") and err.count("\n") == 1, err
    with pytest.raises(KeyError):  # other KeyErrors are bugs: they keep their traceback
        run_cli(lambda: {}["missing"], prog="tool")


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH=0 is not valid; allowed values: an integer >= 1"),
        (["SOLVER.IMS_PER_BATCH", "5", "--num-gpus", "2"], "SOLVER.IMS_PER_BATCH=5 is not valid; allowed values: a multiple of the 2"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD=0 is not valid"),
        (["SOLVER.STEPS", "(-1,)"], "SOLVER.STEPS=(-1,) is not valid; allowed values: increasing iteration numbers >= 1"),
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER=0 is not valid"),
        (["TEST.EVAL_PERIOD", "-5"], "TEST.EVAL_PERIOD=-5 is not valid"),
        (["MODEL.DEVICE", "cuda"], "MODEL.DEVICE='cuda' but this machine has no CUDA device; add MODEL.DEVICE cpu"),
        (["MODEL.DEVICE", "gpu0"], "MODEL.DEVICE='gpu0' is not a device"),
        (["SOLVER.AMP.PRECISION", "fp8"], "SOLVER.AMP.PRECISION='fp8' is not valid"),
        (["SOLVER.NONFINITE_MAX_FRACTION", "2.0"], "SOLVER.NONFINITE_MAX_FRACTION=2.0 is not valid"),
    ],
)
def test_train_net_checks_detectron2_keys_before_any_worker_starts(capsys, monkeypatch, extra, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train_net = _tool("tools/train_net.py")
    args = ["train_net.py", "--config-file", PF_CONFIG]
    args += [a for a in extra if a.startswith("--") or extra[extra.index(a) - 1] == "--num-gpus"]
    args += [a for a in extra if not (a.startswith("--") or extra[extra.index(a) - 1] == "--num-gpus")]
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main, args)
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_a_missing_base_names_the_file_that_refers_to_it(tmp_path, capsys, monkeypatch):
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "parent.yaml"\nSOLVER:\n  MAX_ITER: 3\n')
    train_net = _tool("tools/train_net.py")
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main, ["train_net.py", "--config-file", str(child)])
    assert code == 2 and len(err) == 1, err
    assert f"Config file {child} has _BASE_: 'parent.yaml', which does not exist" in err[0]


def test_an_unprepared_dataset_fails_before_workers_start(tmp_path, capsys, monkeypatch):
    from rfpn.data.pathfinder import register_pathfinder

    register_pathfinder("pf_never_made", root=str(tmp_path))
    monkeypatch.setattr("detectron2.engine.launch", lambda *a, **k: pytest.fail("workers were started"))
    train_net = _tool("tools/train_net.py")
    argv = ["train_net.py", "--config-file", PF_CONFIG, "--num-gpus", "2", "DATASETS.TRAIN", "('pf_never_made_train',)"]
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main, argv)
    assert code == 1 and len(err) == 1 and "pf_never_made' was not found" in err[0], err


def test_every_config_runs_where_its_folder_says():
    """CPU-scale configs pin the CPU; paper-scale and COCO configs keep Detectron2's default device (a GPU)."""
    from rfpn import model_zoo

    root = os.path.join(REPO, "configs")
    checked = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".yaml") or name.startswith("Base-RCNN"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)
            cfg = model_zoo.get_config(rel)
            cpu_scale = rel.startswith(("Pathfinder/cpu", "Synthetic-Panoptic"))
            assert (cfg.MODEL.DEVICE == "cpu") == cpu_scale, rel
            checked += 1
    assert checked >= 40


def test_train_net_names_a_truncated_panoptic_image_and_its_prepare_command(panoptic_source, tmp_path, capsys, monkeypatch):
    root, _ = panoptic_source
    dst = os.path.join(root, "pan_cli_truncated")
    shutil.copytree(os.path.join(root, "pan_src"), dst)
    images = os.path.join(dst, "train")
    for image in os.listdir(images):
        _damage(os.path.join(images, image), _truncated, 0)
    train, _ = register_synthetic_panoptic("pan_cli_truncated", root)
    config = os.path.join(REPO, "configs", "Synthetic-Panoptic", "panoptic_fpn_R_18.yaml")
    opts = ["OUTPUT_DIR", str(tmp_path), "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", "()",
            "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
            "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "32"]
    train_net = _tool("tools/train_net.py")
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main,
                                      ["train_net.py", "--config-file", config, *opts])
    assert code == 1 and len(err) == 1, err
    assert "Cannot decode file_name" in err[0] and "pan_cli_truncated" in err[0] and "prepare_synthetic_panoptic.py" in err[0]

"""Pathfinder data: label rules of the generator, reproducibility, atomic writes, registration, mapper."""
import dataclasses
import filecmp
import json
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from scipy import ndimage

import rfpn.data.pathfinder_generator as gen
from rfpn.config import add_rfpn_config
from rfpn.data.pathfinder import load_pathfinder_dicts, register_pathfinder
from rfpn.data.pathfinder_generator import PRESETS, main, render_sample, sample_rng
from rfpn.data.pathfinder_mapper import PathfinderDatasetMapper

EIGHT = np.ones((3, 3), bool)


def _cli(root, name, *extra):
    args = ["--preset", "cpu", "--contour-length", "6", "--name", name, "--num-train", "6", "--num-test", "3",
            "--root", str(root), "--workers", "1", "--no-progress", *extra]
    return main(args)


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.mark.parametrize(
    "preset, length, count, overrides",
    [
        ("paper", 9, 4, {}),
        ("paper", 14, 4, {}),
        ("paper", 25, 4, {}),
        ("paper", 14, 3, {"image_size": 100}),
        ("cpu", 6, 8, {}),
        ("cpu", 9, 8, {}),
        ("cpu", 12, 8, {}),
        ("cpu", 14, 8, {}),
        ("cpu", 9, 4, {"render_scale": 1.5, "image_size": 80}),  # non-integer reduction
        ("cpu", 9, 4, {"render_scale": 1.0, "paddle_length": 3.0, "paddle_thickness": 1, "paddle_margin": 2.0,
                       "marker_radius": 2.0}),
    ],
)
def test_label_is_one_component_with_marker_and_untouched(preset, length, count, overrides):
    settings = dataclasses.replace(PRESETS[preset], contour_length=length, **overrides)
    for i in range(count):
        s = render_sample(settings, sample_rng(7, "train", i))
        size = settings.image_size
        assert s.image.shape == s.label.shape == s.distractors.shape == (size, size)
        assert s.image.dtype == s.label.dtype == np.uint8
        assert set(np.unique(s.label)) == {0, 255}
        label = s.label > 0
        comps, n = ndimage.label(label, structure=EIGHT)
        assert n == 1, f"{preset}{length} sample {i}: label has {n} 8-connected components"
        assert label[s.marker] and s.image[s.marker] == 255
        assert s.distractors.any()
        assert not (ndimage.binary_dilation(label, structure=EIGHT) & s.distractors).any()
        ink = s.image > 0
        # Every drawn pixel is target or distractor, and distractor pixels are drawn.
        assert not (ink & ~label & ~s.distractors).any() and (ink[s.distractors]).all()
        # The target is a contour, not a blob: it reaches well beyond the marker.
        rows, cols = np.nonzero(label)
        reach = np.maximum(abs(rows - s.marker[0]), abs(cols - s.marker[1])).max()
        step = (settings.paddle_length + settings.paddle_margin) / settings.render_scale
        assert reach >= min(length * step / 3, size / 3)


def test_longer_contours_have_larger_labels():
    def mean_area(length):
        settings = dataclasses.replace(PRESETS["cpu"], contour_length=length)
        return np.mean([(render_sample(settings, sample_rng(0, "test", i)).label > 0).sum() for i in range(6)])

    assert mean_area(12) > 1.5 * mean_area(6)


def test_same_seed_is_byte_identical_for_any_worker_count(tmp_path):
    a = _cli(tmp_path / "a", "pf_seed")
    b = _cli(tmp_path / "b", "pf_seed", "--workers", "2")
    c = _cli(tmp_path / "c", "pf_seed", "--seed", "1")
    files = _files(a)
    assert files == _files(b) and len(files) == 2 * (6 + 3) + 3
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    _, differ, _ = filecmp.cmpfiles(a, c, [f for f in files if f.startswith("train/images")], shallow=False)
    assert len(differ) == 6


def test_cli_dataset_loads_through_catalog_and_mapper(tmp_path, capsys):
    out = _cli(tmp_path, "pf_cli_t")
    assert out == os.path.join(str(tmp_path), "pathfinder", "pf_cli_t")
    register_pathfinder("pf_cli_t", root=str(tmp_path))
    dicts = DatasetCatalog.get("pf_cli_t_train")
    assert len(dicts) == 6 and len(DatasetCatalog.get("pf_cli_t_test")) == 3
    assert set(dicts[0]) == {"file_name", "sem_seg_file_name", "height", "width", "image_id"}
    assert [d["image_id"] for d in dicts] == list(range(6))
    meta = MetadataCatalog.get("pf_cli_t_test")
    assert meta.stuff_classes == ["background", "contour"] and meta.ignore_label == 255
    assert meta.evaluator_type == "pathfinder" and (meta.contour_length, meta.image_size) == (6, 64)
    assert meta.sem_seg_root == os.path.join(out, "test", "labels") and os.path.isdir(meta.image_root)

    cfg = get_cfg()
    add_rfpn_config(cfg)
    assert cfg.INPUT.PATHFINDER_FLIP is True
    # Test mapping is exact: the stimulus as floats, the label as 0/1.
    rec = dicts[0]
    expected = render_sample(dataclasses.replace(PRESETS["cpu"], contour_length=6), sample_rng(0, "train", 0))
    got = PathfinderDatasetMapper(cfg, is_train=False)(rec)
    assert got["image"].dtype == torch.float32 and got["image"].shape == (1, 64, 64)
    assert got["sem_seg"].dtype == torch.int64 and got["sem_seg"].shape == (64, 64)
    assert torch.equal(got["image"][0], torch.from_numpy(expected.image).float())
    assert torch.equal(got["sem_seg"], torch.from_numpy(expected.label // 255).long())
    assert (got["height"], got["width"], got["file_name"]) == (64, 64, rec["file_name"])
    # Training flips image and label together, and all four flips occur.
    train_mapper = PathfinderDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    seen = set()
    for _ in range(40):
        m = train_mapper(rec)
        for flips in [(), (1,), (0,), (0, 1)]:
            img = torch.from_numpy(expected.image).float().flip(flips) if flips else torch.from_numpy(expected.image).float()
            if torch.equal(m["image"][0], img):
                lab = torch.from_numpy(expected.label // 255).long()
                assert torch.equal(m["sem_seg"], lab.flip(flips) if flips else lab)
                seen.add(flips)
    assert len(seen) == 4
    cfg.INPUT.PATHFINDER_FLIP = False
    assert torch.equal(PathfinderDatasetMapper(cfg, is_train=True)(rec)["image"], got["image"])

    # Re-running with the same request does nothing; a different one is refused.
    before = os.path.getmtime(os.path.join(out, "train", "index.json"))
    _cli(tmp_path, "pf_cli_t")
    assert "nothing to do" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "train", "index.json")) == before
    with pytest.raises(SystemExit):
        _cli(tmp_path, "pf_cli_t", "--seed", "3")
    assert "--overwrite" in capsys.readouterr().err
    _cli(tmp_path, "pf_cli_t", "--seed", "3", "--overwrite")
    assert json.load(open(os.path.join(out, "dataset.json")))["seed"] == 3
    assert sorted(os.listdir(os.path.join(str(tmp_path), "pathfinder"))) == ["pf_cli_t"]


def test_error_command_remakes_the_same_dataset(tmp_path):
    out = _cli(tmp_path, "pf_custom", "--image-size", "48", "--num-distractors", "2", "--paddle-margin", "3.5",
               "--seed", "5")
    os.remove(os.path.join(out, "test", "index.json"))
    with pytest.raises(FileNotFoundError) as e:
        load_pathfinder_dicts("pf_custom", "test", str(tmp_path))
    command = next(line for line in str(e.value).splitlines() if "prepare_pathfinder.py" in line).split()
    assert command[:2] == ["python", "datasets/prepare_pathfinder.py"] and command[-1] == "--overwrite"
    args = gen.build_argument_parser().parse_args(command[2:])
    made = json.load(open(os.path.join(out, "dataset.json")))
    assert dataclasses.asdict(gen.settings_from_args(args).resolved()) == made["settings"]
    assert (args.name, args.seed, args.num_train, args.num_test) == ("pf_custom", 5, 6, 3)


def test_standard_names_are_registered():
    for name, length, size in [("pathfinder14", 14, 150), ("pathfinder_cpu9", 9, 64), ("pathfinder_cpu14", 14, 64)]:
        for split in ("train", "test"):
            assert f"{name}_{split}" in DatasetCatalog.list()
        meta = MetadataCatalog.get(f"{name}_test")
        assert meta.contour_length == length and meta.evaluator_type == "pathfinder"


@pytest.mark.parametrize(
    "name, command",
    [
        ("pathfinder_cpu9", "python datasets/prepare_pathfinder.py --preset cpu --contour-length 9 --name pathfinder_cpu9"),
        ("pathfinder11", "python datasets/prepare_pathfinder.py --preset paper --contour-length 11 --name pathfinder11"),
    ],
)
def test_missing_dataset_names_the_prepare_command(tmp_path, name, command):
    with pytest.raises(FileNotFoundError) as e:
        load_pathfinder_dicts(name, "train", root=str(tmp_path))
    assert command in str(e.value) and f"--root {tmp_path}" in str(e.value)


def test_interrupted_or_damaged_datasets_do_not_load(tmp_path, monkeypatch):
    root = str(tmp_path)
    # Interrupted while writing the index (the last step): nothing appears, nothing is left behind.
    real = gen._write_json

    def interrupt(path, obj, compact=False):
        if path.endswith("index.json"):
            raise KeyboardInterrupt
        real(path, obj, compact)

    monkeypatch.setattr(gen, "_write_json", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _cli(tmp_path, "pf_cut")
    monkeypatch.undo()
    assert os.listdir(os.path.join(root, "pathfinder")) == []
    with pytest.raises(FileNotFoundError, match="pf_cut"):
        load_pathfinder_dicts("pf_cut", "train", root)

    # A dataset that lost files, its index, or whose index is truncated.
    out = _cli(tmp_path, "pf_dmg")
    os.remove(os.path.join(out, "test", "labels", "000001.png"))
    with pytest.raises(FileNotFoundError, match="2 of 3 files"):
        load_pathfinder_dicts("pf_dmg", "test", root)
    index = os.path.join(out, "train", "index.json")
    text = open(index).read()
    open(index, "w").write(text[: len(text) // 2])
    with pytest.raises(ValueError) as e:
        load_pathfinder_dicts("pf_dmg", "train", root)
    assert index in str(e.value) and "--overwrite" in str(e.value) and "--contour-length 6 --name pf_dmg" in str(e.value)
    os.remove(index)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_pathfinder_dicts("pf_dmg", "train", root)

    # A truncated PNG fails in the mapper with its file name.
    out = _cli(tmp_path, "pf_png")
    rec = load_pathfinder_dicts("pf_png", "train", root)[2]
    data = open(rec["sem_seg_file_name"], "rb").read()
    open(rec["sem_seg_file_name"], "wb").write(data[: len(data) // 2])
    cfg = get_cfg()
    add_rfpn_config(cfg)
    with pytest.raises(OSError, match=rec["sem_seg_file_name"]):
        PathfinderDatasetMapper(cfg, is_train=False)(rec)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="paddle_length"):
        render_sample(dataclasses.replace(PRESETS["cpu"], paddle_length=0), 0)
    with pytest.raises(ValueError, match="--image-size"):
        render_sample(dataclasses.replace(PRESETS["cpu"], contour_length=60, image_size=16), 0)


def test_a_killed_generation_leaves_nothing_the_next_one_keeps(tmp_path):
    parent = tmp_path / "pathfinder"
    stale = parent / ".pf_stale.tmp-999999999-abcd1234"
    (stale / "train").mkdir(parents=True)
    (parent / ".pf_stale.tmp-999999999-abcd1234.old").mkdir()
    settings = dataclasses.replace(gen.PRESETS["cpu"], contour_length=3, image_size=24, paddle_length=4.0,
                                   paddle_margin=2.0, marker_radius=2.0, distractor_paddles=3)
    gen.generate_pathfinder("pf_stale", settings, 1, 1, seed=0, root=str(tmp_path), workers=1, preset="cpu",
                        progress=False)
    assert sorted(os.listdir(parent)) == ["pf_stale"]

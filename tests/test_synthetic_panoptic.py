"""Synthetic COCO-panoptic data: file format, Detectron2 registration, stuff PNGs, bad input."""
import filecmp
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator

from rfpn.data import (
    CheckedDatasetMapper,
    PanopticFormatError,
    convert_panoptic_to_stuff,
    generate_synthetic_panoptic,
    register_synthetic_panoptic,
    validate_panoptic_dataset,
)
from rfpn.data.panoptic_stuff import id2rgb, rgb2id

NAME = "rfpn_test_synth"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    generate_synthetic_panoptic(str(root), NAME, num_train=6, num_test=4, image_size=64, seed=3, workers=1,
                                show_progress=False)
    names = register_synthetic_panoptic(NAME, str(root))
    return root, names


def _json(path):
    with open(path) as f:
        return json.load(f)


def _png(path):
    return np.asarray(Image.open(path))


def test_registered_names_load_through_dataset_catalog(tiny):
    _, names = tiny
    assert names == [f"{NAME}_train_separated", f"{NAME}_val_separated"]
    for name, count in zip(names, (6, 4)):
        dicts = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert len(dicts) == count
        assert meta.evaluator_type == "coco_panoptic_seg"
        assert meta.thing_classes == ["circle", "square", "triangle"]
        assert meta.stuff_classes[0] == "things" and len(meta.stuff_classes) == 5
        for d in dicts:
            assert os.path.isfile(d["file_name"]) and os.path.isfile(d["sem_seg_file_name"])
            assert (d["height"], d["width"]) == (64, 64)
            assert d["annotations"], "every image has at least one thing"
            for ann in d["annotations"]:
                assert 0 <= ann["category_id"] < 3 and ann["segmentation"] and ann["iscrowd"] == 0
        assert len(DatasetCatalog.get(name.replace("_separated", "_stuffonly"))) == count
        stats = validate_panoptic_dataset(name)
        assert stats["images"] == count and stats["instances"] == sum(len(d["annotations"]) for d in dicts)


def test_panoptic_png_matches_json_segments(tiny):
    root, _ = tiny
    base = root / NAME
    pan = _json(base / "annotations" / "panoptic_val.json")
    cats = {c["id"]: c for c in pan["categories"]}
    assert {c["isthing"] for c in cats.values()} == {0, 1}
    for ann in pan["annotations"]:
        ids = rgb2id(_png(base / "panoptic_val" / ann["file_name"]))
        assert set(np.unique(ids).tolist()) == {s["id"] for s in ann["segments_info"]}
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            ys, xs = np.nonzero(mask)
            assert seg["area"] == mask.sum()
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert seg["category_id"] in cats and seg["iscrowd"] == 0
        # stuff is one segment per category, as in COCO
        stuff_cats = [s["category_id"] for s in ann["segments_info"] if not cats[s["category_id"]]["isthing"]]
        assert len(stuff_cats) == len(set(stuff_cats))


def test_stuff_pngs_match_panoptic_pngs(tiny):
    root, names = tiny
    base = root / NAME
    meta = MetadataCatalog.get(names[1])
    pan = _json(base / "annotations" / "panoptic_val.json")
    for ann in pan["annotations"]:
        ids = rgb2id(_png(base / "panoptic_val" / ann["file_name"]))
        stuff = _png(base / "panoptic_stuff_val" / ann["file_name"])
        expected = np.full(ids.shape, 255)
        for seg in ann["segments_info"]:
            cid = seg["category_id"]
            label = 0 if cid in meta.thing_dataset_id_to_contiguous_id else meta.stuff_dataset_id_to_contiguous_id[cid]
            expected[ids == seg["id"]] = label
        np.testing.assert_array_equal(stuff, expected)
        assert 0 < len(np.unique(stuff)) <= 5


def test_instance_json_reads_with_pycocotools_and_matches_panoptic(tiny):
    root, _ = tiny
    base = root / NAME
    coco = COCO(str(base / "annotations" / "instances_val.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    pan = {a["image_id"]: a for a in _json(base / "annotations" / "panoptic_val.json")["annotations"]}
    assert set(coco.getImgIds()) == set(pan)
    for img_id in coco.getImgIds():
        ids = rgb2id(_png(base / "panoptic_val" / pan[img_id]["file_name"]))
        things = [s for s in pan[img_id]["segments_info"] if s["category_id"] in (1, 2, 3)]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        assert len(anns) == len(things)
        masks = {s["id"]: (ids == s["id"], s["category_id"]) for s in things}
        for ann in anns:
            # the polygons rasterize to exactly the visible pixels of one panoptic thing segment
            m = coco.annToMask(ann).astype(bool)
            match = [sid for sid, (mask, cid) in masks.items() if cid == ann["category_id"] and (mask == m).all()]
            assert len(match) == 1


def test_same_seed_gives_identical_files(tiny, tmp_path):
    root, _ = tiny
    generate_synthetic_panoptic(str(tmp_path / "a"), NAME, num_train=6, num_test=4, image_size=64, seed=3,
                                workers=2, show_progress=False)
    cmp = filecmp.dircmp(root / NAME, tmp_path / "a" / NAME)

    def same(c):
        assert not c.left_only and not c.right_only and not c.diff_files
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors
        return sum(same(sub) for sub in c.subdirs.values()) + len(c.common_files)

    assert same(cmp) == (6 + 4) * 3 + 4  # jpg + panoptic png + stuff png per image, 4 JSONs
    generate_synthetic_panoptic(str(tmp_path / "b"), NAME, num_train=1, num_test=1, image_size=64, seed=4,
                                workers=1, show_progress=False)
    first = "000000000001.jpg"
    assert not filecmp.cmp(root / NAME / "train" / first, tmp_path / "b" / NAME / "train" / first, shallow=False)


def test_panoptic_evaluator_scores_ground_truth_as_pq_100(tiny, tmp_path):
    root, names = tiny
    name = names[1]
    meta = MetadataCatalog.get(name)
    pan = {a["image_id"]: a for a in _json(meta.panoptic_json)["annotations"]}
    things, stuff = meta.thing_dataset_id_to_contiguous_id, meta.stuff_dataset_id_to_contiguous_id

    def run(corrupt):
        evaluator = COCOPanopticEvaluator(name, str(tmp_path))
        evaluator.reset()
        for d in DatasetCatalog.get(name):
            ann = pan[d["image_id"]]
            ids = rgb2id(_png(os.path.join(meta.panoptic_root, ann["file_name"])))
            info = []
            for seg in ann["segments_info"]:
                isthing = seg["category_id"] in things
                cid = things[seg["category_id"]] if isthing else stuff[seg["category_id"]]
                if corrupt and isthing:
                    cid = (cid + 1) % len(things)
                info.append({"id": seg["id"], "category_id": cid, "isthing": isthing})
            evaluator.process([d], [{"panoptic_seg": (torch.from_numpy(ids).int(), info)}])
        return evaluator.evaluate()["panoptic_seg"]

    res = run(corrupt=False)
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert res[key] == pytest.approx(100.0), (key, res)
    wrong = run(corrupt=True)
    assert wrong["PQ_th"] < 1.0 and wrong["PQ_st"] == pytest.approx(100.0)


# ------------------------------------------------------------------ bad input


@pytest.fixture
def broken(tiny, tmp_path):
    """A private copy of the tiny set, registered under its own name, for corrupting."""
    root, _ = tiny
    shutil.copytree(root / NAME, tmp_path / "broken")
    names = register_synthetic_panoptic("broken", str(tmp_path))
    return tmp_path / "broken", names[1]


def test_missing_panoptic_json_names_file_and_fix(broken):
    base, name = broken
    (base / "annotations" / "panoptic_val.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"panoptic_val\.json.*prepare_synthetic_panoptic\.py"):
        DatasetCatalog.get(name)


def test_missing_png_names_file(broken):
    base, name = broken
    victim = sorted((base / "panoptic_val").iterdir())[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        DatasetCatalog.get(name)
    stuff_victim = sorted((base / "panoptic_stuff_val").iterdir())[0]
    stuff_victim.unlink()
    with pytest.raises(FileNotFoundError, match=stuff_victim.name):
        DatasetCatalog.get(name.replace("_separated", "_stuffonly"))


def test_corrupt_png_names_file(broken):
    base, name = broken
    victim = sorted((base / "panoptic_val").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated: header only
    with pytest.raises(PanopticFormatError, match=victim.name):
        DatasetCatalog.get(name)


def test_unknown_category_id_is_named(broken):
    base, name = broken
    path = base / "annotations" / "panoptic_val.json"
    data = _json(path)
    data["annotations"][0]["segments_info"][0]["category_id"] = 77
    path.write_text(json.dumps(data))
    with pytest.raises(PanopticFormatError, match="category_id=77"):
        DatasetCatalog.get(name)
    with pytest.raises(PanopticFormatError, match="category_id=77"):
        convert_panoptic_to_stuff(str(path), str(base / "panoptic_val"), str(base / "out"),
                                  MetadataCatalog.get(name).as_dict(), workers=1, show_progress=False)

    path = base / "annotations" / "instances_train.json"
    data = _json(path)
    data["annotations"][0]["category_id"] = 42
    path.write_text(json.dumps(data))
    with pytest.raises(PanopticFormatError, match="category_id=42"):
        DatasetCatalog.get(name.replace("_val_", "_train_"))


def test_mapper_names_undecodable_image(broken):
    _, name = broken
    cfg = get_cfg()
    mapper = CheckedDatasetMapper(cfg, is_train=True)
    d = DatasetCatalog.get(name)[0]
    out = mapper(d)
    assert out["sem_seg"].shape == out["image"].shape[1:] and len(out["instances"]) == len(d["annotations"])
    Path(d["sem_seg_file_name"]).write_bytes(b"not a png")
    with pytest.raises(PanopticFormatError, match=os.path.basename(d["sem_seg_file_name"])):
        mapper(d)


# ------------------------------------------------------------------ COCO conventions


def test_prepare_panoptic_fpn_on_builtin_coco_layout(tmp_path, monkeypatch):
    """A one-image COCO val set at Detectron2's builtin paths: the loader names the missing stuff
    PNGs and the command; the CLI writes them with COCO's ids (person=1 -> 0, stuff 92 'banner'
    -> 1, 200 -> 53, unlabeled -> 255) and Detectron2's loader then reads the set."""
    name = "coco_2017_val_panoptic_separated"
    meta = MetadataCatalog.get(name)
    if os.path.isabs(meta.panoptic_json):
        pytest.skip("DETECTRON2_DATASETS is set: the builtin COCO paths are outside the test's folder")
    monkeypatch.chdir(tmp_path)
    ids = np.zeros((8, 10), np.int64)
    ids[:, :3], ids[:, 3:6], ids[:4, 6:] = 5, 7, 9
    segments = [
        {"id": 5, "category_id": 1, "area": 24, "bbox": [0, 0, 3, 8], "iscrowd": 0},
        {"id": 7, "category_id": 92, "area": 24, "bbox": [3, 0, 3, 8], "iscrowd": 0},
        {"id": 9, "category_id": 200, "area": 16, "bbox": [6, 0, 4, 4], "iscrowd": 0},
    ]
    image = {"id": 1, "file_name": "000000000001.jpg", "height": 8, "width": 10}
    coco_things = [{"id": k, "name": meta.thing_classes[v]} for k, v in meta.thing_dataset_id_to_contiguous_id.items()]
    for folder in (meta.image_root, meta.panoptic_root, os.path.dirname(meta.panoptic_json)):
        os.makedirs(folder)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(os.path.join(meta.image_root, "000000000001.jpg"))
    Image.fromarray(id2rgb(ids)).save(os.path.join(meta.panoptic_root, "000000000001.png"))
    cats = [{"id": c, "name": str(c), "isthing": int(c < 92)} for c in sorted(
        set(meta.thing_dataset_id_to_contiguous_id) | set(meta.stuff_dataset_id_to_contiguous_id) - {0})]
    Path(meta.panoptic_json).write_text(json.dumps({"images": [image], "categories": cats, "annotations": [
        {"image_id": 1, "file_name": "000000000001.png", "segments_info": segments}]}))
    Path(meta.json_file).write_text(json.dumps({"images": [image], "categories": coco_things, "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 24.0, "bbox": [0.0, 0.0, 3.0, 8.0],
         "segmentation": [[0.0, 0.0, 3.0, 0.0, 3.0, 8.0, 0.0, 8.0]]}]}))

    with pytest.raises(FileNotFoundError, match=r"panoptic_stuff_val2017.*prepare_panoptic_fpn\.py"):
        DatasetCatalog.get(name)
    spec = importlib.util.spec_from_file_location("prepare_panoptic_fpn", REPO / "datasets" / "prepare_panoptic_fpn.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.main(["--datasets", name, "--workers", "1", "--validate"])

    stuff = _png(os.path.join(meta.sem_seg_root, "000000000001.png"))
    expected = np.full((8, 10), 255)
    expected[:, :3], expected[:, 3:6], expected[:4, 6:] = 0, 1, 53
    np.testing.assert_array_equal(stuff, expected)
    (d,) = DatasetCatalog.get(name)
    assert d["annotations"][0]["category_id"] == 0 and d["sem_seg_file_name"].endswith("000000000001.png")


def test_area_thresholds_are_scaled_to_the_image_size_of_every_panoptic_config():
    """COCO's STUFF_AREA_LIMIT (4096 px at an 800 px short side) is scaled to each config's test size."""
    from rfpn import model_zoo

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("Synthetic-Panoptic/panoptic_*.yaml")) + sorted(root.glob("COCO-PanopticSegmentation/panoptic_*.yaml"))
    assert len(files) >= 10
    for path in files:
        cfg = model_zoo.get_config(str(path.relative_to(root)))
        expected = round(4096 * (cfg.INPUT.MIN_SIZE_TEST / 800) ** 2)
        assert cfg.MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT == expected, path.name

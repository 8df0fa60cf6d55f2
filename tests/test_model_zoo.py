"""Shipped checkpoints: every one loads through the model zoo and rfpn://, and reproduces its published IoU."""
from __future__ import annotations

import pytest

from rfpn import model_zoo
from rfpn.model_zoo.trained import PREFIX, published, sha256, subset_iou, WEIGHTS_ROOT

SHIPPED = sorted(published())


def test_at_least_one_checkpoint_is_shipped():
    assert SHIPPED, "rfpn/model_zoo/trained.json lists no checkpoint"


@pytest.mark.parametrize("config", SHIPPED)
def test_a_shipped_checkpoint_reproduces_its_published_iou(config):
    entry = published()[config]
    assert entry["weights"].startswith(PREFIX)
    assert sha256(WEIGHTS_ROOT / entry["weights"][len(PREFIX):]) == entry["sha256"], "the file changed after publishing"
    model = model_zoo.get(config, trained=True, device="cpu")
    assert subset_iou(model, entry["contour_length"]) == pytest.approx(entry["iou_first_100"], abs=0.01)


def test_rfpn_weights_load_through_model_weights_and_a_config_without_weights_names_those_with():
    from detectron2.modeling import build_model

    from rfpn.engine.checkpoint import CheckedCheckpointer

    config = SHIPPED[0]
    cfg = model_zoo.get_config(config, trained=True)
    assert cfg.MODEL.WEIGHTS == published()[config]["weights"]
    CheckedCheckpointer(build_model(cfg)).load(cfg.MODEL.WEIGHTS)
    with pytest.raises(RuntimeError, match=f"No trained checkpoint is published for 'Pathfinder/pf14_hgru_crbp20.yaml'.*{config}"):
        model_zoo.get_config("Pathfinder/pf14_hgru_crbp20.yaml", trained=True)
    with pytest.raises(FileNotFoundError, match="rfpn://Pathfinder/none.pth is not a shipped checkpoint"):
        CheckedCheckpointer(build_model(cfg)).load("rfpn://Pathfinder/none.pth")


def test_published_contour_length_comes_from_the_config_test_set():
    from rfpn.model_zoo.trained import contour_length

    assert contour_length("Pathfinder/cpu/pfcpu9_hgru_jfb.yaml") == 9
    assert contour_length("Pathfinder/cpu/pfcpu14_hgru3x3_crbp.yaml") == 14
    with pytest.raises(ValueError, match="only models of the CPU Pathfinder sets"):
        contour_length("Pathfinder/pf14_hgru_crbp20.yaml")


def test_tools_load_a_shipped_checkpoint_by_its_rfpn_url_and_name_the_shipped_ones_for_a_wrong_one():
    from rfpn.model_zoo import get_config_file
    from rfpn.utils.models import load_eval_model

    config = SHIPPED[0]
    cfg, model = load_eval_model(get_config_file(config), published()[config]["weights"], ["MODEL.DEVICE", "cpu"])
    assert not model.training and cfg.is_frozen()
    with pytest.raises(FileNotFoundError, match=f"rfpn://Pathfinder/none.pth is not a shipped checkpoint.*{config}"):
        load_eval_model(get_config_file(config), "rfpn://Pathfinder/none.pth")
    with pytest.raises(FileNotFoundError, match="do not exist; train the model first"):
        load_eval_model(get_config_file(config), "output/none/model_final.pth")


def test_publishing_a_run_ships_float32_weights_and_records_its_numbers(tmp_path, monkeypatch):
    import json

    import torch

    from rfpn.model_zoo import trained

    config = "Pathfinder/cpu/pfcpu14_ff3x3_control.yaml"
    entry = published()[config]
    shipped = WEIGHTS_ROOT / entry["weights"][len(PREFIX):]
    state = torch.load(shipped, map_location="cpu")
    run = tmp_path / "run" / "model_final.pth"  # as training leaves it: bf16 weights, trainer state beside them
    run.parent.mkdir()
    torch.save({"model": {k: v.bfloat16() for k, v in state["model"].items()}, "iteration": 2999}, run)
    monkeypatch.setattr(trained, "WEIGHTS_ROOT", tmp_path / "weights")
    monkeypatch.setattr(trained, "MANIFEST", tmp_path / "trained.json")

    record = trained.publish(config, str(run), {"method": "FF control", "iou_1000": 0.5})
    target = tmp_path / "weights" / "Pathfinder" / "cpu" / "pfcpu14_ff3x3_control.pth"
    saved = torch.load(target, map_location="cpu")
    assert set(saved) == {"model"} and all(v.dtype == torch.float32 for v in saved["model"].values())
    assert record["weights"] == PREFIX + "Pathfinder/cpu/pfcpu14_ff3x3_control.pth"
    assert record["sha256"] == sha256(target) and record["bytes"] == target.stat().st_size
    assert (record["method"], record["iou_1000"], record["contour_length"]) == ("FF control", 0.5, 14)
    assert record["iou_first_100"] == pytest.approx(entry["iou_first_100"], abs=0.01)  # bf16 rounding
    assert json.loads((tmp_path / "trained.json").read_text()) == {config: record}
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left behind


def _benchmark_configs() -> list[str]:
    from rfpn.benchmarks import long_contours, pathfinder, rfpn_panoptic

    configs = {f"Pathfinder/cpu/{name}" for name in [*pathfinder.METHODS.values(), *long_contours.METHODS.values()]}
    return sorted(configs | {config for _, config in rfpn_panoptic.MODELS.values()})


@pytest.mark.parametrize("config", _benchmark_configs())
def test_every_config_a_benchmark_trains_loads_and_builds(config):
    model = model_zoo.get(config, device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_model_zoo_md_names_exactly_the_cpu_pathfinder_configs_without_a_checkpoint():
    import re

    from rfpn.model_zoo.model_zoo import get_config_root

    text = (get_config_root().parent / "MODEL_ZOO.md").read_text()
    not_shipped = text[text.index("## Not shipped"):]
    named = set(re.findall(r"`(Pathfinder/cpu/[\w.]+\.yaml)`", not_shipped))
    configs = {f"Pathfinder/cpu/{p.name}" for p in (get_config_root() / "Pathfinder" / "cpu").glob("*.yaml")
               if not p.name.startswith("Base-")}
    assert named == configs - set(published())

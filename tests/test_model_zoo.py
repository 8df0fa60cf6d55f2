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

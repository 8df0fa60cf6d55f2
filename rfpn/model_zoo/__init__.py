"""Packaged rfpn configs, looked up by their path under the repository's ``configs/``.

Like ``detectron2.model_zoo``::

    from rfpn import model_zoo
    cfg = model_zoo.get_config("COCO-PanopticSegmentation/panoptic_rfpn_R_50_crbp20_1x.yaml")
    model = model_zoo.get("Synthetic-Panoptic/panoptic_rfpn_R_18_crbp20.yaml")
    trained = model_zoo.get("Pathfinder/cpu/pfcpu9_hgru_jfb.yaml", trained=True)  # shipped weights
"""
from .model_zoo import get, get_config, get_config_file, get_config_root, list_configs
from .trained import published, weights_url

__all__ = ["get", "get_config", "get_config_file", "get_config_root", "list_configs", "published", "weights_url"]

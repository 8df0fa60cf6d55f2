"""The FPN every rfpn backbone builder puts over its bottom-up network, as ``build_resnet_fpn_backbone`` does."""
from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

__all__ = ["fpn_over"]


def fpn_over(bottom_up: Backbone, cfg: CfgNode) -> FPN:
    """Detectron2's FPN (``MODEL.FPN``) with a max-pooled P6 over ``bottom_up``."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

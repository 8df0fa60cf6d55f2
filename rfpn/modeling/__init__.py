"""Detectron2 parts of rfpn; importing this module registers them."""
from .pathfinder_segmentor import FeedForwardCore, PathfinderSegmentor
from .recurrent_core import build_recurrent_dynamics
from .recurrent_mask_head import RecurrentMaskHead
from .revnet import RevNet, build_revnet_backbone, build_revnet_fpn_backbone
from .rnnpool_stem import RNNPoolStem, build_rnnpool_resnet_backbone, build_rnnpool_resnet_fpn_backbone

__all__ = [
    "FeedForwardCore",
    "PathfinderSegmentor",
    "RecurrentMaskHead",
    "RNNPoolStem",
    "RevNet",
    "build_recurrent_dynamics",
    "build_revnet_backbone",
    "build_revnet_fpn_backbone",
    "build_rnnpool_resnet_backbone",
    "build_rnnpool_resnet_fpn_backbone",
]

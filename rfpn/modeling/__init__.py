"""Detectron2 parts of rfpn; importing this module registers them."""
from .pathfinder_segmentor import FeedForwardCore, PathfinderSegmentor
from .recurrent_core import build_recurrent_dynamics
from .recurrent_mask_head import RecurrentMaskHead

__all__ = ["FeedForwardCore", "PathfinderSegmentor", "RecurrentMaskHead", "build_recurrent_dynamics"]

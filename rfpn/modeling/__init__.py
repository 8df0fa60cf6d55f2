"""Detectron2 parts of rfpn; importing this module registers them."""
from .recurrent_core import build_recurrent_dynamics

__all__ = ["build_recurrent_dynamics"]

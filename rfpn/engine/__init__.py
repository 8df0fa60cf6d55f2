"""Training entry points shared by rfpn's tasks."""
from .defaults import ResilientTrainer
from .trainer import Trainer

__all__ = ["ResilientTrainer", "Trainer"]

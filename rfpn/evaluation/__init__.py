"""Evaluators for rfpn's tasks."""
from .pathfinder_evaluation import PathfinderEvaluator, contour_counts

__all__ = ["PathfinderEvaluator", "contour_counts"]

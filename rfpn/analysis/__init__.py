"""Dynamics analysis of recurrent models: state space, per-step readouts, generalisation, flood fill.

The functions take what a model gives (per-step states or readouts, labels, masks) and return
numbers; :mod:`rfpn.analysis.figures` draws them. The CLIs are ``tools/analyze_dynamics.py``,
``tools/generalization_matrix.py``, ``tools/analyze_flood_fill.py``, ``tools/gradient_agreement.py``
and ``tools/demo.py``.
"""
from .flood_fill import (
    compare_fill_order,
    coverage,
    first_cover_step,
    flood_fill_steps,
    interior_point,
    voronoi_tessellation,
)
from .generalization import GeneralizationMatrix
from .gradient_agreement import GradientAgreement, gradient_agreement, method_gradient
from .state_space import PCA, KSResult, fit_pca, ks_test, split_densities, stack_states, state_distance
from .timecourse import StepIoU, fixed_solver, run_steps, select_steps, step_probabilities

__all__ = [
    "PCA",
    "GeneralizationMatrix",
    "GradientAgreement",
    "KSResult",
    "StepIoU",
    "compare_fill_order",
    "coverage",
    "first_cover_step",
    "fit_pca",
    "fixed_solver",
    "gradient_agreement",
    "flood_fill_steps",
    "interior_point",
    "ks_test",
    "method_gradient",
    "run_steps",
    "select_steps",
    "step_probabilities",
    "split_densities",
    "stack_states",
    "state_distance",
    "voronoi_tessellation",
]

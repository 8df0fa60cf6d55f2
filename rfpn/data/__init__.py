"""Datasets: generators, Detectron2 registration and mappers; importing registers them."""
from .panoptic_registration import CheckedDatasetMapper, register_synthetic_panoptic, validate_panoptic_dataset
from .panoptic_stuff import PanopticFormatError, convert_panoptic_to_stuff
from .pathfinder import load_pathfinder_dicts, register_all_pathfinder, register_pathfinder
from .pathfinder_generator import PathfinderSettings, generate_pathfinder, render_sample
from .pathfinder_mapper import PathfinderDatasetMapper
from .synthetic_panoptic import generate_synthetic_panoptic, synthetic_panoptic_metadata

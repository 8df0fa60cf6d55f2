"""Datasets: generators, Detectron2 registration and mappers; importing registers them."""
from .panoptic_registration import CheckedDatasetMapper, register_synthetic_panoptic, validate_panoptic_dataset
from .panoptic_stuff import PanopticFormatError, convert_panoptic_to_stuff
from .synthetic_panoptic import generate_synthetic_panoptic, synthetic_panoptic_metadata

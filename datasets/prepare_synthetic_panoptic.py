#!/usr/bin/env python
"""Write the synthetic panoptic dataset (COCO panoptic format) that rfpn trains and tests R-FPN on.

    python datasets/prepare_synthetic_panoptic.py                      # 200 train / 50 val, 128x128
    python datasets/prepare_synthetic_panoptic.py --root /data --num-train 1000 --image-size 160

Files go to <root>/<name>/ (root: $DETECTRON2_DATASETS, else ./datasets); the set is
registered as <name>_train_separated and <name>_val_separated (see datasets/README.md).
"""
import argparse
import logging

from detectron2.utils.logger import setup_logger

from rfpn.data import generate_synthetic_panoptic, register_synthetic_panoptic, validate_panoptic_dataset
from rfpn.data.synthetic_panoptic import default_datasets_root
from rfpn.utils import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help=f"datasets root (default: {default_datasets_root()})")
    parser.add_argument("--name", default="synthetic_panoptic", help="folder and dataset-name prefix")
    parser.add_argument("--num-train", type=int, default=200, help="training images")
    parser.add_argument("--num-test", type=int, default=50, help="test (val) images")
    parser.add_argument("--image-size", type=int, default=128, help="side of the square images")
    parser.add_argument("--seed", type=int, default=0, help="equal seeds give identical files")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: min(4, cpus))")
    args = parser.parse_args()

    setup_logger(name="rfpn")
    log = logging.getLogger("rfpn")
    folder = generate_synthetic_panoptic(
        args.root, args.name, args.num_train, args.num_test, args.image_size, args.seed, args.workers
    )
    for dataset in register_synthetic_panoptic(args.name, args.root):
        log.info(f"{dataset}: {validate_panoptic_dataset(dataset)}")
    log.info(f"Synthetic panoptic dataset ready in {folder}")


if __name__ == "__main__":
    run_cli(main)

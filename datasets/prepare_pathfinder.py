#!/usr/bin/env python
"""Generate a Pathfinder dataset under $DETECTRON2_DATASETS/pathfinder/<name> (see datasets/README.md).

Examples:
    python datasets/prepare_pathfinder.py --preset cpu --contour-length 9          # pathfinder_cpu9
    python datasets/prepare_pathfinder.py --preset paper --contour-length 14       # pathfinder14 (200k + 10k)
"""
from rfpn.data.pathfinder_generator import main
from rfpn.utils import run_cli

if __name__ == "__main__":
    run_cli(main)

#!/usr/bin/env python
"""Write the semantic "stuff" PNGs Panoptic FPN trains on from COCO panoptic annotations.

Each output pixel holds the contiguous stuff id of Detectron2's metadata: things 0, stuff
1..K (COCO: 53 classes), unlabeled 255. With no arguments both of Detectron2's builtin COCO
sets are converted, at the paths Detectron2 registered them with:

    python datasets/prepare_panoptic_fpn.py            # coco/panoptic_stuff_{train,val}2017/
    python datasets/prepare_panoptic_fpn.py --datasets coco_2017_val_panoptic_separated --workers 2
    python datasets/prepare_panoptic_fpn.py --panoptic-json J --panoptic-root P --output O \\
        --metadata coco_2017_val_panoptic_separated    # any COCO-format panoptic set

Paths follow $DETECTRON2_DATASETS (default ./datasets); see datasets/README.md.
"""
import argparse
import logging
from typing import List, Optional

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

from rfpn.data import convert_panoptic_to_stuff, validate_panoptic_dataset

COCO_SETS = ["coco_2017_train_panoptic_separated", "coco_2017_val_panoptic_separated"]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=COCO_SETS, help="registered '*_panoptic_separated' names")
    parser.add_argument("--panoptic-json", help="convert this panoptic JSON instead of registered sets")
    parser.add_argument("--panoptic-root", help="folder of the panoptic PNGs of --panoptic-json")
    parser.add_argument("--output", help="folder for the stuff PNGs of --panoptic-json")
    parser.add_argument("--metadata", default=COCO_SETS[1], help="dataset whose category ids to use")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: min(4, cpus))")
    parser.add_argument("--validate", action="store_true", help="check every file of the datasets afterwards")
    args = parser.parse_args(argv)

    setup_logger(name="rfpn")
    log = logging.getLogger("rfpn")
    explicit = [args.panoptic_json, args.panoptic_root, args.output]
    if any(explicit):
        if not all(explicit):
            parser.error("--panoptic-json, --panoptic-root and --output go together")
        meta = MetadataCatalog.get(args.metadata).as_dict()
        convert_panoptic_to_stuff(args.panoptic_json, args.panoptic_root, args.output, meta, args.workers)
        return
    for name in args.datasets:
        meta = MetadataCatalog.get(name)
        if meta.get("sem_seg_root") is None:
            parser.error(f"{name!r} is not a registered '*_panoptic_separated' dataset")
        convert_panoptic_to_stuff(meta.panoptic_json, meta.panoptic_root, meta.sem_seg_root, meta.as_dict(), args.workers)
        if args.validate:
            log.info(f"{name}: {validate_panoptic_dataset(name, show_progress=True)}")


if __name__ == "__main__":
    main()

"""R-FPN end to end: train 2 iterations on a tiny synthetic COCO-panoptic set, then evaluate (PQ)."""
import math

import pytest
import torch

from rfpn import model_zoo
from rfpn.data import generate_synthetic_panoptic, register_synthetic_panoptic
from rfpn.engine import Trainer
from rfpn.modeling import RecurrentMaskHead

SIZE = 64


@pytest.fixture(scope="module")
def tiny_panoptic(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    generate_synthetic_panoptic(
        str(root), "rfpn_tiny_panoptic", num_train=4, num_test=2, image_size=SIZE, seed=0, workers=1, show_progress=False
    )
    train, val = register_synthetic_panoptic("rfpn_tiny_panoptic", str(root))
    return train, val


def tiny_cfg(config: str, train: str, val: str, output_dir: str):
    """A packaged synthetic config shrunk to 64x64 images, narrow layers and 2 iterations."""
    cfg = model_zoo.get_config(config)
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN", (train,),
            "DATASETS.TEST", (val,),
            "INPUT.MIN_SIZE_TRAIN", (SIZE,),
            "INPUT.MAX_SIZE_TRAIN", SIZE,
            "INPUT.MIN_SIZE_TEST", SIZE,
            "INPUT.MAX_SIZE_TEST", SIZE,
            "MODEL.FPN.OUT_CHANNELS", 32,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
            "MODEL.RECURRENT.STEPS", 2,
            "MODEL.RECURRENT.TEST_STEPS", 4,
            "SOLVER.IMS_PER_BATCH", 2,
            "SOLVER.MAX_ITER", 2,
            "SOLVER.STEPS", (),
            "SOLVER.WARMUP_ITERS", 1,
            "DATALOADER.NUM_WORKERS", 0,
            "SEED", 0,
            "OUTPUT_DIR", output_dir,
        ]
    )
    cfg.freeze()
    return cfg


def test_two_iterations_then_panoptic_evaluation(tiny_panoptic, tmp_path):
    train, val = tiny_panoptic
    cfg = tiny_cfg("Synthetic-Panoptic/panoptic_rfpn_R_18_crbp5.yaml", train, val, str(tmp_path))
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    head = trainer.model.roi_heads.mask_head
    assert isinstance(head, RecurrentMaskHead) and head.dynamics.grad == "crbp"
    before = head.dynamics.cell.w_exc.weight.detach().clone()
    results = trainer.train()

    assert trainer.iter == cfg.SOLVER.MAX_ITER
    assert not torch.equal(before, head.dynamics.cell.w_exc.weight), "the recurrent mask head did not train"
    history = trainer.storage.histories()
    assert len(history["loss_mask"].values()) == 2 and len(history["loss_lcp"].values()) == 2
    assert (tmp_path / "model_final.pth").is_file()

    # The evaluation after the last iteration, with the Trainer's panoptic evaluators.
    panoptic = results["panoptic_seg"]
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert math.isfinite(panoptic[key]) and 0.0 <= panoptic[key] <= 100.0, key
    assert 0.0 <= results["sem_seg"]["mIoU"] <= 100.0
    assert "AP" in results["segm"] and "AP" in results["bbox"]

"""R-FPN's RecurrentMaskHead on random RoI features, inside a built Panoptic FPN, and the model zoo."""
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from rfpn import model_zoo
from rfpn.config import add_rfpn_config
from rfpn.modeling import RecurrentMaskHead

DIM = 8
NUM_CLASSES = 3


def head_cfg(grad: str = "crbp", steps: int = 3, **recurrent):
    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.ROI_MASK_HEAD.NAME = "RecurrentMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = DIM
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES
    rc = cfg.MODEL.RECURRENT
    rc.update(CELL="hgru", NORM="gn", KERNEL_SIZE=3, GRAD=grad, STEPS=steps, LCP_WEIGHT=1e-3, LCP_LAMBDA=0.9)
    rc.update(**recurrent)
    return cfg


def make_head(cfg, in_channels: int = DIM) -> RecurrentMaskHead:
    torch.manual_seed(0)
    return build_mask_head(cfg, ShapeSpec(channels=in_channels, height=14, width=14))


def train_instances(n: int, size: int = 32) -> Instances:
    g = torch.Generator().manual_seed(1)
    inst = Instances((size, size))
    xy = torch.rand(n, 2, generator=g) * size / 2
    inst.proposal_boxes = Boxes(torch.cat([xy, xy + size / 2], dim=1))
    inst.gt_classes = torch.arange(n) % NUM_CLASSES
    inst.gt_masks = BitMasks(torch.rand(n, size, size, generator=g) > 0.5)
    return inst


def pred_instances(n: int, size: int = 32) -> Instances:
    inst = Instances((size, size))
    inst.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, size / 2, size / 2]]).repeat(n, 1))
    inst.pred_classes = torch.arange(n) % NUM_CLASSES
    return inst


@pytest.mark.parametrize("grad", ["bptt", "cbptt", "rbp", "crbp"])
def test_forward_backward_every_grad_method(grad):
    cfg = head_cfg(grad, LCP_LAMBDA=0.0)  # lambda 0: the penalty is active, so loss_lcp trains the cell
    head = make_head(cfg).train()
    x = torch.rand(5, DIM, 14, 14, requires_grad=True)
    with EventStorage():
        losses = head(x, [train_instances(5)])
    lcp = grad in ("cbptt", "crbp")
    assert set(losses) == ({"loss_mask", "loss_lcp"} if lcp else {"loss_mask"})
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    cell = head.dynamics.cell
    for name in ("w_inh", "w_exc", "u2"):
        grad_w = getattr(cell, name).weight.grad
        assert grad_w is not None and grad_w.abs().sum() > 0, name
    assert head.predictor.weight.grad.abs().sum() > 0
    if lcp:
        assert losses["loss_lcp"] > 0


def test_lcp_loss_is_weighted_penalty_and_trains_the_cell():
    cfg = head_cfg("crbp", LCP_LAMBDA=0.0, LCP_WEIGHT=0.5)
    head = make_head(cfg).train()
    x = torch.rand(4, DIM, 14, 14)
    with EventStorage() as storage:
        losses = head(x, [train_instances(4)])
        penalty = storage.latest()["mask_head/lcp_penalty"][0]
    assert losses["loss_lcp"].item() == pytest.approx(0.5 * penalty, rel=1e-5)
    losses["loss_lcp"].backward()
    assert head.dynamics.cell.w_exc.weight.grad.abs().sum() > 0
    assert head.predictor.weight.grad is None or head.predictor.weight.grad.abs().sum() == 0


def test_channel_projection_when_roi_features_differ_from_conv_dim():
    head = make_head(head_cfg(), in_channels=2 * DIM).train()
    assert head.input_proj is not None
    with EventStorage():
        losses = head(torch.rand(3, 2 * DIM, 14, 14), [train_instances(3)])
    sum(losses.values()).backward()
    assert head.input_proj.weight.grad.abs().sum() > 0
    assert make_head(head_cfg()).input_proj is None


@pytest.mark.parametrize("grad", ["bptt", "crbp"])
def test_zero_instances_in_training_and_test(grad):
    head = make_head(head_cfg(grad)).train()
    empty = Instances((32, 32))
    empty.proposal_boxes = Boxes(torch.zeros(0, 4))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    empty.gt_masks = BitMasks(torch.zeros(0, 32, 32, dtype=torch.bool))
    with EventStorage():
        losses = head(torch.zeros(0, DIM, 14, 14), [empty])
    total = sum(losses.values())
    assert total.item() == 0.0
    total.backward()  # differentiable, every parameter reached (with zero gradient)
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in head.parameters())

    head.eval()
    head.timecourse = True
    with torch.no_grad():
        (out,) = head(torch.zeros(0, DIM, 14, 14), [pred_instances(0)])
    assert out.pred_masks.shape == (0, 1, 28, 28)
    assert len(out.mask_steps) == 0 and len(out.pred_mask_step_logits) == 0


def test_test_steps_beyond_training_steps_and_early_stopping():
    head = make_head(head_cfg("crbp", steps=3, TEST_STEPS=12)).eval()
    head.timecourse = True
    x = torch.rand(4, DIM, 14, 14)
    with torch.no_grad():
        a, b = head(x, [pred_instances(3), pred_instances(1)])
    assert a.mask_steps.tolist() == [12, 12, 12] and b.mask_steps.tolist() == [12]
    assert a.pred_mask_step_logits.shape == (3, 12, 28, 28)
    # The last step's logits are the ones behind pred_masks.
    assert torch.allclose(a.pred_mask_step_logits[:, -1].sigmoid(), a.pred_masks[:, 0], atol=1e-6)
    # Later steps change the masks: the timecourse is not a copy of one step.
    assert not torch.allclose(a.pred_mask_step_logits[:, 0], a.pred_mask_step_logits[:, -1])

    # Per-instance early stopping: a loose eps stops each instance before TEST_STEPS,
    # a huge eps after one step.
    head.dynamics.eps = 1e9
    with torch.no_grad():
        (c,) = head(x, [pred_instances(4)])
    assert c.mask_steps.tolist() == [1, 1, 1, 1]
    head.dynamics.eps = 1e-2
    with torch.no_grad():
        (d,) = head(x, [pred_instances(4)])
    assert (d.mask_steps < 12).all() and (d.mask_steps >= 1).all()


def test_bad_config_values_name_the_key():
    cfg = head_cfg()
    cfg.MODEL.ROI_MASK_HEAD.READOUT_NORM = "LN"
    with pytest.raises(ValueError, match=r"MODEL\.ROI_MASK_HEAD\.READOUT_NORM='LN'.*GN"):
        make_head(cfg)
    cfg = tiny_panoptic_cfg()
    cfg.MODEL.RECURRENT.GRAD = "sgd"
    with pytest.raises(ValueError, match=r"MODEL\.RECURRENT\.GRAD='sgd'.*crbp"):
        build_model(cfg)


def tiny_panoptic_cfg():
    """The synthetic R-FPN config, narrowed further so a full model runs in well under a second."""
    cfg = model_zoo.get_config("Synthetic-Panoptic/panoptic_rfpn_R_18_crbp5.yaml")
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = DIM
    cfg.MODEL.RECURRENT.STEPS = 2
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
    return cfg


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_panoptic_cfg())
    # Move the weights away from their init so the round trip is meaningful.
    with torch.no_grad():
        for p in model.roi_heads.mask_head.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")

    torch.manual_seed(1)
    fresh = build_model(tiny_panoptic_cfg())
    head_a, head_b = model.roi_heads.mask_head, fresh.roi_heads.mask_head
    assert not torch.equal(head_a.dynamics.cell.w_inh.weight, head_b.dynamics.cell.w_inh.weight)
    DetectionCheckpointer(fresh).load(str(tmp_path / "model.pth"))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name

    model.eval()
    fresh.eval()
    x = torch.rand(6, 32, 14, 14)  # FPN channels of tiny_panoptic_cfg
    inst = pred_instances(6)
    inst_b = pred_instances(6)
    with torch.no_grad():
        (out_a,) = head_a(x, [inst])
        (out_b,) = head_b(x, [inst_b])
        image = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
        full_a = model([{"image": image}])
        full_b = fresh([{"image": image}])
    assert torch.equal(out_a.pred_masks, out_b.pred_masks)
    assert torch.equal(full_a[0]["sem_seg"], full_b[0]["sem_seg"])


def test_model_zoo_lookups():
    names = model_zoo.list_configs()
    for variant in ("bptt1", "bptt2", "bptt3", "bptt5", "rbp20", "crbp5", "crbp10", "crbp20"):
        assert f"COCO-PanopticSegmentation/panoptic_rfpn_R_50_{variant}_1x.yaml" in names
    cfg = model_zoo.get_config("COCO-PanopticSegmentation/panoptic_rfpn_R_50_crbp20_1x.yaml")
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "RecurrentMaskHead"
    assert (cfg.MODEL.RECURRENT.GRAD, cfg.MODEL.RECURRENT.STEPS) == ("crbp", 20)
    assert (cfg.MODEL.RECURRENT.KERNEL_SIZE, cfg.MODEL.RECURRENT.NORM) == (3, "gn")
    assert cfg.MODEL.RECURRENT.LCP_WEIGHT == pytest.approx(1e-3)
    assert cfg.MODEL.META_ARCHITECTURE == "PanopticFPN"
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    r101 = model_zoo.get_config("COCO-PanopticSegmentation/panoptic_rfpn_R_101_crbp20_3x.yaml")
    assert r101.MODEL.RESNETS.DEPTH == 101
    baseline = model_zoo.get_config("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml")
    assert baseline.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
    with pytest.raises(RuntimeError, match="panoptic_rfpn_R_50_crbp20_1x.yaml"):
        model_zoo.get_config_file("COCO-PanopticSegmentation/panoptic_rfpn_R_50_crbp99_1x.yaml")
    with pytest.raises(RuntimeError, match="No trained checkpoint"):
        model_zoo.get_config("COCO-PanopticSegmentation/panoptic_rfpn_R_50_crbp20_1x.yaml", trained=True)

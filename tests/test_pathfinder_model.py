"""PathfinderSegmentor, its input filters, the feed-forward control and the PathfinderEvaluator."""
import math

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from rfpn.config import add_rfpn_config
from rfpn.evaluation import PathfinderEvaluator, contour_counts
from rfpn.modeling.input_filters import gabor_dog_bank
from rfpn.modeling.pathfinder_segmentor import pixel_loss


def _cfg(**overrides):
    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "PathfinderSegmentor"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RECURRENT.CHANNELS = 8
    cfg.MODEL.RECURRENT.KERNEL_SIZE = 5
    cfg.MODEL.RECURRENT.STEPS = 3
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def _batch(n=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.zeros(size, size, dtype=torch.long)
        row = int(torch.randint(2, size - 2, (1,), generator=g))
        label[row, 2:-2] = 1
        image = (label * 255).float()[None] + torch.rand(1, size, size, generator=g) * 20
        out.append({"image": image, "sem_seg": label, "height": size, "width": size})
    return out


def test_gabor_dog_bank_is_zero_mean_unit_norm_and_oriented():
    bank = gabor_dog_bank(9, 7)
    assert bank.shape == (9, 1, 7, 7)
    flat = bank.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(9), atol=1e-6)
    assert torch.allclose(flat.norm(dim=1), torch.ones(9), atol=1e-5)
    # Even-phase Gabors at 0 and 90 degrees are transposes of each other; the DoG is symmetric.
    assert torch.allclose(bank[0, 0], bank[4, 0].T, atol=1e-5)
    assert torch.allclose(bank[-1, 0], bank[-1, 0].T, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        gabor_dog_bank(1, 7)


@pytest.mark.parametrize("grad", ["bptt", "cbptt", "rbp", "crbp"])
def test_training_losses_and_logging(grad):
    torch.manual_seed(0)
    model = build_model(_cfg(**{"MODEL.RECURRENT.GRAD": grad}))
    with EventStorage() as storage:
        losses = model(_batch())
        sum(losses.values()).backward()
        logged = storage.histories()
    expected = {"loss_sem_seg", "loss_lcp"} if grad in ("cbptt", "crbp") else {"loss_sem_seg"}
    assert set(losses) == expected
    assert {"recurrent/residual", "recurrent/relative_residual", "recurrent/steps"} <= set(logged)
    assert logged["recurrent/steps"].latest() == model.core.steps
    assert ("recurrent/lcp_penalty" in logged) == (grad in ("cbptt", "crbp"))
    assert ("recurrent/neumann_terms" in logged) == (grad in ("rbp", "crbp"))
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.input_conv.weight.grad is not None and model.input_conv.weight.grad.abs().sum() > 0
    cell_grads = [p.grad for p in model.core.parameters() if p.grad is not None]
    assert cell_grads and sum(float(g.abs().sum()) for g in cell_grads) > 0


def test_readout_bias_starts_at_foreground_prior_and_inference_format():
    model = build_model(_cfg(**{"MODEL.PATHFINDER.RETURN_STEPS": True, "MODEL.RECURRENT.TEST_STEPS": 5}))
    bias = model.readout[1].bias.detach()
    assert math.isclose(float(torch.sigmoid(bias[1] - bias[0])), 0.01, rel_tol=1e-4)
    model.eval()
    with torch.no_grad():
        out = model(_batch(3))
    assert len(out) == 3
    assert out[0]["sem_seg"].shape == (2, 16, 16)
    assert torch.allclose(out[0]["sem_seg"].sum(0), torch.ones(16, 16), atol=1e-5)
    assert out[0]["sem_seg_steps"].shape == (5, 2, 16, 16)
    assert torch.allclose(out[0]["sem_seg_steps"][-1], out[0]["sem_seg"], atol=1e-5)


def test_convlstm_core_trains():
    model = build_model(_cfg(**{"MODEL.RECURRENT.CELL": "convlstm", "MODEL.RECURRENT.GRAD": "crbp"}))
    losses = model(_batch())
    sum(losses.values()).backward()
    assert model.core.cell.gates.weight.grad.abs().sum() > 0


def test_feedforward_control_has_about_three_times_the_hgru_weights():
    recurrent = build_model(_cfg(**{"MODEL.RECURRENT.NORM": "none"}))
    ff = build_model(_cfg(**{"MODEL.PATHFINDER.CORE": "feedforward", "MODEL.RECURRENT.NORM": "none"}))
    n_rec = sum(p.numel() for p in recurrent.core.parameters())
    n_ff = sum(p.numel() for p in ff.core.parameters())
    assert 2.5 < n_ff / n_rec < 3.5
    assert set(ff(_batch())) == {"loss_sem_seg"}
    ff.eval()
    ff.return_steps = True
    with torch.no_grad():
        assert ff(_batch(1))[0]["sem_seg_steps"].shape[0] == 6


def test_bad_inputs_and_config_raise_clear_errors():
    model = build_model(_cfg())
    bad = _batch(1)
    bad[0]["image"] = bad[0]["image"].expand(3, -1, -1)
    with pytest.raises(ValueError, match="grayscale"):
        model(bad)
    with pytest.raises(ValueError, match="MODEL.PATHFINDER.CORE"):
        build_model(_cfg(**{"MODEL.PATHFINDER.CORE": "transformer"}))
    with pytest.raises(ValueError, match="MODEL.PATHFINDER.LOSS"):
        build_model(_cfg(**{"MODEL.PATHFINDER.LOSS": "dice"}))


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0]], [[1.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 255]]])
    p = math.exp(1) / (1 + math.exp(1))  # probability of class 1 at the first pixel
    ce = -math.log(p)
    assert math.isclose(float(pixel_loss(logits, target, "ce")), ce, rel_tol=1e-5)
    assert math.isclose(float(pixel_loss(logits, target, "focal", gamma=2.0)), (1 - p) ** 2 * ce, rel_tol=1e-5)
    assert math.isclose(float(pixel_loss(logits, target, "ce", fg_weight=3.0)), 3 * ce, rel_tol=1e-5)


def _scores(pred: torch.Tensor) -> torch.Tensor:
    return torch.stack([1.0 - pred.float(), pred.float()])


def test_evaluator_pools_counts_over_images():
    gt1 = torch.tensor([[1, 1, 0], [0, 0, 0]])
    pr1 = torch.tensor([[1, 0, 1], [0, 0, 0]])  # I=1, U=3
    gt2 = torch.tensor([[0, 1, 255], [1, 1, 0]])
    pr2 = torch.tensor([[0, 1, 1], [1, 1, 1]])  # ignored pixel skipped: I=3, U=4
    assert contour_counts(pr1, gt1).tolist() == [1, 3, 4, 6]
    ev = PathfinderEvaluator("toy", distributed=False)
    ev.reset()
    ev.process([{"sem_seg": gt1}, {"sem_seg": gt2}], [{"sem_seg": _scores(pr1)}, {"sem_seg": _scores(pr2)}])
    res = ev.evaluate()["pathfinder"]
    assert res["IoU"] == pytest.approx(4 / 7)  # pooled, not the mean of 1/3 and 3/4
    assert res["pixel_acc"] == pytest.approx(8 / 11)  # correct pixels 4 + 4 of 6 + 5 valid
    # Background: both-0 pixels 3 + 1 = 4; pixels either calls background: 5 + 2 = 7.
    assert res["IoU_background"] == pytest.approx(4 / 7)
    assert res["num_images"] == 2


def test_evaluator_per_step_iou():
    gt = torch.tensor([[1, 1, 1, 0]])
    steps = torch.stack([_scores(torch.tensor([[1, 0, 0, 0]])), _scores(torch.tensor([[1, 1, 0, 0]])), _scores(gt)])
    ev = PathfinderEvaluator(distributed=False)
    ev.process([{"sem_seg": gt}], [{"sem_seg": steps[-1], "sem_seg_steps": steps}])
    res = ev.evaluate()["pathfinder"]
    assert [res[f"IoU@step{t}"] for t in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert res["IoU"] == 1.0
    with pytest.raises(KeyError, match="sem_seg"):
        ev.process([{"file_name": "x.png"}], [{"sem_seg": steps[-1]}])


def test_evaluator_matches_random_counts():
    rng = np.random.default_rng(0)
    ev = PathfinderEvaluator(distributed=False)
    inter = union = 0
    for _ in range(4):
        gt = torch.from_numpy(rng.integers(0, 2, (8, 8)))
        pr = torch.from_numpy(rng.integers(0, 2, (8, 8)))
        inter += int(((gt == 1) & (pr == 1)).sum())
        union += int(((gt == 1) | (pr == 1)).sum())
        ev.process([{"sem_seg": gt}], [{"sem_seg": _scores(pr)}])
    assert ev.evaluate()["pathfinder"]["IoU"] == pytest.approx(inter / union)


def test_batched_contour_counts_agree_with_the_evaluator_and_pool_by_hand():
    from rfpn.evaluation.pathfinder_evaluation import batched_contour_counts, contour_counts, pooled_iou

    torch.manual_seed(0)
    logits = torch.randn(3, 2, 2, 5, 5)  # (steps, batch, classes, H, W)
    labels = torch.randint(0, 2, (2, 5, 5))
    labels[0, 0, :] = 255
    counts = batched_contour_counts(logits, labels)
    assert counts.shape == (3, 2, 2)
    for t in range(3):
        for b in range(2):
            assert counts[t, b].tolist() == contour_counts(logits[t, b].argmax(0), labels[b])[:2].tolist()
    assert pooled_iou(np.array([[1, 4], [3, 4]])) == 0.5 and np.isnan(pooled_iou(np.zeros((2, 2))))

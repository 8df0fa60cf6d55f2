"""RevNet backbone: the memory-free stages train exactly like the same network with ordinary autograd."""
from __future__ import annotations

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from rfpn.config import add_rfpn_config
from rfpn.modeling.revnet import build_revnet_backbone
from rfpn.recurrent import saved_tensor_bytes


def _cfg(**revnet):
    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.REVNET.update(STEM_OUT_CHANNELS=8, OUT_CHANNELS=[8, 16, 16, 16], UNITS=[2, 3, 2, 2], NORM="GN")
    cfg.MODEL.REVNET.update(**revnet)
    return cfg


def _pair(**revnet):
    torch.manual_seed(0)
    reversible = build_revnet_backbone(_cfg(REVERSIBLE=True, **revnet), ShapeSpec(channels=3)).double()
    plain = build_revnet_backbone(_cfg(REVERSIBLE=False, **revnet), ShapeSpec(channels=3)).double()
    plain.load_state_dict(reversible.state_dict())
    return reversible, plain


def _train_step(model, x, weights):
    x = x.clone().requires_grad_()
    out = model(x)
    sum((out[k] * weights[k]).sum() for k in out).backward()
    return [x.grad] + [p.grad for p in model.parameters()], out


@pytest.mark.parametrize("norm,block", [("GN", "basic"), ("BN", "basic"), ("BN", "bottleneck")])
def test_reversible_stages_give_the_gradients_and_statistics_of_ordinary_autograd(norm, block):
    kwargs = {"NORM": norm, "BLOCK": block}
    if block == "bottleneck":
        kwargs["OUT_CHANNELS"] = [16, 16, 32, 32]
    reversible, plain = _pair(**kwargs)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    weights = {k: torch.randn(2, s.channels, 32 // s.stride, 32 // s.stride, dtype=torch.float64)
               for k, s in plain.output_shape().items()}
    grads_rev, out_rev = _train_step(reversible, x, weights)
    grads_plain, out_plain = _train_step(plain, x, weights)
    for k in out_plain:
        assert torch.allclose(out_rev[k], out_plain[k], rtol=0, atol=1e-12)
    for r, p in zip(grads_rev, grads_plain):
        assert torch.allclose(r, p, rtol=1e-8, atol=1e-10)
    buffers = dict(plain.named_buffers())
    for name, value in reversible.named_buffers():
        assert torch.equal(value, buffers[name]), f"{name}: recomputation changed the running statistics"
    if norm == "BN":
        assert int(buffers["stages.1.units.0.coupling.f.0.num_batches_tracked"]) == 1


def test_saved_bytes_do_not_grow_with_the_units_per_stage():
    saved = {}
    for reversible in (True, False):
        for units in (2, 6):
            torch.manual_seed(0)
            model = build_revnet_backbone(_cfg(UNITS=[2, units, 2, 2], REVERSIBLE=reversible), ShapeSpec(channels=3))
            with saved_tensor_bytes() as counter:
                sum(v.sum() for v in model(torch.randn(2, 3, 32, 32)).values()).backward()
            saved[reversible, units] = counter.peak_bytes
    assert saved[True, 2] == saved[True, 6]
    assert saved[False, 6] > saved[False, 2] > saved[True, 2]


def test_the_fpn_builder_is_registered_and_keeps_resnet_strides():
    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "build_revnet_fpn_backbone"
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = build_backbone(cfg)
    out = backbone(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[-1] for k, v in out.items()} == {"p2": 16, "p3": 8, "p4": 4, "p5": 2, "p6": 1}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"BLOCK": "wide"}, "MODEL.REVNET.BLOCK='wide' is not valid; allowed values: basic, bottleneck"),
        ({"OUT_CHANNELS": [8, 16, 15, 16]}, r"MODEL.REVNET.OUT_CHANNELS=\[8, 16, 15, 16\] is not valid; allowed values: 4"),
        ({"BLOCK": "bottleneck"}, r"each a multiple of 8"),
        ({"UNITS": [2, 0, 2, 2]}, r"MODEL.REVNET.UNITS=\[2, 0, 2, 2\] is not valid; allowed values: 4 integers >= 1"),
        ({"STEM_OUT_CHANNELS": 7}, "MODEL.REVNET.STEM_OUT_CHANNELS=7 is not valid"),
    ],
)
def test_bad_revnet_keys_name_the_key(overrides, message):
    if overrides.get("BLOCK") == "bottleneck":
        overrides["OUT_CHANNELS"] = [8, 16, 20, 16]
    with pytest.raises(ValueError, match=message):
        build_revnet_backbone(_cfg(**overrides), ShapeSpec(channels=3))


def test_backbone_benchmark_measures_what_the_revnet_keeps_for_backward():
    from rfpn.benchmarks.backbone_memory import compare, format_table, measure

    rows = [measure(name, batch=1, size=64, repeats=1) for name in ("RevNet-18", "ResNet-18")]
    rev, res = rows
    assert rev["parameters"] == 2_848_128 and res["parameters"] == 11_176_512
    assert 0 < rev["saved_bytes"] < rev["peak_saved_bytes"], "backward's recomputation holds more than the forward kept"
    assert res["saved_bytes"] == res["peak_saved_bytes"] > 10 * rev["saved_bytes"]
    (ratio,) = compare(rows)
    assert ratio["pair"] == "RevNet-18 / ResNet-18" and ratio["saved_bytes"] == rev["saved_bytes"] / res["saved_bytes"]
    assert "| RevNet-18 | 2.8M |" in format_table(rows, [ratio])

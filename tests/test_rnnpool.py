"""RNNPool: the batched layer equals a loop over patches written from the equations; streaming equals batched;
the Detectron2 stem keeps the ResNet stem's strides and channels and trains inside Panoptic FPN."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from rfpn.config import add_rfpn_config
from rfpn.data import generate_synthetic_panoptic, register_synthetic_panoptic
from rfpn.engine import Trainer
from rfpn.layers import RNNPool
from rfpn.modeling import RNNPoolStem
from rfpn.modeling.rnnpool_stem import build_rnnpool_resnet_backbone, is_detectron2_norm

from test_rfpn_training import SIZE, tiny_cfg


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Parameters away from their initial values (zeta, nu, biases included) so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _fastgrnn_equations(cell):
    def step(x, h):
        z = torch.sigmoid(cell.weight_ih @ x + cell.weight_hh @ h + cell.bias_gate)
        candidate = torch.tanh(cell.weight_ih @ x + cell.weight_hh @ h + cell.bias_update)
        return (torch.sigmoid(cell.zeta) * (1 - z) + torch.sigmoid(cell.nu)) * candidate + z * h

    return step


def _torch_gru(cell):
    return lambda x, h: nn.GRUCell.forward(cell, x[None], h[None])[0]


def _loop_reference(layer: RNNPool, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """RNNPool from the seed's description, one patch, row and column at a time (pad: left, right, top, bottom)."""
    step1, step2 = ((_fastgrnn_equations(layer.rnn1), _fastgrnn_equations(layer.rnn2)) if layer.cell == "fastgrnn"
                    else (_torch_gru(layer.rnn1), _torch_gru(layer.rnn2)))
    left, right, top, bottom = pad
    b, c, h, w = x.shape
    padded = x.new_zeros(b, c, h + top + bottom, w + left + right)
    padded[:, :, top:top + h, left:left + w] = x
    (kh, kw), (sh, sw) = layer.patch_size, layer.stride
    oh, ow = (padded.shape[2] - kh) // sh + 1, (padded.shape[3] - kw) // sw + 1
    out = x.new_zeros(b, 4 * layer.hidden2, oh, ow)
    for n in range(b):
        for i in range(oh):
            for j in range(ow):
                patch = padded[n, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                row_summaries, col_summaries = [], []
                for r in range(kh):
                    state = x.new_zeros(layer.hidden1)
                    for col in range(kw):
                        state = step1(patch[:, r, col], state)
                    row_summaries.append(state)
                for col in range(kw):
                    state = x.new_zeros(layer.hidden1)
                    for r in range(kh):
                        state = step1(patch[:, r, col], state)
                    col_summaries.append(state)
                finals = []
                for sequence in (row_summaries, row_summaries[::-1], col_summaries, col_summaries[::-1]):
                    state = x.new_zeros(layer.hidden2)
                    for summary in sequence:
                        state = step2(summary, state)
                    finals.append(state)
                out[n, :, i, j] = torch.cat(finals)
    return out


# (patch, stride, padding, expected (left, right, top, bottom) padding, expected output size) on a 7x6 input
GEOMETRIES = [
    ((3, 4), (2, 1), "same", (1, 2, 1, 1), (4, 6)),
    ((2, 2), 2, 0, (0, 0, 0, 0), (3, 3)),
    ((3, 2), (1, 2), (1, 0), (0, 0, 1, 1), (7, 3)),
]


@pytest.mark.parametrize("cell", ["fastgrnn", "gru"])
@pytest.mark.parametrize("patch,stride,padding,pad,size", GEOMETRIES)
def test_batched_layer_equals_a_loop_over_patches_rows_and_columns(cell, patch, stride, padding, pad, size):
    torch.manual_seed(0)
    layer = _randomize(RNNPool(3, patch, stride, hidden1=4, hidden2=3, cell=cell, padding=padding).double())
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 12, *size)
    assert torch.allclose(out, _loop_reference(layer, x, pad), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rows,cols", [(1, None), (1, 1), (2, 3), (100, None)])
def test_streaming_equals_batched(rows, cols):
    torch.manual_seed(0)
    layer = _randomize(RNNPool(2, (3, 5), (2, 3), hidden1=5, hidden2=2, padding="same").double())
    x = torch.randn(2, 2, 9, 13, dtype=torch.float64)
    assert torch.allclose(layer.stream(x, rows=rows, cols=cols), layer(x), rtol=0, atol=1e-12)


def test_non_square_patches_treat_rows_and_columns_alike():
    """Transposing the image, the patch and the stride swaps the row and column halves of the output."""
    torch.manual_seed(0)
    layer = _randomize(RNNPool(2, (2, 4), (1, 3), hidden1=3, hidden2=2, padding="same").double())
    transposed = RNNPool(2, (4, 2), (3, 1), hidden1=3, hidden2=2, padding="same").double()
    transposed.load_state_dict(layer.state_dict())
    x = torch.randn(1, 2, 6, 11, dtype=torch.float64)
    out = layer(x)
    rows_fwd, rows_bwd, cols_fwd, cols_bwd = transposed(x.transpose(2, 3)).transpose(2, 3).chunk(4, dim=1)
    assert torch.allclose(out, torch.cat([cols_fwd, cols_bwd, rows_fwd, rows_bwd], dim=1), rtol=0, atol=1e-12)
    assert not torch.allclose(out, transposed(x.transpose(2, 3)).transpose(2, 3))


class _Streamed(nn.Module):
    def __init__(self, layer: RNNPool):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.stream(x)


@pytest.mark.parametrize("cell", ["fastgrnn", "gru"])
def test_gradients_pass_gradcheck(cell):
    torch.manual_seed(0)
    layer = _randomize(RNNPool(2, (2, 3), (1, 2), hidden1=2, hidden2=2, cell=cell, padding="same").double())
    streamed = _Streamed(layer)
    names = [n for n, _ in streamed.named_parameters()]
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in streamed.parameters()]
    for module in (layer, streamed):
        prefix = "layer." if module is streamed else ""

        def run(x, *values, module=module, prefix=prefix):
            return torch.func.functional_call(module, {prefix + n.removeprefix("layer."): v for n, v in zip(names, values)}, (x,))

        assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-8)


def test_every_parameter_trains_and_any_dtype_works():
    torch.manual_seed(0)
    layer = RNNPool(3, 4, 4, hidden1=4, hidden2=2, padding="same")
    layer(torch.randn(2, 3, 8, 8)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    half = layer.to(torch.bfloat16)
    assert half.stream(torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"stride": 0}, r"stride=0 is not valid; allowed values: an integer >= 1"),
        ({"hidden1": 0}, r"hidden1=0 is not valid; allowed values: an integer >= 1"),
        ({"hidden2": 0}, r"hidden2=0 is not valid"),
        ({"cell": "lstm"}, r"cell='lstm' is not valid; allowed values: fastgrnn, gru"),
        ({"padding": "valid"}, r"padding='valid' is not valid; allowed values: \"same\""),
        ({"patch_size": (2, 0)}, r"patch_size=\(2, 0\) is not valid"),
    ],
)
def test_bad_layer_arguments_name_the_argument(kwargs, message):
    args = {"in_channels": 3, "patch_size": 2, "stride": 2, "hidden1": 2, "hidden2": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        RNNPool(**args)


def test_a_patch_larger_than_the_image_is_an_error_naming_patch_size():
    layer = RNNPool(3, 8, 4, hidden1=2, hidden2=2)
    with pytest.raises(ValueError, match=r"patch_size=\(8, 8\) is not valid; allowed values: sides at most .* \(6x9\)"):
        layer(torch.randn(1, 3, 6, 9))
    with pytest.raises(ValueError, match="patch_size"):
        layer.stream(torch.randn(1, 3, 6, 9))


def _cfg(**rnnpool):
    cfg = get_cfg()
    add_rfpn_config(cfg)
    cfg.MODEL.RESNETS.update(DEPTH=18, RES2_OUT_CHANNELS=64, STEM_OUT_CHANNELS=64, NORM="GN",
                             OUT_FEATURES=["res2", "res3", "res4", "res5"])
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RNNPOOL.update(HIDDEN1=4, HIDDEN2=16)
    cfg.MODEL.RNNPOOL.update(**rnnpool)
    return cfg


def test_the_stem_keeps_the_resnet_strides_channels_and_output_sizes():
    cfg = _cfg()
    resnet = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    rnnpool = build_rnnpool_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(rnnpool.stem, RNNPoolStem) and rnnpool.output_shape() == resnet.output_shape()
    assert (rnnpool.stem.out_channels, rnnpool.stem.stride) == (resnet.stem.out_channels, resnet.stem.stride)
    with torch.no_grad():
        x = torch.randn(1, 3, 37, 50)
        assert rnnpool.stem(x).shape == resnet.stem(x).shape == (1, 64, 10, 13)
    eight = build_rnnpool_resnet_backbone(_cfg(STRIDE=8), ShapeSpec(channels=3))
    assert {k: s.stride for k, s in eight.output_shape().items()} == {"res2": 8, "res3": 16, "res4": 32, "res5": 64}


def test_the_stem_streams_at_inference_with_the_training_result():
    torch.manual_seed(0)
    stem = build_rnnpool_resnet_backbone(_cfg(STREAM_ROWS=2), ShapeSpec(channels=3)).stem.double()
    x = torch.randn(1, 3, 24, 20, dtype=torch.float64)
    calls = []
    stem.pool.stream = lambda *a, original=stem.pool.stream, **k: calls.append(k) or original(*a, **k)
    trained = stem(x)
    with torch.no_grad():
        streamed = stem(x)
    assert calls == [{"rows": 2}]
    assert torch.allclose(streamed, trained, rtol=0, atol=1e-12)


def test_the_stem_norm_is_group_norm_then_relu_of_the_pooled_map():
    torch.manual_seed(0)
    stem = build_rnnpool_resnet_backbone(_cfg(NORM="GN"), ShapeSpec(channels=3)).stem.double()
    with torch.no_grad():
        stem.norm.weight.uniform_(0.5, 1.5)
        stem.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 24, 20, dtype=torch.float64)
    pooled = stem.pool(x)
    groups = pooled.reshape(2, 32, -1)
    normed = ((groups - groups.mean(-1, keepdim=True)) / (groups.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt())
    expected = (normed.reshape_as(pooled) * stem.norm.weight[:, None, None] + stem.norm.bias[:, None, None]).clamp(min=0)
    assert torch.allclose(stem(x), expected, rtol=0, atol=1e-10)
    with torch.no_grad():
        assert torch.allclose(stem(x), expected, rtol=0, atol=1e-10)
        stem.stream_rows = 0
        assert torch.allclose(stem(x), expected, rtol=0, atol=1e-10)
    assert build_rnnpool_resnet_backbone(_cfg(), ShapeSpec(channels=3)).stem.norm is None


def test_the_fpn_builder_is_registered():
    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "build_rnnpool_resnet_fpn_backbone"
    cfg.MODEL.FPN.update(OUT_CHANNELS=8, IN_FEATURES=["res2", "res3", "res4", "res5"])
    with torch.no_grad():
        out = build_backbone(cfg)(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[-1] for k, v in out.items()} == {"p2": 16, "p3": 8, "p4": 4, "p5": 2, "p6": 1}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"PATCH_SIZE": [8, 900]}, r"MODEL.RNNPOOL.PATCH_SIZE=\[8, 900\] is not valid; allowed values: .*at most the "
                                   r"shortest image side \(800"),
        ({"STRIDE": 0}, r"MODEL.RNNPOOL.STRIDE=0 is not valid; allowed values: a power of two"),
        ({"STRIDE": 16}, r"MODEL.RNNPOOL.STRIDE=16 is not valid; .*at most the smaller patch side"),
        ({"HIDDEN1": 0}, r"MODEL.RNNPOOL.HIDDEN1=0 is not valid; allowed values: an integer >= 1"),
        ({"HIDDEN2": 0}, r"MODEL.RNNPOOL.HIDDEN2=0 is not valid; allowed values: MODEL.RESNETS.STEM_OUT_CHANNELS / 4 = 16"),
        ({"HIDDEN2": 8}, r"MODEL.RNNPOOL.HIDDEN2=8 is not valid"),
        ({"CELL": "lstm"}, r"MODEL.RNNPOOL.CELL='lstm' is not valid; allowed values: fastgrnn, gru"),
        ({"STREAM_ROWS": -1}, r"MODEL.RNNPOOL.STREAM_ROWS=-1 is not valid"),
        ({"NORM": "batchnorm"}, r"MODEL.RNNPOOL.NORM='batchnorm' is not valid; allowed values: '' \(none\) or .*get_norm.*'GN'"),
    ],
)
def test_bad_rnnpool_keys_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_rnnpool_resnet_backbone(_cfg(**overrides), ShapeSpec(channels=3))


def test_norm_names_are_the_ones_detectron2_accepts():
    assert all(is_detectron2_norm(n) for n in ("", "BN", "FrozenBN", "GN", "LN", "SyncBN", "naiveSyncBN"))
    assert not any(is_detectron2_norm(n) for n in ("batchnorm", "gn", None, 0))


@pytest.fixture(scope="module")
def tiny_panoptic(tmp_path_factory):
    root = tmp_path_factory.mktemp("panoptic")
    generate_synthetic_panoptic(str(root), "rfpn_tiny_rnnpool", num_train=4, num_test=2, image_size=SIZE, seed=0,
                                workers=1, show_progress=False)
    return register_synthetic_panoptic("rfpn_tiny_rnnpool", str(root))


@pytest.mark.parametrize("config", ["Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool.yaml",
                                    "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool_gru.yaml",
                                    "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool_gru_gn.yaml",
                                    "Synthetic-Panoptic/panoptic_fpn_R_18_rnnpool_gru_gn_h32.yaml",
                                    "Synthetic-Panoptic/panoptic_rfpn_R_18_rnnpool_crbp20.yaml"])
def test_the_stem_trains_two_iterations_inside_panoptic_fpn(tiny_panoptic, tmp_path, config):
    train, val = tiny_panoptic
    cfg = tiny_cfg(config, train, val, str(tmp_path)).clone()
    cfg.defrost()
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATASETS.TEST = ()
    cfg.freeze()
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    stem = trainer.model.backbone.bottom_up.stem
    assert isinstance(stem, RNNPoolStem)
    assert stem.pool.cell == cfg.MODEL.RNNPOOL.CELL
    before = {n: p.detach().clone() for n, p in stem.named_parameters()}
    trainer.train()
    assert trainer.iter == 2
    assert all(not torch.equal(before[n], p) for n, p in stem.named_parameters()), "the RNNPool stem did not train"
    assert torch.isfinite(torch.tensor(trainer.storage.histories()["total_loss"].values()[-1][0]))

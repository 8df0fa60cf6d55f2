"""A ResNet whose stem is RNNPool (seed 004), for Detectron2: ``MODEL.BACKBONE.NAME: build_rnnpool_resnet_fpn_backbone``.

Detectron2's ResNet stem (7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max pool) reduces the
image 4x; at 800x1333 its conv output (64 x 400 x 667) is the largest activation of the network.
:class:`RNNPoolStem` replaces it with one :class:`~rfpn.layers.RNNPool` on the image
(``"same"`` padding: ``ceil(H / STRIDE)`` like the ResNet stem's ``ceil(H / 4)``) whose
``4 * HIDDEN2`` channels are the ResNet's ``STEM_OUT_CHANNELS``, so every stage after it is
Detectron2's own (``build_resnet_backbone``, ``MODEL.RESNETS``). Training runs the batched
path; inference without gradients streams ``STREAM_ROWS`` rows of patches at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from detectron2.config import CfgNode
from detectron2.layers import CNNBlockBase, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.backbone.resnet import ResNet, build_resnet_backbone

from rfpn.config import check_keys
from rfpn.layers import CELLS, RNNPool

from .fpn import fpn_over

__all__ = ["RNNPoolStem", "build_rnnpool_resnet_backbone", "build_rnnpool_resnet_fpn_backbone", "is_detectron2_norm", "validate_rnnpool_config"]


def is_detectron2_norm(name: object) -> bool:
    """Whether ``detectron2.layers.get_norm`` accepts ``name`` ("" is none); asks it rather than copying its table."""
    if not isinstance(name, str):
        return False
    try:
        get_norm(name, 32)
    except KeyError:
        return False
    return True


class RNNPoolStem(CNNBlockBase):
    """RNNPool on the image with ``"same"`` padding; ``out_channels = 4 * hidden2``, ``stride`` as Detectron2's stems have.

    With a ``norm`` the pooled map goes through that norm and a ReLU, as the ResNet stem's conv output does.
    """

    def __init__(self, in_channels: int, patch_size: tuple[int, int], stride: int, hidden1: int, hidden2: int,
                 cell: str, stream_rows: int, norm: str = ""):
        super().__init__(in_channels, 4 * hidden2, stride)
        self.pool = RNNPool(in_channels, patch_size, stride, hidden1, hidden2, cell=cell, padding="same")
        self.norm = get_norm(norm, 4 * hidden2) if norm else None
        self.stream_rows = stream_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stream_rows and not torch.is_grad_enabled():
            y = self.pool.stream(x, rows=self.stream_rows)
            if isinstance(self.norm, torch.nn.GroupNorm):
                return F.relu_(group_norm_(y, self.norm))
        else:
            y = self.pool(x)
        if self.norm is None:
            return y
        return F.relu_(self.norm(y))


def group_norm_(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """``norm(x)`` computed in ``x`` itself (no gradients), so the streaming stem's peak holds one output map."""
    groups = x.view(x.shape[0], norm.num_groups, -1)
    var, mean = torch.var_mean(groups, dim=-1, unbiased=False, keepdim=True)
    groups.sub_(mean).mul_(torch.rsqrt(var.add_(norm.eps)))
    if norm.affine:
        x.mul_(norm.weight.view(1, -1, 1, 1)).add_(norm.bias.view(1, -1, 1, 1))
    return x


def _smallest_input_side(cfg: CfgNode) -> int | None:
    sizes = [s for s in (*cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST) if s > 0]
    return min(sizes) if sizes else None


def validate_rnnpool_config(cfg: CfgNode) -> None:
    """Raise ``ValueError`` naming the ``MODEL.RNNPOOL`` key and its allowed values for a bad setting."""
    rc = cfg.MODEL.RNNPOOL
    side = _smallest_input_side(cfg)
    patch_ok = len(rc.PATCH_SIZE) == 2 and all(isinstance(k, int) and 1 <= k <= (side or k) for k in rc.PATCH_SIZE)
    bound = f" and at most the shortest image side ({side}, INPUT.MIN_SIZE_TRAIN / MIN_SIZE_TEST)" if side else ""
    stride_ok = isinstance(rc.STRIDE, int) and rc.STRIDE >= 1 and rc.STRIDE & (rc.STRIDE - 1) == 0
    stem_channels = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS
    checks = {
        "PATCH_SIZE": (patch_ok, f"[rows, cols], integers >= 1{bound}"),
        "STRIDE": (stride_ok and (not patch_ok or rc.STRIDE <= min(rc.PATCH_SIZE)),
                   "a power of two >= 1 and at most the smaller patch side (4 keeps the ResNet stem's output stride)"),
        "HIDDEN1": (isinstance(rc.HIDDEN1, int) and rc.HIDDEN1 >= 1, "an integer >= 1"),
        "HIDDEN2": (isinstance(rc.HIDDEN2, int) and rc.HIDDEN2 >= 1 and 4 * rc.HIDDEN2 == stem_channels,
                    f"MODEL.RESNETS.STEM_OUT_CHANNELS / 4 = {stem_channels / 4:g} (the stem outputs 4 x HIDDEN2 channels)"),
        "CELL": (rc.CELL in CELLS, ", ".join(CELLS)),
        "STREAM_ROWS": (isinstance(rc.STREAM_ROWS, int) and rc.STREAM_ROWS >= 0, "an integer >= 0 (0: never stream)"),
        "NORM": (is_detectron2_norm(rc.NORM), "'' (none) or a name detectron2.layers.get_norm accepts: 'BN', 'FrozenBN', 'GN', 'SyncBN', ..."),
    }
    check_keys("MODEL.RNNPOOL", rc, checks)


@BACKBONE_REGISTRY.register()
def build_rnnpool_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """``MODEL.BACKBONE.NAME: build_rnnpool_resnet_backbone``: Detectron2's ResNet of ``MODEL.RESNETS`` with the RNNPool stem."""
    validate_rnnpool_config(cfg)
    rc = cfg.MODEL.RNNPOOL
    resnet = build_resnet_backbone(cfg, input_shape)
    old_stride = resnet.stem.stride
    resnet.stem = RNNPoolStem(input_shape.channels, tuple(rc.PATCH_SIZE), rc.STRIDE, rc.HIDDEN1, rc.HIDDEN2, rc.CELL,
                              rc.STREAM_ROWS, rc.NORM)
    if cfg.MODEL.BACKBONE.FREEZE_AT >= 1:
        resnet.stem.freeze()
    resnet._out_feature_strides = {k: s * rc.STRIDE // old_stride for k, s in resnet._out_feature_strides.items()}
    return resnet


@BACKBONE_REGISTRY.register()
def build_rnnpool_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """``MODEL.BACKBONE.NAME: build_rnnpool_resnet_fpn_backbone``: FPN over it, as ``build_resnet_fpn_backbone``."""
    return fpn_over(build_rnnpool_resnet_backbone(cfg, input_shape), cfg)

"""RevNet backbone (Gomez et al. 2017, seed 002) for Detectron2: residual stages that store no activations.

Each stage is a chain of coupled units ``y1 = P(x1) + f(x2)``, ``y2 = P(x2) + g(y1)`` on the
two channel halves. The first unit of a stage changes resolution and width (``P`` is a strided
1x1 projection, ``f`` strided): it is not invertible, so it keeps only its input (the previous
stage's output) and is re-run in backward (:func:`~rfpn.recurrent.reversible.recomputed`, as is
the stem). The others keep the shape (``P`` is the identity) and are additive couplings, run
through :class:`~rfpn.recurrent.reversible.ReversibleChain`: the backward rebuilds their inputs
from the stage's output. Activations are stored only at stage boundaries (which the FPN reads
anyway), whatever the number of units.

``f`` and ``g`` are pre-activation residual functions on half the channels: one 3x3 conv
(``basic``) or 1x1-3x3-1x1 with a quarter of the half width in the middle (``bottleneck``).
Depth counts every conv as the RevNet paper does: units ``(2, 2, 2, 2)`` basic is RevNet-18
(ResNet-18's conv count), units ``(2, 2, 11, 2)`` bottleneck with widths ``128-256-512-832`` is
the paper's RevNet-104. ``MODEL.REVNET.REVERSIBLE False`` runs the same network with ordinary
autograd (the memory baseline and the check that both train alike).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import CfgNode
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.backbone.resnet import BasicStem

from rfpn.config import check_keys
from rfpn.recurrent.reversible import AdditiveCoupling, recomputed, reversible_chain

from .fpn import fpn_over

__all__ = ["CoupledUnit", "RevNet", "build_revnet_backbone", "build_revnet_fpn_backbone"]

BLOCKS = ("basic", "bottleneck")


def _norm(norm: str, channels: int) -> nn.Module | None:
    """Detectron2's norm layer, except that GroupNorm takes up to 32 groups that divide ``channels``
    (the halves and bottleneck middles of narrow CPU-scale RevNets have fewer than 32 channels)."""
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return get_norm(norm, channels)


class ResidualFunction(nn.Sequential):
    """Pre-activation ``norm-ReLU-conv`` layers from ``in_channels`` to ``out_channels`` (first conv strided)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, block: str, norm: str):
        widths = [in_channels, out_channels] if block == "basic" else [in_channels, out_channels // 4, out_channels // 4,
                                                                        out_channels]
        kernels = [3] if block == "basic" else [1, 3, 1]
        layers: list[nn.Module] = []
        for i, k in enumerate(kernels):
            layers += [_norm(norm, widths[i]) or nn.Identity(), nn.ReLU()]
            layers.append(Conv2d(widths[i], widths[i + 1], k, stride=stride if i == len(kernels) // 2 else 1,
                                 padding=k // 2, bias=False))
        super().__init__(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class CoupledUnit(nn.Module):
    """``y1 = P(x1) + f(x2)``, ``y2 = P(x2) + g(y1)``; invertible (an additive coupling) when ``P`` is the identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, block: str, norm: str):
        super().__init__()
        half_in, half_out = in_channels // 2, out_channels // 2
        self.coupling = AdditiveCoupling(ResidualFunction(half_in, half_out, stride, block, norm),
                                         ResidualFunction(half_out, half_out, 1, block, norm))
        self.invertible = stride == 1 and in_channels == out_channels
        if not self.invertible:
            self.project1 = Conv2d(half_in, half_out, 1, stride=stride, bias=False, norm=_norm(norm, half_out))
            self.project2 = Conv2d(half_in, half_out, 1, stride=stride, bias=False, norm=_norm(norm, half_out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x.chunk(2, dim=1)
        if self.invertible:
            return self.coupling.step(None, x1, x2)
        y1 = self.project1(x1) + self.coupling.f(x2)
        return y1, self.project2(x2) + self.coupling.g(y1)


class RevNetStage(nn.Module):
    """A transition unit, then ``units - 1`` invertible units run through the memory-free chain."""

    def __init__(self, in_channels: int, out_channels: int, units: int, stride: int, block: str, norm: str,
                 reversible: bool):
        super().__init__()
        self.transition = CoupledUnit(in_channels, out_channels, stride, block, norm)
        self.units = nn.ModuleList(CoupledUnit(out_channels, out_channels, 1, block, norm) for _ in range(units - 1))
        self.reversible = reversible

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        couplings = [unit.coupling for unit in self.units]
        if self.reversible and torch.is_grad_enabled():
            a, b = recomputed(self.transition, x)
            if couplings:
                a, b = reversible_chain(couplings, None, a, b)
        else:
            a, b = self.transition(x)
            for coupling in couplings:
                a, b = coupling.step(None, a, b)
        return torch.cat([a, b], dim=1)


class RevNet(Backbone):
    """Detectron2's ``BasicStem`` (its norm from :func:`_norm`) and four RevNet stages; outputs ``res2``..``res5`` as a ResNet does."""

    def __init__(self, stem_channels: int, out_channels: list[int], units: list[int], block: str, norm: str,
                 reversible: bool, out_features: list[str], in_channels: int = 3):
        super().__init__()
        self.stem = BasicStem(in_channels, stem_channels, norm="")
        self.stem.conv1.norm = _norm(norm, stem_channels)
        self.stage_names, self.stages = [], nn.ModuleList()
        self._out_feature_channels, self._out_feature_strides = {"stem": stem_channels}, {"stem": 4}
        channels, stride = stem_channels, 4
        for i, (width, n) in enumerate(zip(out_channels, units)):
            step = 1 if i == 0 else 2
            stride *= step
            name = f"res{i + 2}"
            self.stages.append(RevNetStage(channels, width, n, step, block, norm, reversible))
            self.stage_names.append(name)
            self._out_feature_channels[name], self._out_feature_strides[name] = width, stride
            channels = width
        self.final_norm = _norm(norm, channels) or nn.Identity()  # pre-activation nets end with norm + ReLU
        self.reversible = reversible
        self._out_features = out_features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {}
        x = recomputed(self.stem, x) if self.reversible and torch.is_grad_enabled() else self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name == self.stage_names[-1]:
                x = F.relu(self.final_norm(x))
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def validate_revnet_config(cfg: CfgNode) -> None:
    """Raise ``ValueError`` naming the ``MODEL.REVNET`` key and its allowed values for a bad setting."""
    rc = cfg.MODEL.REVNET
    if rc.BLOCK not in BLOCKS:
        raise ValueError(f"MODEL.REVNET.BLOCK={rc.BLOCK!r} is not valid; allowed values: {', '.join(BLOCKS)}.")
    divisor = 8 if rc.BLOCK == "bottleneck" else 2
    checks = {
        "OUT_CHANNELS": (len(rc.OUT_CHANNELS) == 4 and all(c > 0 and c % divisor == 0 for c in rc.OUT_CHANNELS),
                         f"4 stage widths, each a multiple of {divisor} (the coupling halves them"
                         + (", the bottleneck quarters the half)" if divisor == 8 else ")")),
        "UNITS": (len(rc.UNITS) == 4 and all(isinstance(n, int) and n >= 1 for n in rc.UNITS), "4 integers >= 1"),
        "STEM_OUT_CHANNELS": (rc.STEM_OUT_CHANNELS > 0 and rc.STEM_OUT_CHANNELS % 2 == 0, "an even integer > 0"),
    }
    check_keys("MODEL.REVNET", rc, checks)


@BACKBONE_REGISTRY.register()
def build_revnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> RevNet:
    """``MODEL.BACKBONE.NAME: build_revnet_backbone``: the RevNet of ``MODEL.REVNET``."""
    validate_revnet_config(cfg)
    rc = cfg.MODEL.REVNET
    return RevNet(rc.STEM_OUT_CHANNELS, list(rc.OUT_CHANNELS), list(rc.UNITS), rc.BLOCK, rc.NORM, rc.REVERSIBLE,
                  list(rc.OUT_FEATURES), input_shape.channels)


@BACKBONE_REGISTRY.register()
def build_revnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """``MODEL.BACKBONE.NAME: build_revnet_fpn_backbone``: FPN over the RevNet, as ``build_resnet_fpn_backbone``."""
    return fpn_over(build_revnet_backbone(cfg, input_shape), cfg)

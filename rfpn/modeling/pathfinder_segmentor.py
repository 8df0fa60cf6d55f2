"""Pathfinder as semantic segmentation: squared Gabor/DoG input, a recurrent (or feed-forward) core, 1x1 readout.

The meta-architecture follows the paper's §2.1: a bank of 7x7 input filters whose outputs are
squared (energy of oriented edges plus one centre-surround channel), the shared recurrent core
(:func:`rfpn.modeling.build_recurrent_dynamics`: hGRU or convLSTM with any gradient method),
and a readout of norm + 1x1 conv to two classes. Training returns ``loss_sem_seg`` and, with a
stability penalty, ``loss_lcp`` (or ``loss_jacobian``); inference returns ``[{"sem_seg": (2, H, W)}]`` class
probabilities as Detectron2's semantic-segmentation models do.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.postprocessing import sem_seg_postprocess
from torch import nn

from rfpn.config import validate_pathfinder_config
from rfpn.recurrent import RecurrentDynamics

from .input_filters import gabor_dog_bank
from .recurrent_core import build_recurrent_dynamics, log_recurrent_stats, penalty_losses

__all__ = ["PathfinderSegmentor", "FeedForwardCore", "pixel_loss"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


class FeedForwardCore(nn.Module):
    """The paper's feed-forward control: ``layers`` untied ``k x k`` convs (norm + ReLU each).

    With 6 layers it holds about 3x the weights of an hGRU of the same width and kernel
    (whose two ``k x k`` kernels dominate its count). It mirrors ``RecurrentDynamics``'s call
    signature so the segmentor treats both cores alike: a layer plays the role of a step.
    """

    def __init__(self, channels: int, kernel_size: int, layers: int = 6, norm: str = "bn"):
        super().__init__()
        self.channels = channels
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=norm == "none"),
                _norm(norm, channels),
                nn.ReLU(inplace=True),
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, return_states: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        states = []
        for block in self.blocks:
            x = block(x)
            if return_states:
                states.append(x.detach())
        aux: dict[str, Any] = {"penalty": x.new_zeros(()), "steps": len(self.blocks)}
        if return_states:
            aux["states"] = states
        return x, aux


def pixel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str = "focal",
    gamma: float = 2.0,
    fg_weight: float = 1.0,
    ignore_label: int = 255,
) -> torch.Tensor:
    """Mean per-pixel cross-entropy (``kind="ce"``) or focal loss over non-ignored pixels.

    Focal loss scales each pixel's cross-entropy by ``(1 - p_true) ** gamma`` so the many easy
    background pixels stop dominating; ``fg_weight`` further weights contour pixels.
    """
    ce = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_label)
    valid = target != ignore_label
    if kind == "focal":
        ce = (1.0 - torch.exp(-ce)).pow(gamma) * ce
    if fg_weight != 1.0:
        ce = ce * torch.where(target == 1, fg_weight, 1.0)
    return ce.sum() / valid.sum().clamp_min(1)


@META_ARCH_REGISTRY.register()
class PathfinderSegmentor(nn.Module):
    """Contour tracing as two-class segmentation (background, contour) on grayscale images.

    Inputs are Detectron2 dicts with ``image`` (1, H, W) in 0..255 and, for training,
    ``sem_seg`` (H, W) int64 with 0 / 1 (255 ignored). With ``return_steps`` inference also
    returns ``sem_seg_steps`` (T, 2, H, W): the readout applied to every step's state.
    """

    @configurable
    def __init__(
        self,
        *,
        core: nn.Module,
        channels: int,
        input_kernel_size: int = 7,
        readout_norm: str = "bn",
        loss: str = "focal",
        focal_gamma: float = 2.0,
        fg_weight: float = 1.0,
        fg_prior: float = 0.01,
        return_steps: bool = False,
        ignore_label: int = 255,
    ):
        super().__init__()
        self.input_conv = nn.Conv2d(1, channels, input_kernel_size, padding=input_kernel_size // 2)
        with torch.no_grad():
            self.input_conv.weight.copy_(gabor_dog_bank(channels, input_kernel_size))
            self.input_conv.bias.zero_()
        self.core = core
        self.readout = nn.Sequential(_norm(readout_norm, channels), nn.Conv2d(channels, 2, 1))
        with torch.no_grad():
            self.readout[1].bias.copy_(torch.tensor([0.0, math.log(fg_prior / (1.0 - fg_prior))]))
        self.loss = loss
        self.focal_gamma = focal_gamma
        self.fg_weight = fg_weight
        self.return_steps = return_steps
        self.ignore_label = ignore_label

    @classmethod
    def from_config(cls, cfg) -> dict[str, Any]:
        validate_pathfinder_config(cfg)
        pf, rc = cfg.MODEL.PATHFINDER, cfg.MODEL.RECURRENT
        if pf.CORE == "feedforward":
            core: nn.Module = FeedForwardCore(rc.CHANNELS, rc.KERNEL_SIZE, pf.FF_LAYERS, norm=rc.NORM)
        else:
            core = build_recurrent_dynamics(cfg)
        return {
            "core": core,
            "channels": rc.CHANNELS,
            "input_kernel_size": pf.INPUT_KERNEL_SIZE,
            "readout_norm": pf.READOUT_NORM,
            "loss": pf.LOSS,
            "focal_gamma": pf.FOCAL_GAMMA,
            "fg_weight": pf.FG_WEIGHT,
            "fg_prior": pf.FG_PRIOR,
            "return_steps": pf.RETURN_STEPS,
        }

    @property
    def device(self) -> torch.device:
        return self.input_conv.weight.device

    def _images(self, batched_inputs: list[dict]) -> torch.Tensor:
        shapes = {tuple(d["image"].shape) for d in batched_inputs}
        if len(shapes) != 1:
            raise ValueError(f"PathfinderSegmentor needs images of one size per batch; got shapes {sorted(shapes)}.")
        shape = shapes.pop()
        if len(shape) != 3 or shape[0] != 1:
            raise ValueError(f"PathfinderSegmentor expects grayscale images of shape (1, H, W); got {shape}.")
        return torch.stack([d["image"] for d in batched_inputs]).to(self.device, torch.float32) / 255.0

    def features(self, images: torch.Tensor, return_states: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """Core output and aux for images in [0, 1] of shape (B, 1, H, W)."""
        drive = self.input_conv(images).pow(2)
        return self.core(drive, return_states=return_states)

    def forward(self, batched_inputs: list[dict]):
        images = self._images(batched_inputs)
        want_steps = self.return_steps and not self.training
        state, aux = self.features(images, return_states=want_steps)
        logits = self.readout(state)
        if self.training:
            return self.losses(logits, batched_inputs, aux)
        step_logits = torch.stack([self.readout(s) for s in aux["states"]], 1) if want_steps else None
        results = []
        for i, d in enumerate(batched_inputs):
            height, width = d.get("height", images.shape[-2]), d.get("width", images.shape[-1])
            image_size = images.shape[-2:]
            result = {"sem_seg": sem_seg_postprocess(logits[i].softmax(0), image_size, height, width)}
            if step_logits is not None:
                result["sem_seg_steps"] = torch.stack(
                    [sem_seg_postprocess(s.softmax(0), image_size, height, width) for s in step_logits[i]]
                )
            results.append(result)
        return results

    def losses(self, logits: torch.Tensor, batched_inputs: list[dict], aux: dict[str, Any]) -> dict[str, torch.Tensor]:
        if any("sem_seg" not in d for d in batched_inputs):
            raise ValueError("Training the PathfinderSegmentor needs 'sem_seg' labels in every input dict.")
        target = torch.stack([d["sem_seg"] for d in batched_inputs]).to(self.device, torch.long)
        losses = {
            "loss_sem_seg": pixel_loss(
                logits, target, self.loss, self.focal_gamma, self.fg_weight, self.ignore_label
            )
        }
        if isinstance(self.core, RecurrentDynamics):
            losses.update(penalty_losses(self.core, aux))
            log_recurrent_stats(aux, "recurrent", self.core)
        return losses

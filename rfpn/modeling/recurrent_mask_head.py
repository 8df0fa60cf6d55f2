"""R-FPN's recurrent mask head: an hGRU iterated over the RoI features replaces the 4-conv stack.

The RoI features (``CONV_DIM`` channels, 14x14) are the constant drive of the recurrent
core built from ``MODEL.RECURRENT`` (hGRU, 3x3 kernels, GroupNorm in the R-FPN configs);
the final state goes through the standard readout (norm -> 2x2 deconv -> ReLU -> 1x1
predictor). Losses and inference stay Detectron2's own (``mask_rcnn_loss`` as ``loss_mask``,
``mask_rcnn_inference``); with a stability penalty (the LCP of C-BPTT / C-RBP) it joins them as
``loss_lcp = xi * penalty``, xi being ``MODEL.RECURRENT.LCP_WEIGHT`` or its adapted value.
"""
from __future__ import annotations

import math
from typing import Any

import fvcore.nn.weight_init as weight_init
import torch
from torch import nn

from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ConvTranspose2d, ShapeSpec, cat
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    BaseMaskRCNNHead,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detectron2.structures import Instances

from rfpn.config import validate_rfpn_mask_head_config
from rfpn.recurrent import RecurrentDynamics

from .recurrent_core import build_recurrent_dynamics, log_recurrent_stats, penalty_losses

__all__ = ["RecurrentMaskHead"]


def _readout_norm(kind: str, channels: int) -> nn.Module:
    """``"GN"``: GroupNorm with up to 32 groups (fewer when ``channels`` is small); ``""``: none."""
    if kind == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


@ROI_MASK_HEAD_REGISTRY.register()
class RecurrentMaskHead(BaseMaskRCNNHead):
    """Mask head whose features come from recurrent dynamics driven by the RoI features.

    Training returns ``{"loss_mask", "loss_lcp"}`` (``loss_lcp`` only with the LCP;
    ``loss_jacobian`` instead with the Jacobian regulariser). Inference runs ``MODEL.RECURRENT.TEST_STEPS`` steps (with
    per-instance early stopping when ``EPS > 0``), fills ``pred_masks`` as the standard head
    and adds ``mask_steps`` (steps each instance ran); with ``timecourse`` it also adds
    ``pred_mask_step_logits`` (N, T, M, M): the predicted class's mask logits after every step.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        conv_dim: int,
        dynamics: RecurrentDynamics,
        readout_norm: str = "GN",
        timecourse: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            input_shape: shape of the pooled RoI features.
            num_classes: foreground classes (1 for class-agnostic masks).
            conv_dim: channels of the recurrent state; the RoI features are projected to it
                by a 1x1 conv only when their channel count differs.
            dynamics: the recurrent core, built for ``conv_dim`` channels (it carries the penalty weight).
            readout_norm: norm on the final state before the deconv: ``"GN"`` or ``""``.
            timecourse: at test time, also return the mask logits after every step.
        """
        super().__init__(**kwargs)
        if dynamics.cell.channels != conv_dim:
            raise ValueError(
                f"The recurrent cell has {dynamics.cell.channels} channels but the mask head expects "
                f"MODEL.ROI_MASK_HEAD.CONV_DIM={conv_dim}; build the dynamics with channels=conv_dim."
            )
        self.input_proj = (
            Conv2d(input_shape.channels, conv_dim, kernel_size=1) if input_shape.channels != conv_dim else None
        )
        self.dynamics = dynamics
        self.timecourse = timecourse
        self.readout_norm = _readout_norm(readout_norm, conv_dim)
        self.deconv = ConvTranspose2d(conv_dim, conv_dim, kernel_size=2, stride=2, padding=0)
        self.deconv_relu = nn.ReLU()
        self.predictor = Conv2d(conv_dim, num_classes, kernel_size=1)

        if self.input_proj is not None:
            weight_init.c2_msra_fill(self.input_proj)
        weight_init.c2_msra_fill(self.deconv)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> dict[str, Any]:
        validate_rfpn_mask_head_config(cfg)
        ret = super().from_config(cfg, input_shape)
        conv_dim = cfg.MODEL.ROI_MASK_HEAD.CONV_DIM
        ret.update(
            input_shape=input_shape,
            num_classes=1 if cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            conv_dim=conv_dim,
            dynamics=build_recurrent_dynamics(cfg, channels=conv_dim),
            readout_norm=cfg.MODEL.ROI_MASK_HEAD.READOUT_NORM,
            timecourse=cfg.MODEL.ROI_MASK_HEAD.TIMECOURSE,
        )
        return ret

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        """Mask logits (R, num_classes, 2H, 2W) from a recurrent state (R, C, H, W)."""
        return self.predictor(self.deconv_relu(self.deconv(self.readout_norm(state))))

    def _drive(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_proj(x) if self.input_proj is not None else x

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits from RoI features (the recurrent dynamics followed by the readout)."""
        return self._run(x)[0]

    def _run(self, x: torch.Tensor, return_states: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        drive = self._drive(x)
        if drive.shape[0] == 0:
            # No RoIs: skip the dynamics but keep every parameter in the graph (zero gradient),
            # so the losses stay differentiable and distributed training sees all parameters.
            tie = sum(p.sum() for p in self.dynamics.parameters()) * 0.0
            logits = self.readout(drive) + tie
            aux = {
                "penalty": tie,
                "penalty_weight": self.dynamics.penalty_weight,
                "steps": 0,
                "steps_per_sample": torch.zeros(0, dtype=torch.long),
                "residual": 0.0,
            }
            if return_states:
                aux["states"] = []
            return logits, aux
        state, aux = self.dynamics(drive, return_states=return_states)
        return self.readout(state), aux

    def forward(self, x: torch.Tensor, instances: list[Instances]):
        if self.training:
            logits, aux = self._run(x)
            losses = {"loss_mask": mask_rcnn_loss(logits, instances, self.vis_period) * self.loss_weight}
            losses.update(penalty_losses(self.dynamics, aux))
            log_recurrent_stats(aux, "mask_head", self.dynamics)
            return losses
        logits, aux = self._run(x, return_states=self.timecourse)
        mask_rcnn_inference(logits, instances)
        self._attach_steps(instances, aux, logits)
        return instances

    @torch.no_grad()
    def _attach_steps(self, instances: list[Instances], aux: dict[str, Any], logits: torch.Tensor) -> None:
        """Split per-instance step counts (and, with ``timecourse``, per-step logits) over the images."""
        counts = [len(i) for i in instances]
        for inst, s in zip(instances, aux["steps_per_sample"].to(logits.device).split(counts)):
            inst.mask_steps = s
        if not self.timecourse:
            return
        if not aux["states"]:
            step_logits = logits.new_zeros(0, 0, *logits.shape[-2:])
        else:
            rows = torch.arange(logits.shape[0], device=logits.device)
            classes = cat([i.pred_classes for i in instances]) if logits.shape[1] > 1 else torch.zeros_like(rows)
            step_logits = torch.stack([self.readout(state)[rows, classes] for state in aux["states"]], dim=1)
        for inst, s in zip(instances, step_logits.split(counts)):
            inst.pred_mask_step_logits = s

"""Mixed precision for training and inference on the CPU (bf16) and on GPUs (fp16 or bf16).

Detectron2's ``SOLVER.AMP.ENABLED`` switches mixed precision on; its ``AMPTrainer`` needs CUDA.
rfpn reads the same key on any device and adds ``SOLVER.AMP.PRECISION``: ``""`` picks bf16 on
the CPU (fast only where the CPU has AMX or AVX512-BF16; elsewhere PyTorch emulates it and a warning
says so) and fp16 on CUDA; ``"bf16"`` or
``"fp16"`` choose explicitly. fp16 trains with a gradient scaler (overflowing steps are skipped and
the scale lowered, as on GPUs); bf16 has fp32's exponent range and needs none.

Under autocast only the operations autocast lists (convolutions, matrix products) run in reduced
precision; the recurrent state, the solvers' residuals and the implicit backward stay in float32
(:func:`rfpn.recurrent.dynamics.state_dtype`). Parameters and checkpoints stay float32.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from detectron2.config import CfgNode

from rfpn.config import AMP_PRECISIONS
from rfpn.recurrent import full_precision_switch

__all__ = ["AMP_PRECISIONS", "Precision", "amp_supported", "native_bf16_cpu", "resolve_precision"]

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The arithmetic of a run: ``dtype`` None is full precision."""

    device_type: str
    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this precision, or a no-op context in full precision."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self, init_scale: float = 2.0**16) -> torch.amp.GradScaler | None:
        """A gradient scaler for fp16 (None for bf16 and full precision)."""
        if self.dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device_type, init_scale=init_scale)


def amp_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this PyTorch build and machine can autocast to ``dtype`` on ``device_type`` (and scale fp16)."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    try:
        with torch.autocast(device_type, dtype=dtype):
            probe = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2))
        if probe.dtype != dtype:
            return False
        if dtype == torch.float16:
            torch.amp.GradScaler(device_type)
    except (RuntimeError, ValueError, AssertionError):
        return False
    return True


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere PyTorch emulates it, slowly."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(cfg: CfgNode) -> Precision:
    """The :class:`Precision` that ``SOLVER.AMP`` asks for on ``MODEL.DEVICE``; ``ValueError`` naming the key if unsupported."""
    device_type = torch.device(cfg.MODEL.DEVICE).type
    name = cfg.SOLVER.AMP.PRECISION
    if name not in AMP_PRECISIONS:
        raise ValueError(
            f"SOLVER.AMP.PRECISION={name!r} is not valid; allowed values: '' (bf16 on the CPU, fp16 on CUDA), bf16, fp16."
        )
    if not cfg.SOLVER.AMP.ENABLED:
        return Precision(device_type)
    name = name or ("bf16" if device_type == "cpu" else "fp16")
    dtype = _DTYPES[name]
    if not amp_supported(device_type, dtype):
        others = [n for n, d in _DTYPES.items() if d != dtype and amp_supported(device_type, d)]
        raise ValueError(
            f"SOLVER.AMP.PRECISION={name!r} is not supported on MODEL.DEVICE={cfg.MODEL.DEVICE!r} by this machine and "
            f"PyTorch; allowed values here: {', '.join(others) or 'none (set SOLVER.AMP.ENABLED False)'}."
        )
    if device_type == "cpu" and dtype == torch.bfloat16 and not native_bf16_cpu():
        logger.warning(
            "SOLVER.AMP.ENABLED: this CPU has no native bf16 (no AVX512-BF16 or AMX; PyTorch reports "
            f"{torch.backends.cpu.get_cpu_capability()}), so bf16 is emulated and much slower than fp32 here (an hGRU "
            "step measured 70x slower on an AVX2-only AMD EPYC). Set SOLVER.AMP.ENABLED False on this machine."
        )
    _report_full_precision_finish(cfg, name, dtype)
    return Precision(device_type, dtype)


def _report_full_precision_finish(cfg: CfgNode, name: str, dtype: torch.dtype) -> None:
    """Say when residual-stopped solves will finish in float32 because ``MODEL.RECURRENT.TOL`` is below what ``dtype`` resolves.

    See :func:`rfpn.recurrent.full_precision_threshold`: the reduced-precision cells stall the
    relative residual near their unit roundoff, so such solves switch to float32 at twice it.
    """
    rc = cfg.MODEL.get("RECURRENT")
    if rc is None or all(solver in ("", "fixed") for solver in (rc.SOLVER, rc.TEST_SOLVER)):
        return
    switch = full_precision_switch(rc.TOL, dtype)
    if switch is not None:
        logger.info(
            f"MODEL.RECURRENT.TOL={rc.TOL:g} is below what {name} cells resolve: residual-stopped solves run in {name} "
            f"until every relative residual is below {switch:.2g}, then finish in float32."
        )

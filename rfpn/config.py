"""Config keys rfpn adds to Detectron2's ``CfgNode``, with their defaults and checks.

Call :func:`add_rfpn_config` on a fresh ``get_cfg()`` before merging an rfpn YAML file.
``MODEL.RECURRENT`` is shared by both tasks (the Pathfinder segmentor and the recurrent
mask head); :func:`validate_recurrent_config` rejects bad values with the key's name and
the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from detectron2.config import CfgNode as CN

from rfpn.recurrent import GATES, NORMS, BackwardOptions, ForwardOptions, PenaltyOptions, validate_settings
from rfpn.recurrent.options import config_names

CELLS = ("hgru", "convlstm")
NONFINITE_MODES = ("raise", "skip")
AMP_PRECISIONS = ("", "bf16", "fp16")
PATHFINDER_CORES = ("recurrent", "feedforward")
OPTIMIZERS = ("SGD", "ADAM", "ADAMW")


def add_recurrent_config(cfg: CN) -> None:
    """``MODEL.RECURRENT``: the recurrent core shared by every rfpn model."""
    cfg.MODEL.RECURRENT = CN()
    _C = cfg.MODEL.RECURRENT
    _C.CELL = "hgru"  # recurrent cell: "hgru" or "convlstm"
    _C.CHANNELS = 16  # channels of the recurrent state (the drive is projected to this many)
    _C.KERNEL_SIZE = 7  # spatial size of the cell's horizontal kernels (odd)
    _C.NORM = "bn"  # norm inside the hGRU: "bn" (batch statistics), "gn" (GroupNorm) or "none"
    _C.GATE = "conv"  # hGRU gain gate: "conv" (1x1 conv) or "gala" (global x local attention)
    _C.STEPS = 8  # training steps N
    _C.TEST_STEPS = 0  # inference steps; 0 reuses STEPS (may exceed STEPS)
    # gradient method: "bptt", "rbp" (implicit), "jfb" (Jacobian-free), "phantom" (phantom gradients),
    # "reversible" (exact, constant memory, momentum-coupled dynamics), or any of
    # them with a "c" prefix ("cbptt", "crbp", "cjfb", "cphantom"), which switches the LCP on
    _C.GRAD = "crbp"
    _C.NEUMANN_STEPS = 15  # max terms of the Neumann series in the RBP backward
    _C.NEUMANN_NORM_CAP = 100.0  # stop the Neumann sum when |u| would pass this multiple of |g|
    _C.NEUMANN_TOL = 0.0  # stop the Neumann sum once a term is below this fraction of |g|
    _C.LCP_LAMBDA = 0.9  # contraction target lambda of the LCP, in [0, 1)
    _C.LCP_WEIGHT = 10.0  # weight xi of the penalty in the loss (the starting value with LCP_WEIGHT_AUTO)
    _C.LCP_WEIGHT_AUTO = False  # adapt xi by dual ascent so that max(1^T J) <= LCP_LAMBDA (needs the LCP)
    _C.LCP_WEIGHT_RATE = 0.1  # LCP_WEIGHT_AUTO: largest change of log(xi) per iteration
    _C.PENALTY = ""  # stability penalty: "" (the LCP for c-prefixed GRAD, none otherwise), "none", "lcp" or "jacobian"
    _C.JACOBIAN_PROBES = 1  # PENALTY "jacobian": Gaussian probes of the Hutchinson estimate of ||J||_F^2
    _C.PHANTOM_STEPS = 5  # GRAD phantom: damped steps k recorded with the graph (k = 1, tau = 1 is jfb)
    _C.PHANTOM_TAU = 0.5  # GRAD phantom: damping tau of h <- tau * F(x, h) + (1 - tau) * h, in (0, 1]
    # GRAD reversible: how a step is made invertible. "momentum": v' = gamma v + (1 - gamma)(F(x, h) - h),
    # h' = h + v' (any cell); "additive": two half-width cells, a' = a + (F_a(x_1, b) - b), b' = b + (F_b(x_2, a') - a')
    # (CHANNELS must be even; preserves volume, so it does not contract)
    _C.COUPLING = "momentum"
    _C.REVERSIBLE_GAMMA = 0.9  # GRAD reversible: gamma of the momentum coupling, in (0, 1)
    # GRAD reversible: keep the state in fixed point so the inverse is bit-exact (gamma rounded to k/256;
    # momentum keeps one byte per element per step)
    _C.REVERSIBLE_EXACT = False
    _C.EPS = 0.0  # inference early stop: a sample stops once mean |h_{t+1} - h_t| < EPS (0: off)
    # forward solver: "fixed" (STEPS / TEST_STEPS steps), or "iterate" / "anderson" / "heavyball" (stop on TOL)
    _C.SOLVER = "fixed"
    _C.TEST_SOLVER = ""  # inference solver: "" reuses SOLVER, or "fixed" (TEST_STEPS steps) / "iterate" / "anderson" / "heavyball"
    _C.TOL = 1e-4  # iterate/anderson stop once every sample's |h_{t+1} - h_t| / |h_{t+1}| < TOL
    _C.MAX_STEPS = 100  # iterate/anderson: cap on cell evaluations (training and inference)
    _C.ANDERSON_M = 5  # Anderson history: residuals kept for the least-squares extrapolation
    _C.HEAVY_BALL_MU = -1.0  # heavyball solver: momentum in [0, 1); negative: chosen with HEAVY_BALL_STEP from the
    _C.HEAVY_BALL_STEP = -1.0  # contraction rate of the first plain steps (Polyak's rule); step in (0, 2)
    # state momentum on the cell (MomentumRNN): v' = MOMENTUM v + MOMENTUM_STEP (F(x, h) - h), h' = h + v'
    _C.MOMENTUM = 0.0  # mu in [0, 1); 0 with MOMENTUM_STEP 1 is the plain cell
    _C.MOMENTUM_STEP = 1.0  # s in (0, 1]; MOMENTUM 0 with MOMENTUM_STEP < 1 is a damped update without memory
    _C.BACKWARD_SOLVER = "neumann"  # rbp/crbp backward: "neumann" (NEUMANN_* keys) or "anderson" (BACKWARD_* keys)
    _C.BACKWARD_TOL = 1e-5  # anderson backward: stop once |(I - J^T) u - g| / |g| < BACKWARD_TOL
    _C.BACKWARD_MAX_STEPS = 50  # anderson backward: cap on vector-Jacobian products


def add_pathfinder_data_config(cfg: CN) -> None:
    """Pathfinder data keys (read by ``PathfinderDatasetMapper``)."""
    cfg.INPUT.PATHFINDER_FLIP = True  # random horizontal and vertical flips of Pathfinder images + labels when training


def add_pathfinder_config(cfg: CN) -> None:
    """``MODEL.PATHFINDER`` (the Pathfinder segmentor) and the trainer keys it relies on."""
    cfg.MODEL.PATHFINDER = CN()
    _C = cfg.MODEL.PATHFINDER
    _C.CORE = "recurrent"  # "recurrent" (MODEL.RECURRENT cell + dynamics) or "feedforward" (the untied control)
    _C.INPUT_KERNEL_SIZE = 7  # size of the squared Gabor + DoG input filters (their count is MODEL.RECURRENT.CHANNELS)
    _C.FF_LAYERS = 6  # feed-forward control: number of untied KERNEL_SIZE convs (6 is about 3x the hGRU's weights)
    _C.READOUT_NORM = "bn"  # norm before the 1x1 readout: "bn" (running statistics), "gn" or "none"
    _C.LOSS = "focal"  # per-pixel loss: "ce" (cross-entropy) or "focal" (focal loss, the authors' choice)
    _C.FOCAL_GAMMA = 2.0  # focusing exponent of the focal loss
    _C.FG_WEIGHT = 1.0  # weight of contour pixels in the loss (background pixels weigh 1)
    _C.FG_PRIOR = 0.01  # foreground probability the readout bias starts at
    _C.RETURN_STEPS = False  # inference also returns the readout of every step ("sem_seg_steps"; per-step IoU)
    cfg.TEST.IMS_PER_BATCH = 16  # images per inference batch (rfpn's Trainer; Detectron2 itself uses 1)
    cfg.SOLVER.OPTIMIZER = "SGD"  # rfpn's Trainer: "SGD" (momentum), "ADAM" or "ADAMW"


def add_rfpn_mask_head_config(cfg: CN) -> None:
    """Keys of R-FPN's ``RecurrentMaskHead`` (its dynamics are configured by ``MODEL.RECURRENT``)."""
    _C = cfg.MODEL.ROI_MASK_HEAD
    _C.READOUT_NORM = "GN"  # RecurrentMaskHead: norm on the final state before the deconv: "GN" or "" (none)
    _C.TIMECOURSE = False  # RecurrentMaskHead at test time: add per-step mask logits as pred_mask_step_logits


def add_revnet_config(cfg: CN) -> None:
    """``MODEL.REVNET``: the RevNet backbone (``MODEL.BACKBONE.NAME: build_revnet_fpn_backbone``)."""
    cfg.MODEL.REVNET = CN()
    _C = cfg.MODEL.REVNET
    _C.STEM_OUT_CHANNELS = 64  # Detectron2's BasicStem (7x7/2 conv + max pool); even, the first unit halves it
    _C.OUT_CHANNELS = [64, 128, 256, 512]  # output width of res2..res5 (even; bottleneck: multiples of 8)
    _C.UNITS = [2, 2, 2, 2]  # coupled units per stage: a transition unit (stored) then UNITS - 1 reversible ones
    _C.BLOCK = "basic"  # f and g: "basic" (norm-ReLU-3x3 conv) or "bottleneck" (1x1-3x3-1x1 at a quarter width)
    _C.NORM = "GN"  # Detectron2 norm name ("BN", "SyncBN", "GN", "" ...); recomputation never updates BN statistics twice
    _C.REVERSIBLE = True  # False: the same network with ordinary autograd (stores every activation)
    _C.OUT_FEATURES = ["res2", "res3", "res4", "res5"]


def add_rnnpool_config(cfg: CN) -> None:
    """``MODEL.RNNPOOL``: the RNNPool stem of a ResNet (``MODEL.BACKBONE.NAME: build_rnnpool_resnet_fpn_backbone``)."""
    cfg.MODEL.RNNPOOL = CN()
    _C = cfg.MODEL.RNNPOOL
    _C.PATCH_SIZE = [8, 8]  # [rows, cols] of each pooled patch (EdgeML's RNNPool-Face: 8x8); at most the shortest image side
    _C.STRIDE = 4  # patch stride = the stem's output stride (a power of two; 4 is the ResNet stem's), at most the patch
    _C.HIDDEN1 = 16  # state size of RNN1, which sweeps every row and every column of a patch
    _C.HIDDEN2 = 16  # state size of RNN2 (both directions over the row and the column summaries); 4 x HIDDEN2 = MODEL.RESNETS.STEM_OUT_CHANNELS
    _C.CELL = "fastgrnn"  # the cell of both RNNs: "fastgrnn" (the authors') or "gru"
    _C.STREAM_ROWS = 1  # inference without gradients pools this many rows of patches at a time into the output (0: all at once)
    # norm then ReLU on the pooled map, as Detectron2's BasicStem has after its conv: a Detectron2 norm name
    # ("GN", "BN", ...) or "" (the pooled tanh-bounded states go to res2 as they are, the seed's layer alone)
    _C.NORM = ""


def add_training_safety_config(cfg: CN) -> None:
    """Keys of rfpn's trainer (``ResilientTrainer``) for divergence handling and mixed precision."""
    # with SOLVER.AMP.ENABLED: "" (bf16 on the CPU, fp16 with a gradient scaler on CUDA), "bf16" or "fp16";
    # training and inference (evaluation, --eval-only) use it alike
    cfg.SOLVER.AMP.PRECISION = ""
    # load MODEL.WEIGHTS even when parameters are missing, unexpected or of another shape (warnings, as
    # Detectron2 does); by default that is an error naming them. ImageNet/Caffe2 .pkl backbones always load partially
    cfg.MODEL.ALLOW_PARTIAL_WEIGHTS = False
    cfg.SOLVER.NONFINITE = "raise"  # NaN/inf loss, recurrent state or gradient: "raise" (stop, naming iteration + term) or "skip" (drop the batch, count it)
    cfg.SOLVER.NONFINITE_MAX_FRACTION = 0.1  # with "skip": stop once more than this fraction of SOLVER.MAX_ITER batches were dropped


def add_diagnostics_config(cfg: CN) -> None:
    """``DIAGNOSTICS``: stability diagnostics of the recurrent cores during training (``RecurrentDiagnosticsHook``)."""
    cfg.DIAGNOSTICS = CN()
    cfg.DIAGNOSTICS.PERIOD = 0  # every PERIOD iterations write spectral norm, LCP, residual, Neumann terms to the event storage (0: off)
    cfg.DIAGNOSTICS.POWER_ITERS = 20  # power iterations for the estimate of the Jacobian's spectral norm
    cfg.DIAGNOSTICS.MAX_SAMPLES = 4  # samples of the iteration's drive to diagnose (0: the whole batch)


def add_rfpn_config(cfg: CN) -> None:
    """Add every rfpn key to ``cfg`` (in place)."""
    add_recurrent_config(cfg)
    add_training_safety_config(cfg)
    add_pathfinder_data_config(cfg)
    add_rfpn_mask_head_config(cfg)
    add_pathfinder_config(cfg)
    add_diagnostics_config(cfg)
    add_revnet_config(cfg)
    add_rnnpool_config(cfg)


def check_keys(prefix: str, node: CN, checks: dict[str, tuple[bool, str]]) -> None:
    """Raise ``ValueError`` for the first ``KEY: (ok, allowed values)`` of ``checks`` that is not ok.

    ``KEY`` may be dotted (relative to ``node``); the error names ``prefix.KEY`` (``KEY`` for an empty prefix).
    """
    for key, (ok, allowed) in checks.items():
        if not ok:
            value = node
            for part in key.split("."):
                value = getattr(value, part)
            name = f"{prefix}.{key}" if prefix else key
            raise ValueError(f"{name}={value!r} is not valid; allowed values: {allowed}.")


def _require_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed values: {', '.join(map(str, allowed))}.")


def validate_training_safety_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key and the allowed values for a bad divergence-handling setting."""
    _require_choice("SOLVER.NONFINITE", cfg.SOLVER.NONFINITE, NONFINITE_MODES)
    _require_choice("SOLVER.AMP.PRECISION", cfg.SOLVER.AMP.PRECISION, AMP_PRECISIONS)
    if not 0.0 <= cfg.SOLVER.NONFINITE_MAX_FRACTION <= 1.0:
        raise ValueError(
            f"SOLVER.NONFINITE_MAX_FRACTION={cfg.SOLVER.NONFINITE_MAX_FRACTION!r} is not valid; allowed values: a number in [0, 1]."
        )


def validate_run_config(cfg: CN, processes: int = 1, training: bool = True) -> None:
    """Check the Detectron2 keys a run depends on, before any worker starts (``ValueError`` naming the key).

    Batch sizes (and their divisibility by the ``processes`` that share them), iteration counts,
    checkpoint and evaluation periods, LR milestones, the data-loader workers and the device.
    """
    import torch

    s = cfg.SOLVER
    checks = [
        ("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH, s.IMS_PER_BATCH >= 1, "an integer >= 1"),
        ("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH, s.IMS_PER_BATCH % processes == 0,
         f"a multiple of the {processes} processes that share it (--num-gpus x --num-machines)"),
        ("SOLVER.BASE_LR", s.BASE_LR, s.BASE_LR > 0, "a number > 0"),
        ("SOLVER.CHECKPOINT_PERIOD", s.CHECKPOINT_PERIOD, s.CHECKPOINT_PERIOD >= 1, "an integer >= 1"),
        ("SOLVER.WARMUP_ITERS", s.WARMUP_ITERS, s.WARMUP_ITERS >= 0, "an integer >= 0"),
        ("SOLVER.STEPS", s.STEPS, all(x >= 1 for x in s.STEPS) and list(s.STEPS) == sorted(s.STEPS),
         "increasing iteration numbers >= 1 (values above SOLVER.MAX_ITER are ignored)"),
        ("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD, cfg.TEST.EVAL_PERIOD >= 0, "0 (only at the end) or an integer >= 1"),
        ("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.NUM_WORKERS >= 0, "an integer >= 0"),
    ]
    if training:
        checks.append(("SOLVER.MAX_ITER", s.MAX_ITER, s.MAX_ITER >= 1, "an integer >= 1"))
    for key, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{key}={value!r} is not valid; allowed values: {allowed}.")
    try:
        device = torch.device(cfg.MODEL.DEVICE)
    except RuntimeError:
        raise ValueError(f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} is not a device; allowed values: cpu, cuda, cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but this machine has no CUDA device; add MODEL.DEVICE cpu to run on the CPU."
        )


@dataclass
class RecurrentSettings:
    """``MODEL.RECURRENT`` as the arguments of :class:`~rfpn.recurrent.RecurrentDynamics` (validated)."""

    grad: str
    steps: int
    forward: ForwardOptions
    backward: BackwardOptions
    penalty: PenaltyOptions


_RECURRENT = "MODEL.RECURRENT"


def recurrent_settings(cfg: CN) -> RecurrentSettings:
    """Map ``MODEL.RECURRENT`` to the option groups and validate them (errors name the config key)."""
    rc = cfg.MODEL.RECURRENT
    groups = [
        cls(**{f.name: rc[f.metadata["key"]] for f in fields(cls)})
        for cls in (ForwardOptions, BackwardOptions, PenaltyOptions)
    ]
    settings = RecurrentSettings(rc.GRAD, rc.STEPS, *groups)
    validate_settings(
        settings.grad,
        settings.steps,
        *groups,
        naming=config_names(_RECURRENT),
        grad_name=f"{_RECURRENT}.GRAD",
        steps_name=f"{_RECURRENT}.STEPS",
    )
    return settings


def training_steps(cfg: CN) -> int:
    """The cell evaluations a training forward pass may run: ``STEPS`` for the fixed solver, else
    the solver's cap ``MAX_STEPS`` (a residual-stopped solve may stop earlier)."""
    rc = cfg.MODEL.RECURRENT
    return rc.STEPS if rc.SOLVER == "fixed" else rc.MAX_STEPS


def validate_recurrent_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key and the allowed values for any bad setting."""
    rc = cfg.MODEL.RECURRENT
    _require_choice("MODEL.RECURRENT.CELL", rc.CELL, CELLS)
    _require_choice("MODEL.RECURRENT.NORM", rc.NORM, NORMS)
    _require_choice("MODEL.RECURRENT.GATE", rc.GATE, GATES)
    checks = {
        "MOMENTUM": (isinstance(rc.MOMENTUM, (int, float)) and 0 <= rc.MOMENTUM < 1, "a number in [0, 1)"),
        "MOMENTUM_STEP": (isinstance(rc.MOMENTUM_STEP, (int, float)) and 0 < rc.MOMENTUM_STEP <= 1, "a number in (0, 1]"),
        "CHANNELS": (rc.CHANNELS >= 1, "an integer >= 1"),
        "KERNEL_SIZE": (rc.KERNEL_SIZE >= 1 and rc.KERNEL_SIZE % 2 == 1, "an odd integer >= 1"),
    }
    if rc.COUPLING == "additive" and rc.GRAD.endswith("reversible") and rc.CHANNELS % 2:
        checks["CHANNELS"] = (False, "an even integer with COUPLING 'additive', which splits the channels in halves")
    check_keys("MODEL.RECURRENT", rc, checks)
    recurrent_settings(cfg)


def validate_pathfinder_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key and the allowed values for any bad Pathfinder setting."""
    pf = cfg.MODEL.PATHFINDER
    _require_choice("MODEL.PATHFINDER.CORE", pf.CORE, PATHFINDER_CORES)
    _require_choice("MODEL.PATHFINDER.READOUT_NORM", pf.READOUT_NORM, ("bn", "gn", "none"))
    _require_choice("MODEL.PATHFINDER.LOSS", pf.LOSS, ("ce", "focal"))
    _require_choice("SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER, OPTIMIZERS)
    checks = {
        "MODEL.PATHFINDER.INPUT_KERNEL_SIZE": (pf.INPUT_KERNEL_SIZE >= 3 and pf.INPUT_KERNEL_SIZE % 2 == 1, "an odd integer >= 3"),
        "MODEL.PATHFINDER.FF_LAYERS": (pf.FF_LAYERS >= 1, "an integer >= 1"),
        "MODEL.PATHFINDER.FOCAL_GAMMA": (pf.FOCAL_GAMMA >= 0, "a number >= 0"),
        "MODEL.PATHFINDER.FG_WEIGHT": (pf.FG_WEIGHT > 0, "a number > 0"),
        "MODEL.PATHFINDER.FG_PRIOR": (0 < pf.FG_PRIOR < 1, "a number in (0, 1)"),
        "TEST.IMS_PER_BATCH": (cfg.TEST.IMS_PER_BATCH >= 1, "an integer >= 1"),
    }
    check_keys("", cfg, checks)


def validate_rfpn_mask_head_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key and the allowed values for a bad recurrent mask head setting."""
    mh = cfg.MODEL.ROI_MASK_HEAD
    _require_choice("MODEL.ROI_MASK_HEAD.READOUT_NORM", mh.READOUT_NORM, ("GN", ""))
    if mh.CONV_DIM < 1:
        raise ValueError(f"MODEL.ROI_MASK_HEAD.CONV_DIM={mh.CONV_DIM!r} is not valid; allowed values: an integer >= 1.")
    validate_recurrent_config(cfg)


def validate_pathfinder_data_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key and the allowed values for a bad Pathfinder data setting."""
    _require_choice("INPUT.PATHFINDER_FLIP", cfg.INPUT.PATHFINDER_FLIP, (True, False))


def validate_diagnostics_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key and the allowed values for a bad ``DIAGNOSTICS`` setting."""
    d = cfg.DIAGNOSTICS
    checks = {
        "PERIOD": (d.PERIOD >= 0, "0 (off) or an integer >= 1"),
        "POWER_ITERS": (d.POWER_ITERS >= 1, "an integer >= 1"),
        "MAX_SAMPLES": (d.MAX_SAMPLES >= 0, "0 (whole batch) or an integer >= 1"),
    }
    check_keys("DIAGNOSTICS", d, checks)

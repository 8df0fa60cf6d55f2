"""Multi-process training helpers that work on the CPU (GLOO) as well as on GPUs (NCCL).

Detectron2's ``launch`` already picks NCCL when CUDA is available and GLOO otherwise, so on a
CPU-only machine ``--num-gpus N`` starts N CPU processes. Two pieces of Detectron2 assume GPUs
or a lenient exit, and are replaced here:

- ``detectron2.engine.defaults.create_ddp_model`` always passes ``device_ids=[local_rank]``,
  which ``DistributedDataParallel`` rejects for a module whose parameters live on the CPU;
  :func:`create_ddp_model` passes device ids only for a CUDA module.
- Detectron2's workers return without destroying the process group; GLOO has been seen to
  abort at interpreter teardown when a peer is already gone. :func:`shutdown_distributed` waits
  for every rank and then destroys the group, so each worker leaves in a known state.
- Workers outlive a launcher that is killed; :func:`stop_with_parent` ties them to it.
"""
from __future__ import annotations

import ctypes
import functools
import inspect
import logging
import os
import signal
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "create_ddp_model",
    "replica_fingerprints",
    "check_replicas_in_sync",
    "shutdown_distributed",
    "distributed_main",
    "stop_with_parent",
]

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Newer PyTorch renames DDP's ``broadcast_buffers`` (deprecated) to ``forward_sync_buffers``.
_HAS_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters


def _module_device(model: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module without tensors)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs: Any) -> torch.nn.Module:
    """Wrap ``model`` in ``DistributedDataParallel`` when more than one process trains.

    Same contract as Detectron2's ``create_ddp_model`` (returns ``model`` itself in a
    single-process run; ``kwargs`` go to DDP), but ``device_ids`` defaults to the local GPU only
    when the module is on a GPU: a CPU module takes none, so GLOO runs work. ``broadcast_buffers``
    is passed on as ``forward_sync_buffers`` where PyTorch has renamed it.
    """
    if comm.get_world_size() == 1:
        return model
    device = _module_device(model)
    if device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    elif kwargs.get("device_ids"):
        raise ValueError(
            f"device_ids={kwargs['device_ids']} was given for a model on {device}; DistributedDataParallel takes "
            "device ids only for CUDA modules. Drop device_ids (or move the model to its GPU first)."
        )
    if _HAS_FORWARD_SYNC and "broadcast_buffers" in kwargs:
        # Same per-forward behaviour; the buffers are also synced once at construction, which
        # gives every rank the same start (ranks are seeded differently).
        kwargs.setdefault("forward_sync_buffers", kwargs.pop("broadcast_buffers"))
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def replica_fingerprints(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every rank's fingerprint of ``model``'s parameters (gathered to all ranks; one entry when alone).

    A fingerprint is three float64 sums (plain, squared and position-weighted) over all parameter
    values; DDP replicas hold bitwise-equal weights, so their fingerprints are exactly equal.
    """
    params = [p.detach().flatten().double().cpu() for p in model.parameters()]
    vec = torch.cat(params) if params else torch.zeros(1, dtype=torch.float64)
    ramp = torch.linspace(1.0, 2.0, vec.numel(), dtype=torch.float64)
    return comm.all_gather(torch.stack([vec.sum(), vec.square().sum(), (vec * ramp).sum()]))


def check_replicas_in_sync(model: torch.nn.Module) -> None:
    """Raise ``RuntimeError`` if the ranks' copies of ``model`` differ (a collective: call it on every rank)."""
    prints = replica_fingerprints(model)
    differ = [rank for rank, fp in enumerate(prints) if not torch.equal(fp, prints[0])]
    if differ:
        raise RuntimeError(
            f"The model weights of rank(s) {differ} differ from rank 0's after training: the replicas went out of "
            "sync (a rank skipped a step the others took, or a parameter was updated outside DDP)."
        )
    if len(prints) > 1:
        logger.info(f"Model weights are identical on all {len(prints)} ranks.")


def shutdown_distributed() -> None:
    """Destroy the default process group and its subgroups (no-op without one); never raises.

    :func:`distributed_main` calls it once at the end of every worker: after a barrier when the
    worker succeeded, at once when it failed (its peers may be gone).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.destroy_process_group()
    except Exception as e:  # teardown must never mask the run's own result or error
        logger.warning(f"Destroying the process group failed: {e}")


def stop_with_parent() -> None:
    """Make this worker die with the process that launched it (Linux; a no-op elsewhere).

    Without this, killing the launcher of a ``--num-gpus N`` run (``kill -9``, a lost SSH session)
    leaves its workers training on and writing checkpoints, and a ``--resume`` started then races
    them on the same ``OUTPUT_DIR``. The kernel sends SIGKILL to the worker when its parent exits
    (``prctl(PR_SET_PDEATHSIG)``); checkpoints are written atomically, so the last one stays whole.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning(f"prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); workers may outlive the launcher.")
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def distributed_main(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a ``launch`` entry point so every rank ends with a clean process-group shutdown.

    On success all ranks meet at a barrier before the group is destroyed (a rank that finishes
    early does not pull the group down under a peer still writing its last checkpoint); on an
    error the group is destroyed at once and the error propagates, so ``launch`` reports it
    and stops the other ranks.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if comm.get_world_size() > 1:
            stop_with_parent()
        try:
            result = main(*args, **kwargs)
        except BaseException:
            shutdown_distributed()
            raise
        if dist.is_available() and dist.is_initialized():
            comm.synchronize()
        shutdown_distributed()
        return result

    return wrapper

"""Peak activation memory of one inference, counted per operator and per layer (seed 004).

:func:`peak_ram` runs ``model(*inputs)`` without gradients under a
``torch.utils._python_dispatch.TorchDispatchMode`` that records every ATen operator with the
storages it reads and writes (a view or an in-place op shares its input's storage, so it adds
nothing), and forward hooks on every submodule that name the innermost module running each op.
FX is not used: Detectron2 models branch on data and do not trace. Parameters and buffers of
``model`` are not activations and are left out. Three counts per operator:

- **operator rule** (RNNPool's reviewers quoting Chowdhery et al. 2019): the bytes of the op's
  distinct input and output storages; the peak is the maximum over ops. It does not add what
  must stay alive meanwhile (a skip connection's tensor, the caller's input), and Chowdhery's
  extra term for parallel branches is not computed: the liveness count covers both.
- **liveness**: the storages alive during the op when each is freed right after its last use
  (an ideal eager program); inputs (storages that existed before the call) and the storages of
  the returned value stay alive throughout.
- **held**: the storages eager PyTorch actually kept (freed when the last reference, Python's
  or C++'s, went: a finalizer on each storage); at least the liveness count, more where code
  keeps references longer than needed (e.g. Detectron2's FPN keeps every level's result).

What it cannot see: memory an operator allocates and frees inside its kernel (oneDNN
scratchpads, im2col buffers, reorders, BLAS packing), the allocator's rounding, alignment and
fragmentation, memory that is not a tensor storage (Python objects, kernel caches, thread
stacks), and work that does not go through the dispatcher (NumPy, OpenCV, data loading).
:func:`peak_rss_increase` measures what the process really touched; run it in a fresh process.
"""
from __future__ import annotations

import ctypes
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LayerRow", "PeakRamReport", "peak_ram", "peak_rss_increase", "format_layer_table", "plot_peak_ram"]

MIB = 2**20


@dataclass
class _Op:
    name: str
    module: str
    reads: tuple[int, ...]
    writes: tuple[int, ...]


class _Recorder(TorchDispatchMode):
    """Every dispatched op with the ids of the activation storages it reads and writes."""

    def __init__(self, excluded_ptrs: set[int]):
        super().__init__()
        self.ops: list[_Op] = []
        self.nbytes: dict[int, int] = {}
        self.born: dict[int, int] = {}  # storage id -> index of the op that allocated it (absent: it existed before)
        self.freed: dict[int, int] = {}  # storage id -> index of the first op it was no longer alive for
        self.modules: list[str] = [""]
        self._excluded = excluded_ptrs
        self._live: dict[int, int] = {}  # data pointer -> id of the live storage there
        self._finalizers: list[weakref.finalize] = []

    def storage_id(self, tensor: Any, producer: int | None = None) -> int | None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return None
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if storage.nbytes() == 0 or ptr in self._excluded:
            return None
        sid = self._live.get(ptr)
        if sid is None:
            sid = len(self.nbytes)
            self._live[ptr] = sid
            self.nbytes[sid] = storage.nbytes()
            if producer is not None:
                self.born[sid] = producer
            self._finalizers.append(weakref.finalize(storage, self._release, ptr, sid))
        else:
            self.nbytes[sid] = max(self.nbytes[sid], storage.nbytes())  # resized in place (out= ops)
        return sid

    def _release(self, ptr: int, sid: int) -> None:
        if self._live.get(ptr) == sid:
            del self._live[ptr]
        self.freed[sid] = len(self.ops)

    def detach(self) -> None:
        """Stop listening for frees (storages the caller keeps outlive the trace)."""
        for finalizer in self._finalizers:
            finalizer.detach()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        index = len(self.ops)
        reads = [self.storage_id(t) for t in tree_flatten((args, kwargs))[0]]
        out = func(*args, **kwargs)
        writes = [self.storage_id(t, producer=index) for t in tree_flatten(out)[0]]
        self.ops.append(_Op(str(func), self.modules[-1], _ids(reads), _ids(writes)))
        return out


def _ids(ids: list[int | None]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _tensors_in(value: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Tensors reachable from a returned value: containers and objects' attributes (Detectron2's Instances, Boxes)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, seen)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
        yield from _tensors_in(vars(value), seen)


@dataclass
class LayerRow:
    """Consecutive ops of one module (its path cut to ``depth`` parts): its peaks and what it hands on."""

    name: str
    first_op: int
    last_op: int
    operator_rule_bytes: int
    liveness_bytes: int
    held_bytes: int
    output_bytes: int  # storages it allocated that are read after it (or returned)


@dataclass
class PeakRamReport:
    """Per-op counts (bytes) of one inference, the layer table, and the bytes of the inputs and outputs."""

    ops: list[str]
    modules: list[str]
    operator_rule: list[int]
    liveness: list[int]
    held: list[int]
    input_bytes: int
    output_bytes: int
    layers: list[LayerRow] = field(default_factory=list)

    @property
    def operator_rule_peak(self) -> int:
        return max(self.operator_rule, default=0)

    @property
    def liveness_peak(self) -> int:
        return max(self.liveness, default=0)

    @property
    def held_peak(self) -> int:
        return max(self.held, default=0)

    def summary(self) -> dict[str, Any]:
        """Peaks in bytes and MiB, with the layer at each peak."""
        out: dict[str, Any] = {"ops": len(self.ops), "input_bytes": self.input_bytes, "output_bytes": self.output_bytes}
        for rule in ("operator_rule", "liveness", "held"):
            values = getattr(self, rule)
            peak = max(values, default=0)
            at = values.index(peak) if values else None
            out[f"{rule}_peak_bytes"] = peak
            out[f"{rule}_peak_mib"] = peak / MIB
            out[f"{rule}_peak_module"] = self.modules[at] if at is not None else None
        return out


def _intervals_to_counts(n: int, intervals: list[tuple[int, int, int]]) -> list[int]:
    """Bytes alive at each of ``n`` ops, given ``(first, last, bytes)`` intervals (inclusive)."""
    delta = [0] * (n + 1)
    for first, last, nbytes in intervals:
        if last >= first:
            delta[first] += nbytes
            delta[last + 1] -= nbytes
    counts, total = [], 0
    for d in delta[:n]:
        total += d
        counts.append(total)
    return counts


def _layer_rows(report: PeakRamReport, last_use: dict[int, int], recorder: _Recorder, kept: set[int],
                depth: int | None) -> list[LayerRow]:
    names = [".".join(m.split(".")[:depth]) if depth else m for m in report.modules]
    bounds = [i for i in range(len(names)) if i == 0 or names[i] != names[i - 1]] + [len(names)]
    row_of_op = [0] * len(names)
    for r, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        row_of_op[start:stop] = [r] * (stop - start)
    handed_on = [0] * (len(bounds) - 1)
    for s, b in recorder.born.items():
        r = row_of_op[b]
        if s in kept or last_use[s] >= bounds[r + 1]:
            handed_on[r] += recorder.nbytes[s]
    return [
        LayerRow(names[start] or "(top level)", start, stop - 1, max(report.operator_rule[start:stop]),
                 max(report.liveness[start:stop]), max(report.held[start:stop]), handed_on[r])
        for r, (start, stop) in enumerate(zip(bounds, bounds[1:]))
    ]


def peak_ram(model: nn.Module, *inputs: Any, depth: int | None = None) -> PeakRamReport:
    """Run ``model(*inputs)`` without gradients and count its activation memory per op (module docstring).

    The model runs in the mode it is in (call ``eval()`` first for inference). ``depth`` cuts module
    paths to that many parts for the layer table (``None``: the innermost module).
    """
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    recorder = _Recorder(excluded)
    names = {m: n for n, m in model.named_modules()}

    def enter(module, args):
        recorder.modules.append(names[module])

    def leave(module, args, output):
        recorder.modules.pop()

    handles = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        for tensor in tree_flatten(inputs)[0]:
            recorder.storage_id(tensor)
        with torch.no_grad(), recorder:
            output = model(*inputs)
        kept = set(_ids([recorder.storage_id(t) for t in _tensors_in(output)]))
    finally:
        for handle in handles:
            handle.remove()
        recorder.detach()

    n = len(recorder.ops)
    last_use: dict[int, int] = {}
    for i, op in enumerate(recorder.ops):
        for s in (*op.reads, *op.writes):
            last_use[s] = i
    external = [s for s in recorder.nbytes if s not in recorder.born]
    live, held = [], []
    for s, nbytes in recorder.nbytes.items():
        first = recorder.born.get(s, 0)
        alive_to_end = s in kept or s not in recorder.born
        live.append((first, n - 1 if alive_to_end else last_use.get(s, first), nbytes))
        held.append((first, recorder.freed.get(s, n) - 1, nbytes))
    report = PeakRamReport(
        ops=[op.name for op in recorder.ops],
        modules=[op.module for op in recorder.ops],
        operator_rule=[sum(recorder.nbytes[s] for s in set(op.reads) | set(op.writes)) for op in recorder.ops],
        liveness=_intervals_to_counts(n, live),
        held=_intervals_to_counts(n, held),
        input_bytes=sum(recorder.nbytes[s] for s in external),
        output_bytes=sum(recorder.nbytes[s] for s in kept),
    )
    report.layers = _layer_rows(report, last_use, recorder, kept, depth)
    return report


def format_layer_table(report: PeakRamReport, top: int | None = None) -> str:
    """Markdown table of the layers (MiB), in execution order; ``top`` keeps the rows with the largest liveness."""
    rows = report.layers
    if top is not None:
        keep = set(sorted(range(len(rows)), key=lambda i: rows[i].liveness_bytes, reverse=True)[:top])
        rows = [r for i, r in enumerate(rows) if i in keep]
    lines = ["| layer | ops | operator rule (MiB) | liveness (MiB) | held (MiB) | output (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.first_op}-{r.last_op} | {r.operator_rule_bytes / MIB:.2f} | "
                     f"{r.liveness_bytes / MIB:.2f} | {r.held_bytes / MIB:.2f} | {r.output_bytes / MIB:.2f} |")
    lines.append(f"| **whole model** | {len(report.ops)} | {report.operator_rule_peak / MIB:.2f} | "
                 f"{report.liveness_peak / MIB:.2f} | {report.held_peak / MIB:.2f} | {report.output_bytes / MIB:.2f} |")
    return "\n".join(lines)


def plot_peak_ram(reports: dict[str, PeakRamReport], path: str | Path, columns: int = 3) -> None:
    """Memory over the operator sequence (all three counts), one panel per report, its peaks and peak layer named."""
    from .figures import agg_figure

    columns = min(columns, len(reports))
    rows = -(-len(reports) // columns)
    fig = agg_figure(figsize=(5.2 * columns, 3.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, (label, report) in zip(axes.flat, reports.items()):
        x = range(len(report.ops))
        ax.plot(x, [b / MIB for b in report.held], color="tab:gray", lw=1, label="held (eager)")
        ax.plot(x, [b / MIB for b in report.liveness], color="tab:blue", lw=1.4, label="liveness (last use)")
        ax.plot(x, [b / MIB for b in report.operator_rule], color="tab:orange", lw=0.8, label="operator rule (in + out)")
        at = report.liveness.index(report.liveness_peak)
        ax.annotate(f"peak: {report.modules[at] or '(top level)'}", (at, report.liveness_peak / MIB), fontsize=7,
                    xytext=(0, 6), textcoords="offset points", ha="center", arrowprops={"arrowstyle": "-", "lw": 0.5})
        ax.text(0.02, 0.97, f"peaks (MiB): rule {report.operator_rule_peak / MIB:.1f}, liveness "
                f"{report.liveness_peak / MIB:.1f}, held {report.held_peak / MIB:.1f}", transform=ax.transAxes,
                fontsize=7, va="top")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("operator (execution order)")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, max(report.held_peak, report.operator_rule_peak, 1) / MIB * 1.25)
    for row in axes:  # panels of one row share the y scale
        top = max(ax.get_ylim()[1] for ax in row)
        for ax in row:
            ax.set_ylim(0, top)
    for ax in list(axes.flat)[len(reports):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key} line.")


def _release_free_heap() -> None:
    """Give the free memory glibc's malloc keeps back to the kernel, so reusing it cannot hide an allocation."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the measurement may undercount by the allocator's free memory


def peak_rss_increase(fn: Callable[[], Any]) -> int:
    """Peak resident memory reached while ``fn()`` runs minus the resident memory before it, in bytes.

    Linux only: returns malloc's free memory to the kernel (glibc's ``malloc_trim``), resets the
    kernel's high-water mark (``/proc/self/clear_refs``) and reads ``VmHWM``. Meant for a fresh process.
    """
    if not os.path.exists("/proc/self/clear_refs"):
        raise OSError("peak_rss_increase needs Linux's /proc/self/clear_refs and /proc/self/status.")
    _release_free_heap()
    baseline = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return _status_bytes("VmHWM") - baseline

"""Count the memory autograd keeps for the backward pass.

Every tensor an operation saves for backward passes through
``torch.autograd.graph.saved_tensors_hooks``; summing the distinct storages it sees
measures the training memory a gradient method needs, independent of the allocator.
``forward_bytes`` sums every distinct storage saved while the context was open; ``peak_bytes``
is the most held at any one time (a saved tensor is released when autograd frees the node that
saved it), which is what matters for methods that rebuild the graph step by step in backward.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


class _Held:
    """A saved tensor as autograd holds it; its release (garbage collection) lowers the live count."""

    __slots__ = ("tensor", "counter", "key", "__weakref__")

    def __init__(self, tensor: torch.Tensor, counter: "SavedTensorCounter", key: tuple[int, int]):
        self.tensor, self.counter, self.key = tensor, counter, key

    def __del__(self) -> None:
        self.counter._release(self.key)


@dataclass
class SavedTensorCounter:
    """Distinct storages saved for backward while the context was open (total and peak held)."""

    forward_bytes: int = 0
    tensors: int = 0
    live_bytes: int = 0
    peak_bytes: int = 0
    _seen: set = field(default_factory=set, repr=False)
    _holders: dict = field(default_factory=dict, repr=False)

    def pack(self, tensor: torch.Tensor) -> _Held:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.forward_bytes += storage.nbytes()
        if self._holders.get(key, 0) == 0:
            self.live_bytes += key[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._holders[key] = self._holders.get(key, 0) + 1
        self.tensors += 1
        return _Held(tensor, self, key)

    def _release(self, key: tuple[int, int]) -> None:
        count = self._holders.get(key, 0) - 1
        self._holders[key] = max(count, 0)
        if count == 0:
            self.live_bytes -= key[1]


@contextmanager
def saved_tensor_bytes() -> Iterator[SavedTensorCounter]:
    """``with saved_tensor_bytes() as c: ...``; then ``c.forward_bytes`` and ``c.peak_bytes``."""
    counter = SavedTensorCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda held: held.tensor):
        yield counter

"""Count the memory autograd keeps for the backward pass.

Every tensor an operation saves for backward passes through
``torch.autograd.graph.saved_tensors_hooks``; summing the distinct storages it sees
measures the training memory a gradient method needs, independent of the allocator.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class SavedTensorCounter:
    """Distinct storages saved for backward while the context was open."""

    forward_bytes: int = 0
    tensors: int = 0
    _seen: set = field(default_factory=set, repr=False)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.forward_bytes += storage.nbytes()
        self.tensors += 1
        return tensor


@contextmanager
def saved_tensor_bytes() -> Iterator[SavedTensorCounter]:
    """``with saved_tensor_bytes() as c: ...``; then ``c.forward_bytes`` is the total."""
    counter = SavedTensorCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        yield counter

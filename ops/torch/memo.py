"""`PerTensor`: a function of a tensor computed once per tensor, remembered for the last few by identity.

A forward hands the same few tensors (a packed row's `cu_seqlens`, the vision tower's window and frame
segments) to every layer. What a layer derives from them on the host (a longest length, a CPU copy, a
gather layout) is then computed once per forward instead of once per layer and pass, each time saving
a device read that would drain the launch queue.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch

T = TypeVar("T")


class PerTensor(Generic[T]):
    def __init__(self, fn: Callable[[torch.Tensor], T], size: int = 4):
        self.fn, self.size = fn, size
        self.entries: list[tuple[torch.Tensor, T]] = []  # holding the tensor keeps its id from being reused

    @torch.compiler.disable  # host-side bookkeeping: compiled callers run it eagerly, no guards on the cache
    def __call__(self, tensor: torch.Tensor) -> T:
        for key, value in self.entries:
            if key is tensor:
                return value
        value = self.fn(tensor)
        self.entries = [(tensor, value)] + self.entries[: self.size - 1]
        return value

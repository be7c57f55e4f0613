"""Dropout on a delta's input, drawn once per input tensor and shared by sibling deltas.

q, k and v read the same x, and so do gate and up. Per-delta dropout (HF PEFT) draws and keeps a separate
copy of x for each of them; here the first delta to see x draws dropout(x) and its siblings reuse that
tensor, so a layer keeps one copy (and one mask) per distinct input instead of one per delta.

The cache maps an input tensor *object* to its dropped copy. Entries hold x weakly and die with it, so
nothing outlives the forward that made it; a small bound caps the rare case where x stays alive through
its own graph. The sequence of random draws depends only on the order of calls, so gradient-checkpointing
recomputation (which replays the RNG state) reproduces the same masks.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class DropoutCache:
    """dropout(x) per (input tensor, p, grad mode), shared by every SharedDropout attached to this cache."""

    max_entries = 8  # live inputs at once are few (attention input, FFN input); the bound only stops leaks

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._entries: OrderedDict = OrderedDict()  # key -> (weakref to x, dropout(x))

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if not self.enabled:
            return F.dropout(x, p, True)
        key = (id(x), p, torch.is_grad_enabled())
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is x:
            return hit[1]
        y = F.dropout(x, p, True)
        entries = self._entries
        entries[key] = (weakref.ref(x, lambda _, k=key: entries.pop(k, None)), y)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        return y


class SharedDropout(nn.Module):
    """nn.Dropout(p) that reads its mask from a DropoutCache when one is attached (else a plain dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.cache: DropoutCache | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.cache is None:
            return F.dropout(x, self.p, True)
        return self.cache.dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared={self.cache is not None and self.cache.enabled}"


def set_shared_dropout(model: nn.Module, enabled: bool) -> None:
    """Turn sharing on (default) or off for every SharedDropout in `model` (off: one draw per delta, as HF PEFT)."""
    for m in model.modules():
        if isinstance(m, SharedDropout) and m.cache is not None:
            m.cache.enabled = enabled
            m.cache.clear()

"""Dropout on a delta's input, drawn once per input tensor and shared by sibling deltas.

q, k and v read the same x, and so do gate and up. Per-delta dropout (HF PEFT) draws and keeps a separate
copy of x for each of them; here the first delta to see x draws dropout(x) and its siblings reuse that
tensor, so a layer keeps one copy (and one mask) per distinct input instead of one per delta.

The cache maps an input tensor *object* and a scope (the transformer block holding the site's linear,
`positions.weight.sharing_scope`) to its dropped copy. Entries hold x weakly and die with it, so nothing outlives
the forward that made it; a small bound caps the rare case where x stays alive through its own graph. Gradient-
checkpointing recomputation replays the RNG state, and it must also replay the draws: a delta that reads x a second
time draws again instead of taking the entry (BERT's q, k and v read the checkpointed layer's own input, the same
tensor in the forward and the recompute), and deltas of different scopes never share a draw (T5's decoder layers all
read the encoder output: a mask drawn in one layer's checkpoint region and taken in another's would be drawn in the
second one's recompute). Either way torch's checkpoint raised CheckpointError.

On CPU the mask comes from 16 random bits per element (`random_` on int64 words, four elements a draw)
instead of torch's `bernoulli_`, which is serial and ~10 ns per element off Intel's MKL path: the drop
rate is p rounded to a multiple of 2⁻¹⁶ (0.05 → 0.0500031) and the kept values are scaled by 1/(1−p)
for that rate. The same default generator is used, so `torch.manual_seed` and checkpoint replay hold.
The kernel leaves the 1/(1−p') scale out (`masked`): low-rank deltas fold it into the scalar of their addmm
(s·c·(y·Aᵀ)·Bᵀ = s·(c·y)·Aᵀ·Bᵀ), which saves a pass over x forward and one over its gradient backward.

Under `torch.compile` the cache is bypassed and torch's dropout is used (the compiler fuses it and draws from its
own generator): each delta draws its own mask there, as in HF PEFT.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class _Mask16(torch.autograd.Function):
    """y = x · keep, keep = 16 random bits ≥ p'·2¹⁶ (saves the bool mask, 1 byte per element). The 1/(1 − p')
    scale is left to the caller: a low-rank delta folds it into its addmm's alpha, so neither forward nor
    backward spends a pass over x multiplying by it."""

    @staticmethod
    def forward(ctx, x, p):
        n = x.numel()
        cut = round(p * 65536)
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2 ** 63), None)
        keep = words.view(torch.int16)[:n].view(x.shape) >= cut - 32768  # P(keep) = 1 − cut/65536
        ctx.save_for_backward(keep)
        return torch.where(keep, x, 0)  # where: float × bool multiplies take a slow casting path

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, g, 0), None


def masked(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(y, c) with dropout(x) = c·y: training-mode dropout with its scale c = 1/(1 − p') not yet applied (CPU's
    16-bit-mask kernel); elsewhere torch's dropout (fused, fast on GPUs), already scaled (c = 1)."""
    if p <= 0:
        return x, 1.0
    if x.device.type == "cpu" and x.is_floating_point() and not torch.compiler.is_compiling():
        return _Mask16.apply(x, p), 65536.0 / (65536 - round(p * 65536))
    return F.dropout(x, p, True), 1.0


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout: the 16-bit-mask kernel on CPU, torch's elsewhere."""
    y, c = masked(x, p)
    return y if c == 1.0 else y.mul_(c)


class DropoutCache:
    """dropout(x) per (input tensor, p, grad mode, scope), shared by every SharedDropout attached to this cache."""

    max_entries = 8  # live inputs at once are few (attention input, FFN input); the bound only stops leaks

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._entries: OrderedDict = OrderedDict()  # key -> (weakref to x, dropout(x), readers as weakrefs)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def masked(self, x: torch.Tensor, p: float, reader=None, scope=None) -> tuple[torch.Tensor, float]:
        """`masked(x, p)`, drawn once per input tensor and scope (again when `reader` reads x a second time)."""
        if not self.enabled or torch.compiler.is_compiling():
            return masked(x, p)
        return self._get(x, p, False, lambda: masked(x, p), reader, scope)

    def dropout(self, x: torch.Tensor, p: float, reader=None, scope=None) -> torch.Tensor:
        """dropout(x), with the same mask as `masked(x, p)` of the same input."""
        if not self.enabled or torch.compiler.is_compiling():
            return dropout(x, p)

        def scaled():
            y, c = self.masked(x, p, reader, scope)
            return y if c == 1.0 else y * c
        return self._get(x, p, True, scaled, reader, scope)

    def _get(self, x, p, scaled, make, reader, scope):
        key = (id(x), p, torch.is_grad_enabled(), scaled, scope)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is x:
            readers = hit[2]
            if reader is None:
                return hit[1]
            if not any(r() is reader for r in readers):
                readers.append(weakref.ref(reader))
                return hit[1]
            # `reader` drew or took this before: a new pass over the same tensor (a checkpoint recompute, an input
            # reused across calls), which draws again as the first pass did
        y = make()
        entries = self._entries
        entries[key] = (weakref.ref(x, lambda _, k=key: entries.pop(k, None)), y,
                        [] if reader is None else [weakref.ref(reader)])
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        return y


class SharedDropout(nn.Module):
    """nn.Dropout(p) that reads its mask from a DropoutCache when one is attached (else a plain dropout); `scope`
    (set with the cache) limits sharing to deltas of one transformer block."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.cache: DropoutCache | None = None
        self.scope: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.cache is None:
            return dropout(x, self.p)
        return self.cache.dropout(x, self.p, self, self.scope)

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(y, c) with forward(x) = c·y (see `masked`), from the cache when one is attached."""
        if not self.training or self.p == 0:
            return x, 1.0
        if self.cache is None:
            return masked(x, self.p)
        return self.cache.masked(x, self.p, self, self.scope)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared={self.cache is not None and self.cache.enabled}"


def set_shared_dropout(model: nn.Module, enabled: bool) -> None:
    """Turn sharing on (default) or off for every SharedDropout in `model` (off: one draw per delta, as HF PEFT)."""
    for m in model.modules():
        if isinstance(m, SharedDropout) and m.cache is not None:
            m.cache.enabled = enabled
            m.cache.clear()

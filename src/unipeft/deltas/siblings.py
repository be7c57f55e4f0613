"""Sibling low-rank deltas that read the same x project it in one matmul: z = dropout(x)·[A₁; A₂; …]ᵀ.

q, k and v (and gate, up) each compute dropout(x)·Aᵢᵀ, a thin matmul that reads all of x for r outputs.
Stacking their A's reads x once forward and once backward (for ∂A), and the backward returns one ∂x
instead of one per sibling plus the additions that sum them.

Which deltas read the same x is learned from the calls, and a learned group takes effect checkpoint-safely
(`same_input.py`): the first of a group to see an input projects it for the whole group; the others take their
slice. Under `torch.compile` the compiled graph holds one plain projection per delta (the compiler schedules the
matmuls itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .same_input import SameInputGroups


class SiblingProjections(SameInputGroups):
    def project(self, delta, x: torch.Tensor, dropped=None) -> torch.Tensor:
        """dropout(x)·Aᵀ of `delta` (…, r), computed with its group's when it has one."""
        z, c = self.project_masked(delta, x, dropped)
        return z if c == 1.0 else z * c

    def project_masked(self, delta, x: torch.Tensor, dropped=None) -> tuple[torch.Tensor, float]:
        """(z, c) with dropout(x)·Aᵀ = c·z: the dropout's scale c left to the caller (see dropout.masked).
        `dropped`: the (y, c) the delta already read from its dropout for this x (read once per call)."""
        if not self.active():
            y, c = dropped or _masked(delta, x)
            return F.linear(y, delta.A.to(x.dtype)), c
        readers, left = self.read(delta, x, delta.training)
        zc = left.pop(id(delta), None)
        if zc is None:
            group = self.group_of(delta)
            y, c = dropped or _masked(delta, x)
            if len(group) > 1:
                A = torch.cat([d.A.to(x.dtype) for d in group])  # (Σr, in)
                parts = F.linear(y, A).split([d.r for d in group], -1)
                for d, zd in zip(group, parts):
                    if d is delta:
                        zc = (zd, c)
                    else:
                        left[id(d)] = (zd, c)
            else:
                zc = (F.linear(y, delta.A.to(x.dtype)), c)
            self.computed(delta, readers, zc[0])
        return zc

    def compatible(self, group) -> bool:
        return _compatible(group)


def _masked(delta, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The delta's dropout of x as (y, c), dropout(x) = c·y; a dropout without `masked` (Identity) gives c = 1."""
    masked = getattr(delta.dropout, "masked", None)
    return masked(x) if masked is not None else (delta.dropout(x), 1.0)


def _compatible(group) -> bool:
    """One dropout(x) for all (none, or one shared draw) and one matmul: same rate, cache, device, mode."""
    d0 = group[0]
    p0, cache0 = getattr(d0.dropout, "p", 0.0), getattr(d0.dropout, "cache", None)
    if p0 > 0 and (cache0 is None or not cache0.enabled):
        return False  # each delta draws its own mask: nothing to share
    return all(getattr(d.dropout, "p", 0.0) == p0 and getattr(d.dropout, "cache", None) is cache0
               and d.A.device == d0.A.device and d.training == d0.training for d in group)

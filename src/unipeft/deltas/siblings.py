"""Sibling low-rank deltas that read the same x project it in one matmul: z = dropout(x)·[A₁; A₂; …]ᵀ.

q, k and v (and gate, up) each compute dropout(x)·Aᵢᵀ, a thin matmul that reads all of x for r outputs.
Stacking their A's reads x once forward and once backward (for ∂A), and the backward returns one ∂x
instead of one per sibling plus the additions that sum them.

Which deltas read the same x is learned from the calls: deltas that read one tensor in a forward pass
form a group, and from then on the first of them to see an input projects it for the whole group; the
others take their slice. A delta outside the group, or a group member that never comes, changes nothing
but the work done. Entries hold x weakly and die with it, and last one pass (`new_pass()` drops them; a delta
reading the same x again starts its entry over), so a projection is never served across an optimizer step;
groups hold deltas weakly.

When a learned group takes effect: at the start of a later forward pass of the model (`new_pass()`, called by
a pre-hook on the model root), and only once the backward pass of the forward that found it has reached the
group (a gradient hook on its projection), or at once when no gradient was recorded. So a gradient-checkpointing
recompute always makes the same choices as the forward it replays, even with several forwards before one
backward.

Under `torch.compile` none of this runs (`torch.compiler.is_compiling()`): the compiled graph holds one plain
projection per delta — identity-keyed caches and weak references are eager-mode bookkeeping that a traced graph
cannot express, and the compiler schedules the matmuls itself.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F


class SiblingProjections:
    max_entries = 8

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._groups: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # delta -> tuple of weakrefs
        self._pending: list = []  # [group refs, ready]: learned, not yet in effect
        self._entries: OrderedDict = OrderedDict()  # key -> (weakref x, readers, {id(delta): z})

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._groups.clear()
        self._pending.clear()

    def project(self, delta, x: torch.Tensor) -> torch.Tensor:
        """dropout(x)·Aᵀ of `delta` (…, r), computed with its group's when it has one."""
        z, c = self.project_masked(delta, x)
        return z if c == 1.0 else z * c

    def project_masked(self, delta, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(z, c) with dropout(x)·Aᵀ = c·z: the dropout's scale c left to the caller (see dropout.masked)."""
        if not self.enabled or torch.compiler.is_compiling():
            y, c = _masked(delta, x)
            return F.linear(y, delta.A.to(x.dtype)), c
        key = (id(x), torch.is_grad_enabled(), delta.training)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not x:
            entries = self._entries
            entry = entries[key] = (weakref.ref(x, lambda _, k=key: entries.pop(k, None)), [], {})
            while len(entries) > self.max_entries:
                entries.popitem(last=False)
        readers, ready = entry[1], entry[2]
        if any(r() is delta for r in readers):
            # this delta read x before: a new pass over the same tensor (an input reused across calls). Start over,
            # or the readers would grow with every call, and a projection left by a member that did not come would
            # be served later, made with A's since updated
            readers.clear()
            ready.clear()
        readers.append(weakref.ref(delta))
        zc = ready.pop(id(delta), None)
        if zc is None:
            group = self._group_of(delta)
            y, c = _masked(delta, x)
            if len(group) > 1:
                A = torch.cat([d.A.to(x.dtype) for d in group])  # (Σr, in)
                parts = F.linear(y, A).split([d.r for d in group], -1)
                for d, zd in zip(group, parts):
                    if d is delta:
                        zc = (zd, c)
                    else:
                        ready[id(d)] = (zd, c)
            else:
                zc = (F.linear(y, delta.A.to(x.dtype)), c)
        if len(readers) > 1 and delta not in self._groups:
            self._learn(readers, zc[0])
        return zc

    def _group_of(self, delta) -> tuple:
        refs = self._groups.get(delta, ())
        group = tuple(r() for r in refs)
        if not group or any(d is None for d in group) or not _compatible(group):
            return (delta,)
        return group

    def _learn(self, readers, z: torch.Tensor) -> None:
        group = tuple(r() for r in readers)
        if any(d is None for d in group) or len({id(d) for d in group}) != len(group) or not _compatible(group):
            return
        pending = [tuple(readers), not torch.is_grad_enabled()]
        self._pending.append(pending)
        if not pending[1] and z.requires_grad:
            z.register_hook(lambda grad: pending.__setitem__(1, True))  # backward of this forward got here

    def new_pass(self) -> None:
        """A forward pass of the model begins: groups whose finding forward is done take effect."""
        if torch.compiler.is_compiling():
            return
        self._entries.clear()  # projections are shared within one pass; none is served to a later one
        if not self._pending:
            return
        waiting = []
        for item in self._pending:
            refs, ready = item
            if not ready:
                waiting.append(item)  # the same list its gradient hook will mark
                continue
            for r in refs:
                d = r()
                if d is not None:
                    self._groups[d] = refs
        self._pending = waiting[-64:]  # a group whose backward never comes is dropped eventually


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

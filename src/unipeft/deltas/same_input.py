"""Members (deltas, linears) that read the same x in a forward pass, learned from the calls, so that the first of a
group to see an input computes for all of them and the others take what it left (`siblings.py`: one projection
x·[A₁; A₂; …]ᵀ; `positions/host_group.py`: q, k, v computed in one autograd node).

Members of one scope (`set_scope`: the sites give their linear's parent module, e.g. one layer's self_attn) that read
one tensor in a forward pass form a group. Never across scopes: T5's decoder layers all read the encoder's output,
and a group spanning two layers would compute the second layer's result inside the first layer's gradient-checkpoint
region, so the second layer's recompute (which computes it) would save other tensors than its forward (which took
it), and torch's checkpoint refuses that. A member outside the group, or a group member that never
comes, changes nothing but the work done. Entries hold x weakly and die with it, and last one pass (`new_pass()` drops
them; a member reading the same x again starts its entry over), so nothing computed is served across an optimizer
step; groups hold members weakly.

When a learned group takes effect: at the start of a later forward pass of the model (`new_pass()`, called by a
pre-hook on the model root), and only once the backward pass of the forward that found it has reached the group (a
gradient hook on the result of the member that completed it), or at once when no gradient was recorded. So a
gradient-checkpointing recompute always makes the same choices as the forward it replays, even with several forwards
before one backward.

Under `torch.compile` none of this runs (callers check `torch.compiler.is_compiling()`): identity-keyed caches and
weak references are eager-mode bookkeeping that a traced graph cannot express.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch


class SameInputGroups:
    max_entries = 8

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._groups: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # member -> tuple of weakrefs
        self._pending: list = []  # [group refs, ready]: learned, not yet in effect
        self._entries: OrderedDict = OrderedDict()  # key -> (weakref x, readers, {id(member): what was left})
        self._scopes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # member -> its scope

    def set_scope(self, member, scope: str) -> None:
        """Only members of one scope group together (see the module doc); members never given one share scope None."""
        self._scopes[member] = scope

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._groups.clear()
        self._pending.clear()

    def active(self) -> bool:
        return self.enabled and not torch.compiler.is_compiling()

    def read(self, member, x: torch.Tensor, mode) -> tuple[list, dict]:
        """Record `member` as a reader of x in this pass: (the readers so far, what group computations left, by
        id(member)). `mode` is what else must match for a result to be shared (a delta's training flag)."""
        key = (id(x), torch.is_grad_enabled(), mode)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not x:
            entries = self._entries
            entry = entries[key] = (weakref.ref(x, lambda _, k=key: entries.pop(k, None)), [], {})
            while len(entries) > self.max_entries:
                entries.popitem(last=False)
        readers, left = entry[1], entry[2]
        if any(r() is member for r in readers):
            # this member read x before: a new pass over the same tensor (an input reused across calls). Start over,
            # or the readers would grow with every call, and a result left for a member that did not come would be
            # served later, made with weights since updated
            readers.clear()
            left.clear()
        readers.append(weakref.ref(member))
        return readers, left

    def learn(self, member, readers: list, result: torch.Tensor) -> None:
        """After `member` computed `result` on its own: if others read the same x before it, they and it form a group
        that takes effect once the backward pass reaches `result` (see the module doc)."""
        if len(readers) < 2 or member in self._groups:
            return
        alive = [r() for r in readers]
        if any(d is None for d in alive):
            return
        scope = self._scopes.get(member)
        refs = tuple(r for r, d in zip(readers, alive) if self._scopes.get(d) == scope)
        group = tuple(r() for r in refs)
        if len(group) < 2 or len({id(d) for d in group}) != len(group) or not self.compatible(group):
            return
        pending = [refs, not torch.is_grad_enabled()]
        self._pending.append(pending)
        if not pending[1] and result.requires_grad:
            result.register_hook(lambda grad: pending.__setitem__(1, True))  # backward of this forward got here

    def group_of(self, member) -> tuple:
        """The member's group in effect (itself alone when it has none, or one of its members is gone or no longer
        compatible)."""
        refs = self._groups.get(member, ())
        group = tuple(r() for r in refs)
        if not group or any(d is None for d in group) or not self.compatible(group):
            return (member,)
        return group

    def compatible(self, group: tuple) -> bool:
        """Whether one computation can serve the group (subclasses say what must match)."""
        return True

    def new_pass(self) -> None:
        """A forward pass of the model begins: groups whose finding forward is done take effect."""
        if torch.compiler.is_compiling():
            return
        self._entries.clear()  # results are shared within one pass; none is served to a later one
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

"""Members (deltas, linears) that read the same x in a forward pass, learned from the calls, so that the first of a
group to see an input computes for all of them and the others take what it left (`siblings.py`: one projection
x·[A₁; A₂; …]ᵀ; `positions/host_group.py`: q, k, v computed in one autograd node).

Members of one scope (`set_scope`: the sites give the transformer block holding their linear,
`positions.weight.sharing_scope`) that read one tensor in a forward pass form a group. Never across scopes: T5's
decoder layers all read the encoder's output, and a group spanning two layers would compute the second layer's
result inside the first layer's gradient-checkpoint region, so the second layer's recompute (which computes it)
would save other tensors than its forward (which took it), and torch's checkpoint refuses that. A member outside the
group, or a group member that never comes, changes nothing but the work done. Entries hold x weakly and die with it,
and last one pass (`new_pass()` drops them; a member reading the same x again starts its entry over), so nothing
computed is served across a model call (within one, writes through `.data` are not seen, as autograd does not see
them either).

When a learned group takes effect: at the start of a forward pass of the model (`new_pass()`, called by a pre-hook
on the model root) when no earlier forward that recorded gradients here is still open: its backward has not yet
reached the first result this object computed in it (a gradient hook), and its graph is alive. So a gradient-
checkpointing recompute makes the choices of the forward it replays, whatever runs in between (evaluation,
generation, a reference model's forward). A forward whose backward never comes stops holding groups back when its
graph is freed (or after 64 passes); a graph kept (retain_graph) and backwarded again after later forwards put
groups in effect is not covered. Groups are learned in any forward, with or without gradients: serving an adapter
computes its groups too.

Under `torch.compile` none of this runs (callers check `torch.compiler.is_compiling()`): identity-keyed caches and
weak references are eager-mode bookkeeping that a traced graph cannot express.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch


class _GraphToken:
    """Held by a gradient hook only: it dies with the autograd graph holding that hook."""


class SameInputGroups:
    max_entries = 8
    max_open = 64

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._groups: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # member -> tuple of weakrefs
        self._pending: dict = {}  # (id of each member) -> group refs: learned, not yet in effect
        self._entries: OrderedDict = OrderedDict()  # key -> (weakref x, readers, {id(member): what was left})
        self._scopes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # member -> its scope
        self._open: list = []  # [backward reached, pass number, hooked] per forward that recorded gradients here
        self._pass: list | None = None  # this pass's entry of _open (None: a forward without gradients)
        self._passes = 0

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

    def computed(self, member, readers: list, result: torch.Tensor) -> None:
        """After `member` computed `result` (on its own or for its group): the first result of a forward that records
        gradients keeps it open until the backward reaches it; and if others of its scope read the same x before it
        and it has no group, they and it form one, which takes effect once no open forward is left."""
        mark = self._pass
        if mark is not None and not mark[2] and result.requires_grad:
            mark[2] = True
            # closed when the backward gets here, or when the graph holding the hook is freed without one
            token = _GraphToken()
            weakref.finalize(token, mark.__setitem__, 0, True)
            result.register_hook(lambda grad, token=token: mark.__setitem__(0, True))
        if len(readers) < 2 or member in self._groups:
            return
        alive = [r() for r in readers]
        if any(d is None for d in alive):
            return
        scope = self._scopes.get(member)
        refs = tuple(r for r, d in zip(readers, alive) if self._scopes.get(d) == scope)
        group = tuple(r() for r in refs)
        if len(group) >= 2 and len({id(d) for d in group}) == len(group) and self.compatible(group):
            self._pending.pop(tuple(map(id, group)), None)  # learned again: it moves to the end
            self._pending[tuple(map(id, group))] = refs

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
        """A forward pass of the model begins: learned groups take effect if no forward is still open."""
        if torch.compiler.is_compiling():
            return
        self._entries.clear()  # results are shared within one pass; none is served to a later one
        self._passes += 1
        # a forward with no result that needed a gradient here has no backward through us to wait for
        self._open = [m for m in self._open if not m[0] and m[2] and self._passes - m[1] <= self.max_open]
        # the pre-hook runs inside the model call: its grad mode is the forward's. A recompute during a later
        # backward computes inside whichever pass is current then, and opens nothing
        self._pass = [False, self._passes, False] if torch.is_grad_enabled() else None
        if self._pass is not None:
            self._open.append(self._pass)
        if not self._pending or any(m is not self._pass for m in self._open):
            return
        for refs in self._pending.values():  # in learning order: a later, larger group (q,k then q,k,v) wins
            for r in refs:
                d = r()
                if d is not None:
                    self._groups[d] = refs
        self._pending = {}

"""Handle: what inject() did to a model — the sites it installed, the head copies, the base parameters it made
trainable, other undoable changes — and how to merge, disable or undo it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .deltas.base import delta_parameters
from .positions import LinearDeltaSite, Site, Switch
from .spec import Compose


@dataclass
class Handle:
    """What inject() did to a model, and how to undo it."""

    model: nn.Module
    sites: list[Site] = field(default_factory=list)
    copies: list = field(default_factory=list)  # TrainableCopy
    trainable_base: list = field(default_factory=list)  # (name, param, snapshot) base params made trainable
    extras: list = field(default_factory=list)  # other undoable changes (root deltas, attention seam, hooks)
    switch: Switch = field(default_factory=Switch)

    # ownership ---------------------------------------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter this adapter owns, by its path in the model (ownership, never name patterns)."""
        owned = {id(p) for s in self.sites for _, p in delta_parameters(s.delta)}
        owned |= {id(p) for c in self.copies for p in c.copy.parameters()}
        owned |= {id(p) for _, p, _ in self.trainable_base}
        return {n: p for n, p in self.model.named_parameters(remove_duplicate=False) if id(p) in owned}

    def mark_trainable(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.adapter_parameters().values():
            p.requires_grad_(True)

    # on / off, merge ---------------------------------------------------------------------------------
    def set_enabled(self, on: bool) -> None:
        self.switch.on = on
        for c in self.copies:
            c.set_enabled(on)

    def merge(self) -> None:
        mergeable = [s for s in self.sites if not s.merged]
        for s in mergeable:  # check all first: merging is all or nothing
            if not _can_merge(s):
                s.merge()  # raises the delta's clear error
        for s in mergeable:
            s.merge()

    def unmerge(self) -> None:
        for s in self.sites:
            s.unmerge()

    @property
    def merged(self) -> bool:
        return bool(self.sites) and all(s.merged for s in self.sites)

    def remove(self) -> nn.Module:
        """Undo everything: hooks, delta modules, head copies, trained base params (restored from snapshots)."""
        for s in reversed(self.sites):
            if s.merged:
                s.unmerge()
            s.remove()
            restore = getattr(s.delta, "restore_host", None)
            if restore is not None:  # host weights an init changed (PiSSA, OLoRA): back to the original bits
                restore()
        for c in self.copies:
            c.remove()
        for e in reversed(self.extras):
            e.remove()
        with torch.no_grad():
            for _, p, snap in self.trainable_base:
                p.copy_(snap)
                p.requires_grad_(False)
        self.sites, self.copies, self.trainable_base, self.extras = [], [], [], []
        return self.model

    def unload(self, merge: bool) -> nn.Module:
        """Drop the adapter machinery, keeping merged weights (merge_and_unload) or the base (unload)."""
        if merge:
            self.merge()
        for s in reversed(self.sites):
            s.remove()
        for c in self.copies:  # the trained heads stay in the model
            c.keep()
        for e in reversed(self.extras):
            e.remove()
        self.sites, self.copies, self.trainable_base, self.extras = [], [], [], []
        return self.model


def _can_merge(site) -> bool:
    return isinstance(site, LinearDeltaSite) and (site.ins.compose == Compose.MULTIPLY or site.delta.can_merge())

"""`modules_to_save`: a trainable copy of a whole module (a task head) swapped in for the original.

The original object is kept untouched and swapped back by `disable()`/`remove()`, so disabling the adapter
or removing it restores the base model bit-exactly. State-dict keys stay the original module's.
"""

from __future__ import annotations

import copy

from torch import nn


class TrainableCopy:
    def __init__(self, parent: nn.Module, attr: str, name: str):
        self.parent, self.attr, self.name = parent, attr, name
        self.original = parent._modules[attr]
        self.copy = copy.deepcopy(self.original)
        for p in self.copy.parameters():
            p.requires_grad_(True)
        parent._modules[attr] = self.copy

    def set_enabled(self, on: bool) -> None:
        self.parent._modules[self.attr] = self.copy if on else self.original

    def remove(self) -> nn.Module:
        self.parent._modules[self.attr] = self.original
        return self.copy

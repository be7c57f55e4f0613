"""`modules_to_save`: a trainable copy of a whole module (a task head) swapped in for the original.

The original object is kept untouched and swapped back by `disable()`/`remove()`, so disabling the adapter
or removing it restores the base model bit-exactly. State-dict keys stay the original module's.

With `dtype` (fp32 over a half-precision base) the copy's floating parameters are stored and computed in that
dtype: its inputs are cast to it and its output back to the input's dtype, so the rest of the model is unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class TrainableCopy:
    def __init__(self, parent: nn.Module, attr: str, name: str, dtype: torch.dtype | None = None):
        self.parent, self.attr, self.name = parent, attr, name
        self.original = parent._modules[attr]
        self.copy = copy.deepcopy(self.original)
        if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in self.copy.parameters()):
            self.copy.to(dtype)  # floating tensors only; .to(dtype) leaves integer buffers alone
            self.copy.register_forward_pre_hook(_cast_inputs(dtype))
            self.copy.register_forward_hook(_cast_output_back)
        for p in self.copy.parameters():
            p.requires_grad_(True)
        parent._modules[attr] = self.copy

    def set_enabled(self, on: bool) -> None:
        self.parent._modules[self.attr] = self.copy if on else self.original

    def remove(self) -> nn.Module:
        self.parent._modules[self.attr] = self.original
        return self.copy


def _cast_inputs(dtype: torch.dtype):
    def pre(module, args):
        module._unipeft_in_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    return pre


def _cast_output_back(module, args, out):
    dt = module.__dict__.pop("_unipeft_in_dtype", None)
    if dt is None or not torch.is_tensor(out) or not out.is_floating_point():
        return out
    return out.to(dt)

"""`modules_to_save`: trainable copies of a whole module (a task head), HF PEFT's ModulesToSaveWrapper layout.

The head is replaced by a `HeadCopies` module holding the untouched original at `<head>.original_module` and
each adapter's trainable copy at `<head>.modules_to_save.<adapter>`. Both live in the module tree, so `.to()`,
`.double()` or `.half()` after injection move the original too (disable_adapter() and unload() then give a
head on the model's device and dtype). Forward runs the copy of the active adapter, or the original when
none is active. Removing the last copy puts the original object back; checkpoint keys stay the head's own.

With `dtype` (fp32 over a half-precision base) a copy's floating parameters are stored and computed in that
dtype: its inputs are cast to it and its output back to the input's dtype, so the rest of the model is unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..distributed.gather import sharding_of


class HeadCopies(nn.Module):
    unipeft_internal = True  # neither the copies nor the original are targets of another adapter (arch.resolve)

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.use: str | None = None  # the adapter whose copy runs; None: the original
        self.groups: list | None = None  # mixed-adapter batch: [(adapter or None, rows)] covering every row

    @property
    def current(self) -> nn.Module:
        return self.modules_to_save[self.use] if self.use is not None else self.original_module

    def forward(self, *args, **kwargs):
        if self.groups is None:
            return self.current(*args, **kwargs)
        x, rest = args[0], args[1:]  # a mixed-adapter batch: each group of rows through its own head
        copies, out = self.modules_to_save, None
        for adapter, rows in self.groups:
            head = copies[adapter] if adapter is not None else self.original_module
            y = head(x[rows], *rest, **kwargs)
            out = y.new_zeros((x.shape[0],) + y.shape[1:]) if out is None else out
            out = out.index_put((rows,), y)
        return out

    def __getattr__(self, name: str):  # e.g. model code reading `score.weight.dtype`
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current, name)


class TrainableCopy:
    def __init__(self, parent: nn.Module, attr: str, name: str, adapter: str = "default",
                 dtype: torch.dtype | None = None):
        self.parent, self.attr, self.name, self.adapter = parent, attr, name, adapter
        held = parent.get_submodule(attr)
        if not isinstance(held, HeadCopies):
            held = HeadCopies(held)
        if adapter in held.modules_to_save:
            raise ValueError(f"{name} already holds a copy for adapter {adapter!r}")
        self.wrapper, self.original = held, held.original_module
        _refuse_partitioned(self.original, name)
        self.copy = copy.deepcopy(self.original)
        if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in self.copy.parameters()):
            self.copy.to(dtype)  # floating tensors only; .to(dtype) leaves integer buffers alone
            self.copy.register_forward_pre_hook(_cast_inputs(dtype))
            self.copy.register_forward_hook(_cast_output_back)
        for p in self.copy.parameters():
            p.requires_grad_(True)
        held.modules_to_save[adapter] = self.copy
        held.use = adapter
        setattr(parent, attr, held)

    def set_enabled(self, on: bool) -> None:
        if on:
            self.wrapper.use = self.adapter
        elif self.wrapper.use == self.adapter:
            self.wrapper.use = None

    def remove(self) -> nn.Module:
        """Drop this adapter's copy; the last one out puts the original module back. Returns the copy."""
        w = self.wrapper
        if self.adapter in w.modules_to_save and w.modules_to_save[self.adapter] is self.copy:
            del w.modules_to_save[self.adapter]
        if w.use == self.adapter:
            w.use = None
        if not len(w.modules_to_save) and dict(self.parent.named_children()).get(self.attr) is w:
            setattr(self.parent, self.attr, self.original)
        return self.copy

    def keep(self) -> nn.Module:
        """Put this adapter's trained copy in place of the head (merge_and_unload)."""
        self.remove()
        setattr(self.parent, self.attr, self.copy)
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


def _refuse_partitioned(module: nn.Module, name: str) -> None:
    """A copy of a DeepSpeed ZeRO-3 partitioned module would hold the empty partitions, not the weights."""
    empty = [n for n, p in module.named_parameters() if sharding_of(p) == "zero3"]
    if empty:
        raise ValueError(
            f"{name} is partitioned by DeepSpeed ZeRO-3 ({', '.join(empty)} hold only this process's partition), so "
            f"its trainable copy (modules_to_save) cannot be made from its weights. Load the base model whole — "
            f"create it before the ZeRO-3 config is active (before HfDeepSpeedConfig / TrainingArguments with a "
            f"stage-3 deepspeed config), apply the adapter, then let DeepSpeed partition it when the engine is "
            f"prepared; `unipeft train --distributed zero3` does this")

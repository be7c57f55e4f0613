"""A Site is one installed insertion: its delta, where it acts, and how to undo it. `Site` is the protocol that
generic code (Handle, PeftModel, state dicts, mixed batches) relies on; three kinds implement it:

    ModuleSite      (here) a delta on one module, acting through that module's hooks: LinearDeltaSite
                    (weight.py, fused.py) and SublayerDeltaSite (residual.py)
    AttentionKVSite (attention_kv.py) a prefix read by one attention through the attention seam
    InputSite       (input.py) virtual tokens placed in the model's input

Module sites' deltas are registered as children of the module they modify (so `state_dict`, `.to()` and `parameters()`
see them) and act through forward hooks; the model's own modules are never replaced, so base keys keep
their names and `remove()` restores the model object-for-object. (On CUDA a plain linear's LoRA may be computed by
an instance `forward` inside its GEMMs, `weight.HostForward`; its hook remains the definition and the fallback.)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..spec import Compose, Insertion
from .layout import check_adapter_name, place_delta, unplace_delta


class Switch:
    """Shared on/off state of one adapter (disable_adapter() and set_adapter() flip it), and its name."""

    def __init__(self, adapter: str = "default"):
        check_adapter_name(adapter)
        self.on, self.adapter = True, adapter
        self.rows: torch.Tensor | None = None  # in a mixed-adapter batch: the rows this adapter serves


def on_rows(switch: Switch, h: torch.Tensor, fn, *inputs: torch.Tensor) -> torch.Tensor:
    """fn(h, *inputs) on the batch rows the adapter serves: all of them, or in a mixed-adapter batch its group
    (one call per adapter, not per row; the other rows pass through unchanged)."""
    rows = switch.rows
    if rows is None:
        return fn(h, *inputs)
    return h.index_put((rows,), fn(h[rows], *(x[rows] for x in inputs)))


@runtime_checkable
class Site(Protocol):
    """What every installed insertion offers; the path is the stem of its keys in adapter files."""

    ins: Insertion
    delta: nn.Module
    switch: Switch
    host_name: str  # the module it acts on ("" for the model's input)
    merged: bool

    @property
    def path(self) -> str: ...

    @property
    def active(self) -> bool: ...  # switched on and not merged into a weight

    def merge(self) -> None: ...  # folds the delta into weights, or raises naming why it cannot

    def unmerge(self) -> None: ...

    def remove(self) -> None: ...  # undoes everything the site did to the model


class ModuleSite:
    """A Site whose delta is a child of one module and acts through that module's hooks."""

    rowwise = True  # acts on each batch row separately, so it can serve a group of rows (mixed-adapter batches)
    served_elsewhere = False  # set while a mixed batch computes this delta elsewhere (unipeft.mixed_stack)
    valid_forms: frozenset = frozenset()  # (Form, Compose) pairs the site computes; others would be labels only

    def __init__(self, host: nn.Module, host_name: str, ins: Insertion, delta: nn.Module, switch: Switch,
                 attr: str | None = None):
        if self.valid_forms and (ins.form, ins.compose) not in self.valid_forms:
            raise ValueError(f"{host_name}: {type(self).__name__} does not compute form={ins.form.value!r} with "
                             f"compose={ins.compose.value!r} (it would be a label only); valid here: "
                             f"{sorted((f.value, c.value) for f, c in self.valid_forms)}")
        self.host, self.host_name, self.ins, self.delta, self.switch = host, host_name, ins, delta, switch
        # the delta's name on its host: the insertion's, or its own for each part of one fused linear, whose HF
        # slots (lora_A.<adapter>, ...) would clash, so its parameters stay on the delta
        self.attr, self._slots = attr or ins.name, attr is None
        self.merged = False
        self._hooks: list = []
        if ins.compose == Compose.LEARNED:  # the learned scale s lives with its delta
            p = next(delta.parameters(), None)
            delta.register_parameter("scale", nn.Parameter(torch.tensor(float(ins.scale), dtype=p.dtype if p is not None else None)))
        place_delta(host, self.attr, switch.adapter, delta, host_name, slots=self._slots)  # <host>.<attr>.<adapter>

    @property
    def s(self):
        return self.delta.scale if self.ins.compose == Compose.LEARNED else self.ins.scale

    @property
    def active(self) -> bool:
        return self.switch.on and not self.merged and not self.served_elsewhere

    @property
    def path(self) -> str:  # the file-key stem (HF PEFT's files have no adapter segment)
        return f"{self.host_name}.{self.attr}" if self.host_name else self.attr

    def hook(self, handle) -> None:
        self._hooks.append(handle)

    def merge(self) -> None:
        raise ValueError(
            f"{type(self.delta).__name__} at {self.host_name} ({self.ins.describe()}) cannot be merged: only deltas "
            f"that are linear in the weight (low-rank, scaling vectors, linear bottlenecks on a linear) merge"
        )

    def unmerge(self) -> None:
        self.merged = False

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        unplace_delta(self.host, self.attr, self.switch.adapter, self.delta)


def first_input(args, kwargs):
    """The hidden-state input of a module call, whether passed positionally or as hidden_states=."""
    if args:
        return args[0]
    for k in ("hidden_states", "x", "input"):
        if k in kwargs:
            return kwargs[k]
    raise ValueError(f"cannot find the hidden-state input among keyword arguments {list(kwargs)}")


def map_output(output, fn):
    """Apply fn to the hidden-state part of a module's output (a tensor, or the first item of a tuple)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    return fn(output)

"""HF PEFT's module layout: every adapter's members sit at `<host>.<slot>.<adapter>`.

A host module gets one `Slot` per slot name (HF's per-layer ModuleDict), holding one member per adapter, so
several adapters share a host and `model.state_dict()` reads `q_proj.lora_A.default.weight` as in HF PEFT.
A delta is placed at `<host>.<insertion name>.<adapter>`; parameters its class declares in `layout`
(`{"A": "lora_A.weight"}`) move to their own slot, `<host>.lora_A.<adapter>.weight` (`"ia3_l"`, with no
suffix: `<host>.ia3_l.<adapter>`), and the delta keeps reading them under its own names (see DeltaModule).
Base weights are never wrapped, so they keep their names.
"""

from __future__ import annotations

from torch import nn


class Slot(nn.Module):
    """One slot of a host: its members by adapter name."""

    unipeft_internal = True  # never a target of another adapter (arch.resolve)

    def forward(self, *args, **kwargs):
        raise TypeError("a Slot only holds adapters' members; the host module's hooks use them")


class Held(nn.Module):
    """Holds one parameter under its suffix, as HF's nn.Linear in a ModuleDict holds `weight`."""

    def forward(self, *args, **kwargs):
        raise TypeError("Held only stores a parameter")


def check_adapter_name(adapter: str) -> None:
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise ValueError(f"adapter name {adapter!r} must be a non-empty string without '.' (it becomes a module name)")


def _child(module: nn.Module, name: str):
    return dict(module.named_children()).get(name)


def _members(box: nn.Module) -> dict:
    """A slot's members by adapter name: modules, and parameters placed directly (HF's `ia3_l.<adapter>`)."""
    return {**dict(box.named_children()), **dict(box.named_parameters(recurse=False))}


def place(host: nn.Module, slot: str, adapter: str, member, host_name: str = "") -> None:
    """Register `member` (a module or parameter) at `<host>.<slot>.<adapter>`."""
    box = _child(host, slot)
    where = f"{host_name}.{slot}" if host_name else slot
    if box is None:
        if hasattr(host, slot):
            raise ValueError(f"{host_name or type(host).__name__} already has an attribute {slot!r}; give the "
                             f"insertion another name")
        box = Slot()
        host.add_module(slot, box)
    elif not isinstance(box, Slot):
        raise ValueError(f"{where} is a module of the model, not an adapter slot; give the insertion another name")
    if adapter in _members(box):
        raise ValueError(f"{where} already holds a member of adapter {adapter!r}; give the insertion another name")
    if isinstance(member, nn.Parameter):
        box.register_parameter(adapter, member)
    else:
        box.add_module(adapter, member)


def unplace(host: nn.Module, slot: str, adapter: str) -> None:
    box = _child(host, slot)
    if not isinstance(box, Slot):
        return
    if adapter in _members(box):
        delattr(box, adapter)
    if not _members(box):
        delattr(host, slot)


def place_delta(host: nn.Module, name: str, adapter: str, delta, host_name: str = "", slots: bool = True) -> None:
    """Place `delta` at `<host>.<name>.<adapter>` and, with `slots`, its declared parameters in their own slots
    (without: the parameters stay on the delta, e.g. for the several parts of one fused linear, whose HF slots
    would clash)."""
    layout = getattr(type(delta), "layout", {}) if slots else {}
    slots = [w.partition(".")[0] for w in layout.values()]
    for slot in slots:  # check before changing anything
        box = _child(host, slot)
        if box is not None and (not isinstance(box, Slot) or adapter in _members(box)):
            raise ValueError(f"{host_name}.{slot} already holds adapter {adapter!r} or is a module of the model")
    place(host, name, adapter, delta, host_name)
    for pname, where in layout.items():
        slot, _, suffix = where.partition(".")
        p = dict(delta.named_parameters(recurse=False))[pname]
        delattr(delta, pname)
        if suffix:
            holder = Held()
            holder.register_parameter(suffix, p)
            place(host, slot, adapter, holder, host_name)
            delta._placed[pname] = (holder, suffix)
        else:
            place(host, slot, adapter, p, host_name)
            delta._placed[pname] = (_child(host, slot), adapter)


def unplace_delta(host: nn.Module, name: str, adapter: str, delta) -> None:
    """Undo place_delta; the delta gets its parameters back (as they are now)."""
    for pname, where in getattr(type(delta), "layout", {}).items():
        if pname not in delta._placed:
            continue  # placed without slots
        ref = delta._placed.pop(pname, None)
        if ref is not None:
            delta.register_parameter(pname, getattr(*ref))
        unplace(host, where.partition(".")[0], adapter)
    box = _child(host, name)
    if isinstance(box, Slot) and _members(box).get(adapter) is delta:
        unplace(host, name, adapter)

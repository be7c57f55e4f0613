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


def place(host: nn.Module, slot: str, adapter: str, member, host_name: str = "") -> None:
    """Register `member` (a module or parameter) at `<host>.<slot>.<adapter>`."""
    box = host._modules.get(slot)
    where = f"{host_name}.{slot}" if host_name else slot
    if box is None:
        if hasattr(host, slot):
            raise ValueError(f"{host_name or type(host).__name__} already has an attribute {slot!r}; give the "
                             f"insertion another name")
        box = Slot()
        host.add_module(slot, box)
    elif not isinstance(box, Slot):
        raise ValueError(f"{where} is a module of the model, not an adapter slot; give the insertion another name")
    if adapter in box._modules or adapter in box._parameters:
        raise ValueError(f"{where} already holds a member of adapter {adapter!r}; give the insertion another name")
    if isinstance(member, nn.Parameter):
        box.register_parameter(adapter, member)
    else:
        box.add_module(adapter, member)


def unplace(host: nn.Module, slot: str, adapter: str) -> None:
    box = host._modules.get(slot)
    if not isinstance(box, Slot):
        return
    box._modules.pop(adapter, None)
    box._parameters.pop(adapter, None)
    if not box._modules and not box._parameters:
        del host._modules[slot]


def place_delta(host: nn.Module, name: str, adapter: str, delta, host_name: str = "", slots: bool = True) -> None:
    """Place `delta` at `<host>.<name>.<adapter>` and, with `slots`, its declared parameters in their own slots
    (without: the parameters stay on the delta, e.g. for the several parts of one fused linear, whose HF slots
    would clash)."""
    layout = getattr(type(delta), "layout", {}) if slots else {}
    slots = [w.partition(".")[0] for w in layout.values()]
    for slot in slots:  # check before changing anything
        box = host._modules.get(slot)
        if box is not None and (not isinstance(box, Slot) or adapter in box._modules or adapter in box._parameters):
            raise ValueError(f"{host_name}.{slot} already holds adapter {adapter!r} or is a module of the model")
    place(host, name, adapter, delta, host_name)
    for pname, where in layout.items():
        slot, _, suffix = where.partition(".")
        p = delta._parameters.pop(pname)
        if suffix:
            holder = Held()
            holder.register_parameter(suffix, p)
            place(host, slot, adapter, holder, host_name)
            delta._placed[pname] = (holder, suffix)
        else:
            place(host, slot, adapter, p, host_name)
            delta._placed[pname] = (host._modules[slot], adapter)


def unplace_delta(host: nn.Module, name: str, adapter: str, delta) -> None:
    """Undo place_delta; the delta gets its parameters back (as they are now)."""
    for pname, where in getattr(type(delta), "layout", {}).items():
        if pname not in delta._placed:
            continue  # placed without slots
        ref = delta._placed.pop(pname, None)
        if ref is not None:
            delta._parameters[pname] = getattr(*ref)
        unplace(host, where.partition(".")[0], adapter)
    box = host._modules.get(name)
    if isinstance(box, Slot) and box._modules.get(adapter) is delta:
        unplace(host, name, adapter)

"""The protocol every delta module follows, and the factory from a delta spec to its module."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..arch.resolve import linear_dims
from ..compat import own_parameter

_BUILDERS: dict[type, type] = {}
_HOST_VARIANTS: dict[type, list] = {}  # delta class -> its variants for non-linear hosts (embedding, conv)


class DeltaModule(nn.Module):
    """A Δh. Subclasses declare what they can do instead of generic code asking what they are.

    `mergeable`: the delta folds into the linear it sits on (`delta_weight()` or a scaling vector).
    `hf_keys`: parameter name -> HF PEFT key suffix, for checkpoint compatibility (empty: our own names).
    `host_aware`: the constructor takes `host=` (the module it sits on), `scale=` (the insertion's s) and
    `where=` (the host's name, for errors): deltas that read the host weight (DoRA, PiSSA/OLoRA inits).
    `layout`: parameter name -> "slot.suffix": where the parameter lives in the model, `<host>.<slot>.<adapter>.
    <suffix>` (HF PEFT's module layout, e.g. LoRA's A at `lora_A.<adapter>.weight`; see positions/layout.py).
    Parameters not named stay on the delta, at `<host>.<insertion name>.<adapter>.<name>`. Placed parameters are
    still read as `self.<name>`; `delta_parameters(delta)` lists all of a delta's parameters under its own names
    (`delta.parameters()` no longer holds the placed ones; overriding it would make torch.compile give up).
    """

    spec_type: ClassVar[type]
    mergeable: ClassVar[bool] = False
    hf_keys: ClassVar[dict[str, str]] = {}
    host_aware: ClassVar[bool] = False

    # A variant for other host layers declares `host_types` (e.g. (nn.Embedding,)) and subclasses the delta it
    # varies (or names it as `variant_of`); build_delta picks it for such hosts. Deltas with no variant for a host
    # refuse it.
    host_types: ClassVar[tuple] = ()
    layout: ClassVar[dict[str, str]] = {}

    def __init__(self):
        super().__init__()
        self._placed: dict[str, tuple[nn.Module, str]] = {}  # name -> (module holding it, its attribute there)

    def __setattr__(self, name: str, value) -> None:
        placed = self.__dict__.get("_placed")
        if placed and name in placed:
            mod, attr = placed[name]
            setattr(mod, attr, value)
        else:
            super().__setattr__(name, value)


    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("host_types"):
            base = cls.__dict__.get("variant_of") or next(b for b in cls.__mro__[1:]
                                                           if b.__dict__.get("spec_type") is not None)
            _HOST_VARIANTS.setdefault(base, []).append(cls)
        elif getattr(cls, "spec_type", None) is not None:
            _BUILDERS[cls.spec_type] = cls
        for name in cls.__dict__.get("layout", {}):
            setattr(cls, name, property(_placed_getter(name)))  # a property, not __getattr__: torch.compile reads it

    @classmethod
    def for_host(cls, host, where: str = "") -> type:
        """The class that adapts `host`: this one for linear-like hosts (or none), else a registered variant."""
        if host is None or linear_dims(host) is not None:
            return cls
        for variant in _HOST_VARIANTS.get(cls, ()):
            if isinstance(host, variant.host_types):
                return variant
        raise ValueError(f"{where or type(host).__name__}: {type(host).__name__} layers cannot take a "
                         f"{cls.__name__}; this method adapts linear layers there (exclude it from target_modules)")

    def can_merge(self) -> bool:
        return self.mergeable

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into a weight")

    def restore_host(self) -> None:
        """Undo changes the delta made to its host's own parameters (an init that left a residual there)."""

    def changes_host(self) -> bool:
        """Whether the delta changed its host's own parameters (which every other adapter computes with too)."""
        return False


_HOST_KW = ("host", "scale", "where")


def delta_parameters(delta: nn.Module):
    """(name, parameter) for every parameter of a delta, those placed in HF's layout slots first."""
    for name, (mod, attr) in getattr(delta, "_placed", {}).items():
        yield name, getattr(mod, attr)
    yield from delta.named_parameters()


def _placed_getter(name: str):
    def get(self):
        placed = self.__dict__.get("_placed")
        if placed and name in placed:
            mod, attr = placed[name]
            return getattr(mod, attr)
        try:
            return own_parameter(self, name)
        except KeyError:
            raise AttributeError(name) from None  # not made yet (register_parameter asks hasattr first)

    return get


def build_delta(spec, d_in: int, d_out: int, **kw) -> DeltaModule:
    try:
        cls = _BUILDERS[type(spec)]
    except KeyError:
        raise TypeError(f"no delta module for {type(spec).__name__}; known: {[t.__name__ for t in _BUILDERS]}")
    cls = cls.for_host(kw.get("host"), kw.get("where", ""))
    if not cls.host_aware:
        kw = {k: v for k, v in kw.items() if k not in _HOST_KW}
    return cls(spec, d_in, d_out, **kw)

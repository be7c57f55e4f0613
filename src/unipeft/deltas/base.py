"""The protocol every delta module follows, and the factory from a delta spec to its module."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

_BUILDERS: dict[type, type] = {}


class DeltaModule(nn.Module):
    """A Δh. Subclasses declare what they can do instead of generic code asking what they are.

    `mergeable`: the delta folds into the linear it sits on (`delta_weight()` or a scaling vector).
    `hf_keys`: parameter name -> HF PEFT key suffix, for checkpoint compatibility (empty: our own names).
    `host_aware`: the constructor takes `host=` (the module it sits on), `scale=` (the insertion's s) and
    `where=` (the host's name, for errors): deltas that read the host weight (DoRA, PiSSA/OLoRA inits).
    """

    spec_type: ClassVar[type]
    mergeable: ClassVar[bool] = False
    hf_keys: ClassVar[dict[str, str]] = {}
    host_aware: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if getattr(cls, "spec_type", None) is not None:
            _BUILDERS[cls.spec_type] = cls

    def can_merge(self) -> bool:
        return self.mergeable

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into a weight")

    def restore_host(self) -> None:
        """Undo changes the delta made to its host's own parameters (an init that left a residual there)."""


_HOST_KW = ("host", "scale", "where")


def build_delta(spec, d_in: int, d_out: int, **kw) -> DeltaModule:
    try:
        cls = _BUILDERS[type(spec)]
    except KeyError:
        raise TypeError(f"no delta module for {type(spec).__name__}; known: {[t.__name__ for t in _BUILDERS]}")
    if not cls.host_aware:
        kw = {k: v for k, v in kw.items() if k not in _HOST_KW}
    return cls(spec, d_in, d_out, **kw)

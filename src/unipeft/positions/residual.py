"""Residual positions: a delta at the attention or FFN sublayer of a block.

    sequential   h = f(x);  h + s·Δ(h)       Houlsby, Pfeiffer (Δ reads the sublayer's output)
    parallel     f(x) + s·Δ(x)              parallel / scaled parallel adapters (Δ reads its input)

f's input and output may sit on different modules (BERT's FFN is `intermediate` → `output.dense`): the
parallel form then captures x with a pre-hook on the input module. Under gradient checkpointing the
recomputation runs the hooks again in the same order, so the capture stays consistent.
"""

from __future__ import annotations

from ..spec import Form, Insertion
from .base import Site, first_input, map_output
from .. import functional as Fn


class SublayerDeltaSite(Site):
    def __init__(self, in_module, out_module, out_name: str, ins: Insertion, delta, switch):
        super().__init__(out_module, out_name, ins, delta, switch)
        self._x = None
        if ins.form == Form.SEQUENTIAL:
            self.hook(out_module.register_forward_hook(self._sequential))
        elif in_module is out_module:
            self.hook(out_module.register_forward_hook(self._parallel_same, with_kwargs=True))
        else:
            self.hook(in_module.register_forward_pre_hook(self._capture, with_kwargs=True))
            self.hook(out_module.register_forward_hook(self._parallel_split))

    def _sequential(self, module, args, out):
        if not self.active:
            return out
        return map_output(out, lambda h: Fn.compose(h, self.delta(h), self.s))

    def _parallel_same(self, module, args, kwargs, out):
        if not self.active:
            return out
        x = first_input(args, kwargs)
        return map_output(out, lambda h: Fn.compose(h, self.delta(x), self.s))

    def _capture(self, module, args, kwargs):
        self._x = first_input(args, kwargs) if self.active else None

    def _parallel_split(self, module, args, out):
        x, self._x = self._x, None
        if not self.active or x is None:
            return out
        return map_output(out, lambda h: Fn.compose(h, self.delta(x), self.s))

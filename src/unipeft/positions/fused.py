"""A weight-level delta on a part of a fused linear: it acts on the part's output rows only.

    fused output  h = [h_q ; h_k ; h_v]      a delta on k_proj:  h = [h_q ; h_k + s·Δ(x) ; h_v]   (add)
                                                                  h = [h_q ; h_k ⊙ l ; h_v]       (IA3)

Merging folds the delta into those rows of W (and b). The delta is registered on the fused linear as
`<name>_<part>` (`qkv_proj.lora_k_proj`); checkpoint keys use the part's own name (`self_attn.k_proj.lora_A...`),
as on Llama.
"""

from __future__ import annotations

import torch

from .. import functional as Fn
from ..arch.fused import FusedSlice
from ..spec import Compose, Form, Insertion
from .base import on_rows
from .weight import LinearDeltaSite


class SlicedLinearDeltaSite(LinearDeltaSite):
    computes_whole_output = False  # its delta acts on the part's columns only
    def __init__(self, part: FusedSlice, name: str, ins: Insertion, delta, switch, side: str = "out"):
        if side == "in":
            raise ValueError(f"{name} is rows {part.start}:{part.stop} of the fused {part.host_name}, which has no "
                             f"input of its own: a delta there can act on its output only. Scale the input of a whole "
                             f"linear instead (e.g. feedforward_modules=['down_proj'])")
        self.part = part
        super().__init__(part.host, name, ins, delta, switch, side=side, attr=f"{ins.name}_{part.part}")

    @property
    def path(self) -> str:
        return f"{self.part.host_name}.{self.attr}"

    def _on_rows(self, out: torch.Tensor, fn, *inputs: torch.Tensor) -> torch.Tensor:
        """fn on the part's output columns, for the batch rows this adapter serves (mixed batches: its group)."""
        a, b = self.part.start, self.part.stop
        cols = lambda h, *x: torch.cat([h[..., :a], fn(h[..., a:b], *x), h[..., b:]], dim=-1)  # noqa: E731
        return on_rows(self.switch, out, cols, *inputs)

    # hooks -----------------------------------------------------------------------------------------
    def _parallel(self, module, args, out):
        if not self.active:
            return out
        if self._fused:
            return self._on_rows(out, lambda h, x: self.delta(x, h, float(self.s)), args[0])
        return self._on_rows(out, lambda h, x: Fn.compose(h, self.delta(x), self.s), args[0])

    def _sequential(self, module, args, out):
        return self._on_rows(out, lambda h: Fn.compose(h, self.delta(h), self.s)) if self.active else out

    def _scale_output(self, module, args, out):
        return self._on_rows(out, lambda h: h * self.delta(h)) if self.active else out

    # merge -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, inverse: bool) -> None:
        W, b = self.host.weight, getattr(self.host, "bias", None)
        if not W.is_floating_point():
            raise ValueError(f"{self.part.host_name} is a quantized linear ({type(self.host).__name__}); merging into "
                             f"integer weights is lossy: dequantize first (unipeft.quant.dequantize_model)")
        a, n = self.part.start, self.part.rows
        rows = W.narrow(0, a, n)  # a view: in-place updates reach W
        if self.ins.compose == Compose.MULTIPLY:
            Fn.scale_linear(rows, None if b is None else b.narrow(0, a, n), self.delta.l, "out", False, inverse)
        elif self.delta.can_merge() and self.ins.form == Form.PARALLEL:
            dW = self.delta.delta_weight() * float(self.s)
            Fn.merge_linear(rows, -dW if inverse else dW, False)
        else:
            super(LinearDeltaSite, self).merge()

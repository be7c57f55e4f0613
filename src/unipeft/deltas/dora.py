"""DoRA's Δ: weight-decomposed low-rank adaptation.  Liu et al. 2024, arXiv:2402.09353.

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖     (norm per output row, over the inputs; m a trained vector (out,))

As in the paper (§4.3) and HF PEFT, the norm is a constant for the gradient (detached) and is recomputed from
the current B·A every forward. Added to the host's output h = W·x + b:

    h' = h + (g − 1)·W·x + g·s·B·A·x,   g = m / ‖W + s·B·A‖

With dropout in training, HF PEFT feeds the dropped x to both W·x and B·A·x; we do the same. m starts at
‖W + s·B·A‖ (the model is unchanged at init) and is saved as HF's `<host>.lora_magnitude_vector`.
Merging writes W ← g ⊙ (W + s·B·A) (bias untouched); unmerging inverts it with the g used to merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.resolve import linear_dims
from ..spec import LowRank
from .low_rank import LowRankDelta


@dataclass(frozen=True, kw_only=True)
class WeightDecomposed(LowRank):
    """DoRA: a low-rank direction update plus a trained magnitude per output (arXiv:2402.09353)."""


class DoraDelta(LowRankDelta):
    spec_type = WeightDecomposed
    hf_keys = {**LowRankDelta.hf_keys, "m": "lora_magnitude_vector"}
    layout = {**LowRankDelta.layout, "m": "lora_magnitude_vector.weight"}  # HF's lora_magnitude_vector.<adapter>.weight

    def __init__(self, spec: WeightDecomposed, d_in: int, d_out: int, *, host=None, scale: float = 1.0,
                 where: str = "", dtype=None, device=None, **kw):
        if host is None or getattr(host, "weight", None) is None:
            raise ValueError(f"DoRA (use_dora=True) needs the weight of the layer it adapts; {where or 'this position'} has none")
        if not host.weight.is_floating_point():
            raise ValueError(f"{where}: DoRA on a quantized layer ({type(host).__name__}) is not supported; "
                             f"dequantize it (unipeft.quant.dequantize_model) or use use_dora=False")
        super().__init__(spec, d_in, d_out, host=host, scale=scale, where=where, dtype=dtype, device=device, **kw)
        self.__dict__["_host"] = host  # not a submodule: the delta is the host's child
        self._transposed = bool(linear_dims(host)[2])  # GPT-2 Conv1D stores (in, out)
        self._s = float(scale)
        self._merged_norm = None
        with torch.no_grad():
            m = self.weight_norm(self.host_weight(torch.float32), self._s)
        self.m = nn.Parameter(m.to(dtype=dtype or m.dtype, device=device or m.device))

    def host_weight(self, dtype) -> torch.Tensor:
        W = self._host.weight
        return (W.t() if self._transposed else W).to(dtype)  # (out, in)

    def weight_norm(self, W: torch.Tensor, s: float) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, a constant for autograd."""
        BA = (self.B.to(W.dtype) @ self.A.to(W.dtype)).detach()
        return torch.linalg.norm(W + s * BA, dim=1).detach()

    def add_scaled(self, h: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
        W = self.host_weight(x.dtype)
        g = (self.m.to(x.dtype) / self.weight_norm(W, s).to(x.dtype))  # (out,)
        dropped = self.training and getattr(self.dropout, "p", 0.0) > 0
        # one read of the dropout (a second read by the same delta would be a new draw: dropout.py), shared by the
        # base term and the low-rank path
        y, c = self.dropout.masked(x) if dropped else (x, 1.0)
        xd = y if c == 1.0 else y * c
        if dropped:
            base = F.linear(xd, W)
        else:
            bias = getattr(self._host, "bias", None)
            base = h - bias.to(h.dtype) if bias is not None else h
        if self.siblings is not None:
            z = self.siblings.project(self, x, (y, c))
        else:
            z = F.linear(xd, self.A.to(x.dtype))
        lora = F.linear(z, self.B.to(x.dtype))
        return h + ((g - 1) * base + g * lora * s).to(h.dtype)

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, s: float, transposed: bool, inverse: bool) -> None:
        """W ← g ⊙ (W + s·B·A) and back; g uses the unmerged W's norm, kept for the inverse."""
        W_oi = (W.t() if transposed else W).float()
        dW = s * self.delta_weight()
        if not inverse:
            self._merged_norm = self.weight_norm(W_oi, s)
            new = (self.m.float() / self._merged_norm).view(-1, 1) * (W_oi + dW)
        else:
            new = W_oi / (self.m.float() / self._merged_norm).view(-1, 1) - dW
            self._merged_norm = None
        W.copy_((new.t() if transposed else new).to(W.dtype))

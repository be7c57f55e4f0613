"""DoRA on nn.Embedding and nn.Conv1d/2d, HF PEFT's forms (the linear case is deltas/dora.py).

Conv: the norm is per output channel over (in, *kernel); m has HF's shape (1, out, 1, …), and
    h' = h + (g − 1)·(W ⋆ x) + g·s·B ⋆ (A ⋆ x),   g = m / ‖W + s·ΔW‖.
Embedding: the table E (vocab, dim) is a map from one-hot ids, so the norm is per embedding dimension over the
vocabulary, m (dim,), and  e' = g ⊙ e + g ⊙ s·(A[:, id])ᵀ·Bᵀ  (the embedding's own scale applied to both).
Norms are constants for autograd and recomputed each forward, as for linears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import ConvLowRankDelta
from .dora import DoraDelta
from .embedding import EmbeddingLowRankDelta


class DoraConvDelta(ConvLowRankDelta):
    host_types = (nn.Conv1d, nn.Conv2d)
    variant_of = DoraDelta
    hf_keys = {**ConvLowRankDelta.hf_keys, "m": "lora_magnitude_vector"}
    layout = {**ConvLowRankDelta.layout, "m": "lora_magnitude_vector.weight"}

    def __init__(self, spec, d_in: int, d_out: int, *, host=None, scale: float = 1.0, dtype=None, device=None, **kw):
        super().__init__(spec, d_in, d_out, host=host, scale=scale, dtype=dtype, device=device, **kw)
        self.__dict__["_host"] = host
        self._merged_norm = None
        with torch.no_grad():
            m = self.weight_norm(host.weight.float(), float(scale))
        self.m = nn.Parameter(m.to(dtype=dtype or m.dtype, device=device or m.device))

    def weight_norm(self, W: torch.Tensor, s: float) -> torch.Tensor:
        """‖W + s·ΔW‖ per output channel, shaped (1, out, 1, …) as HF PEFT's magnitude."""
        V = W + s * self.delta_weight().to(W.dtype).detach()
        return V.norm(p=2, dim=tuple(range(1, V.dim())), keepdim=True).transpose(1, 0).detach()

    def add_scaled(self, h: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
        host = self._host
        W = host.weight.to(x.dtype)
        g = self.m.to(x.dtype) / self.weight_norm(W, s).to(x.dtype)
        xd = self.dropout(x)
        if self.training and getattr(self.dropout, "p", 0.0) > 0:
            base = self._conv(xd, W, None, host.stride, host.padding, host.dilation, host.groups)
        else:
            b = host.bias
            base = h - b.to(h.dtype).view((1, -1) + (1,) * (h.dim() - 2)) if b is not None else h
        lora = self._conv(self._conv(xd, self.A.to(x.dtype), None, self._stride, self._padding), self.B.to(x.dtype))
        return h + ((g - 1) * base + g * lora * s).to(h.dtype)

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, s: float, transposed: bool, inverse: bool) -> None:
        dW = s * self.delta_weight()
        view = (-1,) + (1,) * (W.dim() - 1)
        if not inverse:
            self._merged_norm = self.weight_norm(W.float(), s)
            new = (self.m.float() / self._merged_norm).view(view) * (W.float() + dW)
        else:
            new = W.float() / (self.m.float() / self._merged_norm).view(view) - dW
            self._merged_norm = None
        W.copy_(new.to(W.dtype))


class DoraEmbeddingDelta(EmbeddingLowRankDelta):
    host_types = (nn.Embedding,)
    variant_of = DoraDelta
    hf_keys = {**EmbeddingLowRankDelta.hf_keys, "m": "lora_magnitude_vector"}
    layout = {**EmbeddingLowRankDelta.layout, "m": "lora_magnitude_vector.weight"}

    def __init__(self, spec, d_in: int, d_out: int, *, host=None, scale: float = 1.0, dtype=None, device=None, **kw):
        super().__init__(spec, d_in, d_out, host=host, scale=scale, dtype=dtype, device=device, **kw)
        self._merged_norm = None
        with torch.no_grad():
            m = self.weight_norm(host.weight.float(), float(scale))
        self.m = nn.Parameter(m.to(dtype=dtype or m.dtype, device=device or m.device))

    def weight_norm(self, E: torch.Tensor, s: float) -> torch.Tensor:
        """‖Eᵀ + s·B·A‖ per embedding dimension (dim,)."""
        BA = (self.B.to(E.dtype) @ self.A.to(E.dtype)).detach()  # (dim, vocab)
        return torch.linalg.norm(E.t() + s * BA, dim=1).detach()

    def add_scaled(self, h: torch.Tensor, ids: torch.Tensor, s: float) -> torch.Tensor:
        e = self._host
        g = (self.m / self.weight_norm(e.weight.to(self.m.dtype), s)).to(h.dtype)
        lora = super().add_scaled(torch.zeros_like(h), ids, s)  # s·(A[:, id])ᵀ·Bᵀ, embed_scale included
        return g * h + g * lora

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, s: float, transposed: bool, inverse: bool) -> None:
        dW = s * self.delta_weight().t()  # (vocab, dim)
        if not inverse:
            self._merged_norm = self.weight_norm(W.float(), s)
            new = (self.m.float() / self._merged_norm).view(1, -1) * (W.float() + dW)
        else:
            new = W.float() / (self.m.float() / self._merged_norm).view(1, -1) - dW
            self._merged_norm = None
        W.copy_(new.to(W.dtype))

"""LoRA's Δ: Δ(x) = dropout(x)·Aᵀ·Bᵀ, mergeable as ΔW = B·A.  Hu et al. 2021, arXiv:2106.09685.

    x ──┬──────── W ───────────┐
        └─ dropout ─ A (r×in) ─ B (out×r) ─ ·s ─(+)─> h      s = α/r  (α/√r with rsLoRA)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as Fn
from ..spec import LowRank
from .base import DeltaModule


class LowRankDelta(DeltaModule):
    spec_type = LowRank
    mergeable = True
    hf_keys = {"A": "lora_A.weight", "B": "lora_B.weight"}

    def __init__(self, spec: LowRank, d_in: int, d_out: int, *, side: str = "out", dtype=None, device=None):
        super().__init__()
        self.r = spec.r
        self.A = nn.Parameter(torch.empty(spec.r, d_in, dtype=dtype, device=device))  # (r, in)
        self.B = nn.Parameter(torch.empty(d_out, spec.r, dtype=dtype, device=device))  # (out, r)
        # Dropout 0 must cost nothing: no extra copy of x is kept for backward.
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.reset(spec.init)

    @torch.no_grad()
    def reset(self, init) -> None:
        if init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.r)
        else:  # the nn.Linear default, as loralib and HF PEFT do
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.B)  # identity at init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Fn.low_rank(self.dropout(x), self.A.to(x.dtype), self.B.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        return self.B.float() @ self.A.float()  # (out, in)

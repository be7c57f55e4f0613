"""IA3's Δ: a learned vector l that rescales activations, h ⊙ l.  Liu et al. 2022, arXiv:2205.05638.

On keys/values (side "out") it scales the linear's output; on feed-forward linears (side "in") its input.
Stored as HF PEFT does: (out, 1) for outputs, (1, in) for inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import Scaling
from .base import DeltaModule


class ScalingDelta(DeltaModule):
    spec_type = Scaling
    mergeable = True
    hf_keys = {"l": "ia3_l"}
    layout = {"l": "ia3_l"}  # HF's ia3_l.<adapter>

    def __init__(self, spec: Scaling, d_in: int, d_out: int, *, side: str = "out", dtype=None, device=None):
        super().__init__()
        self.side = side
        shape = (1, d_in) if side == "in" else (d_out, 1)
        self.l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
        if not spec.init:
            with torch.no_grad():
                self.l.normal_(1.0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l.flatten().to(x.dtype)  # the vector l; the position multiplies

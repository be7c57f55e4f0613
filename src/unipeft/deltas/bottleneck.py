"""The bottleneck adapter's Δ: Δ(x) = up(f(down(LN(x)))).  Houlsby et al. 2019, arXiv:1902.00751.

    x ─ [LN] ─ down (d_in→m) ─ f ─ dropout ─ up (m→d_out) ─> Δ      up = 0 at init: the identity

With f = identity, no bias and no LN it is linear, ΔW = up·down, and it merges exactly like LoRA — the unified
view's identity. (The multi-head parallel adapter is not a bottleneck here: it is a prefix with ReLU weights,
see positions/attention_kv.py.) Parameters keep a leading axis of 1, (1, m, d), the layout of saved files.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as Fn
from ..spec import Bottleneck
from .base import DeltaModule


class BottleneckDelta(DeltaModule):
    spec_type = Bottleneck

    def __init__(self, spec: Bottleneck, d_in: int, d_out: int, *, side: str = "out", dtype=None, device=None):
        super().__init__()
        H, m = 1, spec.size
        self.act_name = spec.non_linearity.lower()
        self.act = Fn.activation(spec.non_linearity)
        self.ln = nn.LayerNorm(d_in, dtype=dtype, device=device) if spec.layer_norm else None
        kw = dict(dtype=dtype, device=device)
        self.down = nn.Parameter(torch.empty(H, m, d_in, **kw))  # (1, m, d_in)
        self.up = nn.Parameter(torch.empty(H, d_out, m, **kw))  # (1, d_out, m)
        self.down_bias = nn.Parameter(torch.zeros(H, m, **kw)) if spec.bias else None
        self.up_bias = nn.Parameter(torch.zeros(d_out, **kw)) if spec.bias else None
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down[0], a=math.sqrt(5))
            if spec.init == "random":
                nn.init.kaiming_uniform_(self.up[0], a=math.sqrt(5))
            if spec.init != "random":
                self.up.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        if self.ln is not None:  # parameters may be fp32 over a half-precision base: compute in x's dtype
            ln = self.ln
            x = nn.functional.layer_norm(x, ln.normalized_shape, ln.weight.to(dt), ln.bias.to(dt), ln.eps)
        z = nn.functional.linear(x, self.down[0].to(dt), None if self.down_bias is None else self.down_bias[0].to(dt))
        return nn.functional.linear(self.dropout(self.act(z)), self.up[0].to(dt), self._ub(dt))

    def _ub(self, dt):
        return None if self.up_bias is None else self.up_bias.to(dt)

    def can_merge(self) -> bool:
        return self.act_name in ("identity", "linear") and self.ln is None and self.down_bias is None

    def delta_weight(self) -> torch.Tensor:
        if not self.can_merge():
            raise ValueError(
                "this bottleneck adapter is non-linear (or has a layer norm / bias) and cannot be merged into a "
                "weight; only linear bottlenecks (non_linearity='identity', bias=False) are mergeable"
            )
        return self.up[0].float() @ self.down[0].float()

"""LoRA's Δ: Δ(x) = dropout(x)·Aᵀ·Bᵀ, mergeable as ΔW = B·A.  Hu et al. 2021, arXiv:2106.09685.

    x ──┬──────── W ───────────┐
        └─ dropout ─ A (r×in) ─ B (out×r) ─ ·s ─(+)─> h      s = α/r  (α/√r with rsLoRA)

Lean by construction: dropout 0 keeps no copy of x; otherwise the dropped copy is shared with the sibling
deltas that read the same x (`dropout.py`), whose A-projections run as one matmul (`siblings.py`); and
`add_scaled` adds s·B·(A·x) to h with one addmm, so no (…, out) temporaries besides the result are made; the
dropout's 1/(1−p) rides in that addmm's alpha instead of a pass over x (and its gradient).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as Fn
from ..spec import LowRank
from .base import DeltaModule
from .dropout import SharedDropout
from .lora_init import changes_base, init_from_host


class LowRankDelta(DeltaModule):
    spec_type = LowRank
    mergeable = True
    hf_keys = {"A": "lora_A.weight", "B": "lora_B.weight"}
    host_aware = True
    layout = {"A": "lora_A.weight", "B": "lora_B.weight"}  # HF's lora_A.<adapter>.weight

    def __init__(self, spec: LowRank, d_in: int, d_out: int, *, side: str = "out", dtype=None, device=None,
                 host=None, scale: float = 1.0, where: str = ""):
        super().__init__()
        self.r = spec.r
        self.A = nn.Parameter(torch.empty(spec.r, d_in, dtype=dtype, device=device))  # (r, in)
        self.B = nn.Parameter(torch.empty(d_out, spec.r, dtype=dtype, device=device))  # (out, r)
        # Dropout 0 must cost nothing: no extra copy of x is kept for backward.
        self.dropout = SharedDropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.siblings = None  # a SiblingProjections shared by the adapter's low-rank deltas (set by the site)
        self.base_snapshots = []  # host weights an init changed (PiSSA, OLoRA), restored by restore_host()
        if changes_base(spec.init):
            self.base_snapshots.append(init_from_host(self, spec.init, host, scale, where))
        else:
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

    @property
    def adds_in_place(self) -> bool:
        """add_scaled(..., in_place=True) may write into h (a site passes it for a fresh output); variants that
        compute their own add_scaled (DoRA, conv, embedding hosts) take no such flag."""
        return type(self).add_scaled is LowRankDelta.add_scaled

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None, s: float = 1.0, *,
                in_place: bool = False) -> torch.Tensor:
        """Δ(x); with h, h + s·Δ(x) in one op (`add_scaled`). Sites call the module, not the method, so engines
        acting through module hooks (ZeRO-3 gathers the parameters a module reaches) see every use."""
        if h is not None:
            return self.add_scaled(h, x, s, in_place=True) if in_place else self.add_scaled(h, x, s)
        return Fn.low_rank(self.dropout(x), self.A.to(x.dtype), self.B.to(x.dtype))

    def add_scaled(self, h: torch.Tensor, x: torch.Tensor, s: float, *, in_place: bool = False) -> torch.Tensor:
        """h + s·Δ(x) as one addmm: h (..., out), x (..., in). `in_place`: h is a tensor only the caller holds (the
        host's fresh output), so the sum is written into it: an out-of-place addmm first copies h, one pass over
        (tokens, out) per site (3 % of a CPU LoRA step on SmolLM2). Never for a view or a leaf that needs grad."""
        if self.siblings is not None:
            z, c = self.siblings.project_masked(self, x)  # (..., r): dropout(x)·Aᵀ = c·z
        else:
            y, c = self.dropout.masked(x) if isinstance(self.dropout, SharedDropout) else (x, 1.0)
            z = nn.functional.linear(y, self.A.to(x.dtype))  # (..., r)
        B = self.B.to(h.dtype)
        z2 = z.reshape(-1, self.r).to(h.dtype)
        if in_place and h._base is None and h.is_contiguous() and not (h.is_leaf and h.requires_grad):
            return Fn.addmm_into(h, z2, B, s * c)
        out = torch.addmm(h.reshape(-1, h.shape[-1]), z2, B.t(), alpha=s * c)
        return out.view(h.shape)

    @property
    def fuses_into_host(self) -> bool:
        """`linear_with` computes the host linear with this delta: plain LoRA with no dropout draw (the A path reads x
        itself, so its input gradient can join the base's)."""
        return self.adds_in_place and (isinstance(self.dropout, nn.Identity) or not self.dropout.training)

    def linear_with(self, x: torch.Tensor, W: torch.Tensor, b, s: float) -> torch.Tensor:
        """The host linear x·Wᵀ + b with s·Δ(x) computed inside its GEMMs (functional.linear_low_rank)."""
        return Fn.linear_low_rank(x, W, b, self.A.to(x.dtype), self.B.to(x.dtype), s)

    @staticmethod
    def linears_with(x: torch.Tensor, members) -> tuple[torch.Tensor, ...]:
        """The host linears of `members` [(delta, W, b, s)], all reading x, each with its delta inside, in one node:
        one x·[A₁; A₂; …]ᵀ GEMM (functional.linears_low_rank). Each delta `fuses_into_host`."""
        A = torch.cat([d.A for d, *_ in members]).to(x.dtype)  # one cast of the stacked (Σr, in), not one per delta
        return Fn.linears_low_rank(x, A, [d.r for d, *_ in members], [s for *_, s in members],
                                   [W for _, W, _, _ in members], [b for _, _, b, _ in members],
                                   [d.B.to(x.dtype) for d, *_ in members])

    def delta_weight(self) -> torch.Tensor:
        return self.B.float() @ self.A.float()  # (out, in)

    def changes_host(self) -> bool:
        return bool(self.base_snapshots)

    def restore_host(self) -> None:
        for snap in self.base_snapshots:
            snap.restore()

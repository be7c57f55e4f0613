"""LoRA on an nn.Embedding (HF PEFT's layout): a token's row gets s·(A[:, id])ᵀ·Bᵀ added.

    A (r, num_embeddings), B (embedding_dim, r);  E' = E + s·(B·A)ᵀ,  saved as `lora_embedding_A` / `_B`.

At init A = 0 and B ~ N(0, 1) (loralib's choice for embeddings: the adapted model starts as the base).
As in HF PEFT no dropout applies to token ids, and a scaled embedding (Gemma's `embed_scale`) scales the
delta too, since its forward scales the looked-up rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora_init import changes_base
from .low_rank import LowRankDelta


class EmbeddingLowRankDelta(LowRankDelta):
    host_types = (nn.Embedding,)
    hf_keys = {"A": "lora_embedding_A", "B": "lora_embedding_B"}
    layout = {"A": "lora_embedding_A", "B": "lora_embedding_B"}  # HF's lora_embedding_A.<adapter> (a ParameterDict)

    def __init__(self, spec, d_in: int, d_out: int, *, host=None, where: str = "", dtype=None, device=None, **kw):
        if changes_base(spec.init):
            raise ValueError(f"{where}: init_lora_weights={spec.init!r} is for linear layers; an embedding takes "
                             f"init_lora_weights=True (or False)")
        super().__init__(spec, d_in, d_out, host=host, where=where, dtype=dtype, device=device, **kw)
        self.__dict__["_host"] = host  # not a submodule: the delta is the host's child
        self.siblings = None

    @torch.no_grad()
    def reset(self, init) -> None:
        if init is False:  # both random, as HF PEFT leaves them
            nn.init.normal_(self.A)
            nn.init.normal_(self.B)
        else:  # True and "gaussian" alike, as in HF PEFT
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)

    def add_scaled(self, h: torch.Tensor, ids: torch.Tensor, s: float) -> torch.Tensor:
        e = self._host
        z = F.embedding(ids, self.A.t(), padding_idx=e.padding_idx, max_norm=e.max_norm, norm_type=e.norm_type,
                        scale_grad_by_freq=e.scale_grad_by_freq, sparse=e.sparse)  # (..., r)
        d = (z @ self.B.t()) * s
        scale = getattr(e, "embed_scale", None)
        if scale is not None:
            d = d * (scale.to(d.dtype) if torch.is_tensor(scale) else scale)
        return h + d.to(h.dtype)

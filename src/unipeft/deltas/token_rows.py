"""Trainable token rows (HF PEFT's TrainableTokensLayer semantics): chosen rows of an embedding matrix are
trained, the rest stay frozen. For new tokens added to a vocabulary without training the whole table.

    E'[i] = rows[j] if i = indices[j] else E[i]

On the embedding (token ids in) the chosen ids read their trained row; on an output layer tied to that
embedding (hidden states in) the logits of the chosen tokens use the trained rows, so a tied model stays
tied. `rows` starts as a copy of the original rows (init True) or random (False), and is saved as HF's
`<embedding>.token_adapter.trainable_tokens_delta`. Merging writes the rows into E; unmerging puts the
originals back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import DeltaModule


@dataclass(frozen=True, kw_only=True)
class TokenRows:
    indices: tuple[int, ...]
    init: bool = True

    def __post_init__(self):
        if not self.indices or len(set(self.indices)) != len(self.indices) or min(self.indices) < 0:
            raise ValueError(f"trainable_token_indices must be distinct non-negative token ids, got {list(self.indices)}")


class TokenRowsDelta(DeltaModule):
    spec_type = TokenRows
    mergeable = True
    host_aware = True
    hf_keys = {"rows": "token_adapter.trainable_tokens_delta"}

    @classmethod
    def for_host(cls, host, where: str = "") -> type:
        return cls  # made for embeddings (and the linears tied to them)

    def __init__(self, spec: TokenRows, d_in: int, d_out: int, *, host=None, where: str = "", dtype=None,
                 device=None, **_):
        super().__init__()
        W = host.weight
        if max(spec.indices) >= W.shape[0]:
            raise ValueError(f"{where}: trainable_token_indices {max(spec.indices)} is outside the vocabulary of "
                             f"{W.shape[0]} tokens; resize the embeddings first (model.resize_token_embeddings)")
        idx = torch.tensor(spec.indices, device=W.device)
        original = W.detach()[idx].clone()
        rows = original if spec.init else torch.randn(original.shape, dtype=W.dtype, device=W.device)
        self.rows = nn.Parameter(rows.clone().to(dtype=dtype or W.dtype))
        self.register_buffer("index", idx, persistent=False)
        self.register_buffer("original", original, persistent=False)
        lookup = torch.full((W.shape[0],), -1, dtype=torch.long, device=W.device)
        lookup[idx] = torch.arange(len(idx), device=W.device)
        self.register_buffer("lookup", lookup, persistent=False)  # token id -> its row, or -1
        self.__dict__["_embedding"] = host  # not a submodule: the delta is the host's child

    def forward(self, x: torch.Tensor, h: torch.Tensor, s: float = 1.0) -> torch.Tensor:
        return self.add_scaled(h, x, s)  # called as a module by the sites (see LowRankDelta.forward)

    def add_scaled(self, h: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
        if not x.is_floating_point():  # the embedding: chosen ids read their trained row
            pos = self.lookup[x]
            new = F.embedding(pos.clamp(min=0), self.rows.to(h.dtype))
            scale = getattr(self._embedding, "embed_scale", None)
            if scale is not None:
                new = new * (scale.to(new.dtype) if torch.is_tensor(scale) else scale)
            return torch.where((pos >= 0).unsqueeze(-1), new, h)
        # a tied output layer: the chosen tokens' logits from the trained rows
        return h.index_copy(-1, self.index, F.linear(x, self.rows.to(x.dtype)).to(h.dtype))

    @torch.no_grad()
    def merge_into(self, W: torch.Tensor, s: float, transposed: bool, inverse: bool) -> None:
        W.index_copy_(0, self.index, (self.original if inverse else self.rows).to(W.dtype))

"""Virtual-token embeddings and the P-tuning prompt encoder.

Prompt tuning (Lester et al. 2021, arXiv:2104.08691): a learned table E (P × d) fed as input embeddings.
P-tuning v1 (Liu et al. 2021, arXiv:2103.10385): the virtual tokens are produced by a prompt encoder,

    "LSTM":  E ─ bi-LSTM (d → 2h, n layers) ─ Linear(2h → 2h) ─ ReLU ─ Linear(2h → d) ─> prompts
    "MLP":   E ─ Linear(d → h) ─ ReLU ─ Linear(h → h) ─ ReLU ─ Linear(h → d) ─> prompts

HF PEFT saves only the encoder's output as `prompt_embeddings`; we save it too (so HF loads our files)
and also the encoder's own weights (so training can resume).
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import Prompt
from .base import DeltaModule


class PromptDelta(DeltaModule):
    spec_type = Prompt
    hf_exports = ("prompt_embeddings",)

    def __init__(self, spec: Prompt, d_in: int, d_out: int, *, word_embeddings: nn.Module, submodules: int = 1,
                 side: str = "out", dtype=None, device=None):
        super().__init__()
        self.P, self.submodules = spec.length, submodules
        d = d_out
        kw = dict(dtype=dtype, device=device)
        self.embedding = nn.Parameter(self._init(spec, word_embeddings, d, kw))  # (P, d)
        h = spec.encoder_hidden_size or d
        if spec.encoder == "LSTM":
            self.lstm = nn.LSTM(d, h, num_layers=spec.encoder_num_layers, dropout=spec.encoder_dropout,
                                bidirectional=True, batch_first=True, **kw)
            self.mlp = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))
        elif spec.encoder == "MLP":
            self.mlp = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                     nn.Linear(h, d, **kw))

    @staticmethod
    @torch.no_grad()
    def _init(spec: Prompt, word_embeddings: nn.Module, d: int, kw) -> torch.Tensor:
        W = word_embeddings.weight
        if spec.init == "TEXT":
            ids = torch.tensor(spec.init_ids, dtype=torch.long, device=W.device)
            ids = ids.repeat((spec.length + len(ids) - 1) // len(ids))[: spec.length]  # repeat to fill P
            return W[ids].detach().clone().to(**{k: v for k, v in kw.items() if v is not None})
        if spec.init == "SAMPLE_VOCAB":
            ids = torch.randint(0, W.shape[0], (spec.length,), device=W.device)
            return W[ids].detach().clone().to(**{k: v for k, v in kw.items() if v is not None})
        return torch.randn(spec.length, d, **kw) * W.detach().float().std().item()

    @property
    def encoded(self) -> bool:
        return hasattr(self, "mlp")

    def forward(self) -> torch.Tensor:
        """The P virtual-token embeddings, (P, d)."""
        x = self.embedding
        if hasattr(self, "lstm"):
            x = self.lstm(x[None])[0][0]
        return self.mlp(x) if self.encoded else x

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self().detach().repeat(self.submodules, 1)}

    @torch.no_grad()
    def load_hf_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors["prompt_embeddings"]
        if t.shape[0] < self.P or t.shape[1] != self.embedding.shape[1]:
            raise ValueError(f"prompt_embeddings has shape {tuple(t.shape)}; this model needs ({self.P}, "
                             f"{self.embedding.shape[1]}): the adapter is for another model")
        if self.encoded:  # only the encoder's output was saved: continue with it as a plain table
            for name in ("lstm", "mlp"):
                if hasattr(self, name):
                    delattr(self, name)
        self.embedding.copy_(t[: self.P].to(self.embedding.dtype))

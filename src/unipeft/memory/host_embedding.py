"""The input embedding table kept in host memory: a frozen lookup reads B·T rows of a (vocab, d) table, so
it can stay on the CPU and send only the looked-up rows to the accelerator. For Llama-3-8B that is 1 GiB of
GPU memory (128k × 4096 bf16) for a copy of B·T·d values per step.

Only untied tables move: a table tied to the output head is needed on the accelerator by the head anyway.
`model.to(device)` keeps the table on the host and sends lookups to `device`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..compat import ConvertsItself


class HostEmbedding(ConvertsItself, nn.Embedding):
    """nn.Embedding whose frozen table is a host buffer (still `weight` in the state dict)."""

    def __init__(self, emb: nn.Embedding, compute_device):
        nn.Module.__init__(self)
        for k in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                  "sparse"):
            setattr(self, k, getattr(emb, k))
        table = emb.weight.detach().to("cpu")
        self.register_buffer("weight", table.pin_memory() if torch.cuda.is_available() else table)
        self.compute_device = torch.device(compute_device)
        self.compute_dtype = table.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids on an accelerator must come to the host first (a wait for the stream); pass host ids to avoid it
        host_ids = ids.to("cpu")
        if self.max_norm is not None or not self.weight.is_pinned():  # renorm writes the table; CPU-only runs
            rows = F.embedding(host_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
            return rows.to(self.compute_device, self.compute_dtype, non_blocking=True)
        # a frozen lookup is a row gather (padding_idx, scale_grad_by_freq and sparse act on gradients only);
        # gathered into pinned memory, the copy to the device is asynchronous (from pageable memory it would
        # be staged synchronously), and the host allocator keeps the buffer until the copy has run
        rows = torch.empty((host_ids.numel(), self.embedding_dim), dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, host_ids.reshape(-1), out=rows)
        rows = rows.to(self.compute_device, non_blocking=True).to(self.compute_dtype)
        return rows.reshape(*host_ids.shape, self.embedding_dim)

    def convert(self, fn) -> None:
        # .to()/.cuda()/.half() on the model: lookups follow the device and dtype; the table stays on the host
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.compute_device))
        self.compute_device, self.compute_dtype = probe.device, probe.dtype

    def frozen_buffer_weights(self) -> int:
        """Model weights held as a buffer, not a parameter: parameter counts add them."""
        return self.weight.numel()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, table on host, lookups to {self.compute_device}"


def embeddings_on_host(model: nn.Module, compute_device=None) -> nn.Module:
    """Move `model`'s input embedding table to host memory (in place); returns the model.

    Call it on the base model before `get_peft_model`: methods that read the embeddings (prompt tuning's
    vocabulary init, the input position) then see the host table. `compute_device` defaults to where the
    table was."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        raise ValueError("the input embeddings are tied to the output head, which needs them on the accelerator; "
                         "host embeddings only help models with untied embeddings (e.g. Llama-3-8B)")
    if type(emb) is not nn.Embedding:  # a subclass may scale or otherwise change the lookup (Gemma)
        raise ValueError(f"host embeddings replace a plain nn.Embedding; this model's is {type(emb).__name__}")
    device = compute_device or emb.weight.device
    model.set_input_embeddings(HostEmbedding(emb, device))
    return model

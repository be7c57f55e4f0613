"""Causal-LM loss without the (batch, seq, vocab) logits: fused linear + cross-entropy over row chunks.

    loss = (1/n) Σ_t [ logsumexp(W h_t + b) − (W h_t + b)[y_t] ]      over the n rows with y_t ≠ ignore_index

For each chunk of rows the forward pass computes the logits (in fp32), the loss terms, and at once the
gradients ∂loss/∂h = (softmax − onehot(y))·W / n (and ∂loss/∂W, ∂loss/∂b when those need them); backward
only scales them by the incoming gradient. So no logits are kept between forward and backward, and at most
one chunk of them exists at a time (the idea of Liger-Kernel's fused linear cross-entropy, in plain torch).
A full-vocabulary fp32 logits tensor for 4×256 tokens of a 49k vocabulary is 200 MB; for 1×2048 tokens of
Llama-3's 128k vocabulary it is 1 GB, and HF's loss keeps several tensors of that size alive.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 8M fp32 = 32 MB


def default_chunk(vocab: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits is about CHUNK_ELEMENTS (at least 16 rows)."""
    return max(16, CHUNK_ELEMENTS // vocab)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, b, y, n, chunk, grads):  # h (N, d) valid rows, W (V, d), b (V,) or None, y (N,)
        need_h, need_W = grads and h.requires_grad, grads and W.requires_grad
        need_b = grads and b is not None and b.requires_grad
        grads = need_h or need_W or need_b
        wide = torch.float64 if h.dtype == torch.float64 else torch.float32
        loss = torch.zeros((), dtype=wide, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gW = torch.zeros(W.shape, dtype=wide, device=W.device) if need_W else None
        gb = torch.zeros(b.shape, dtype=wide, device=b.device) if need_b else None
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            z = F.linear(hc, W, b)  # (c, V)
            z = z if z.dtype in (torch.float32, torch.float64) else z.float()
            lse = torch.logsumexp(z, -1)  # (c,)
            loss += (lse - z.gather(1, yc[:, None]).squeeze(1)).sum()
            if not grads:
                continue
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            p[torch.arange(p.shape[0], device=p.device), yc] -= 1.0  # ∂/∂z of the summed loss
            if need_h:
                gh[i:i + chunk] = (p.to(W.dtype) @ W).to(h.dtype)
            if need_W:
                gW.addmm_(p.t(), hc.to(wide))
            if need_b:
                gb += p.sum(0)
        ctx.save_for_backward(gh, gW, gb)
        ctx.n, ctx.dtypes = n, (W.dtype, None if b is None else b.dtype)
        return loss / n

    @staticmethod
    def backward(ctx, g):
        gh, gW, gb = ctx.saved_tensors
        s = g / ctx.n
        dh = gh * s.to(gh.dtype) if gh is not None else None
        dW = (gW * s).to(ctx.dtypes[0]) if gW is not None else None
        db = (gb * s).to(ctx.dtypes[1]) if gb is not None else None
        return dh, dW, db, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                    chunk: int | None = None, ignore_index: int = IGNORE_INDEX, shift: bool = True,
                    num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy of the LM head `weight` (V, d) (+ `bias`) on `hidden` (B, T, d) against `labels` (B, T).

    `shift=True` follows HF: position t predicts labels[t + 1]. Rows whose target is `ignore_index` cost
    nothing. `num_items_in_batch` replaces the number of valid targets as the divisor (HF's gradient
    accumulation convention). Equal to HF's loss on full logits up to floating-point summation order.
    """
    if shift:
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])  # (B·T, d)
    y = labels.reshape(-1).to(hidden.device)
    keep = y != ignore_index
    if not bool(keep.all()):
        h, y = h[keep], y[keep]
    n = num_items_in_batch if num_items_in_batch is not None else max(int(y.numel()), 1)
    n = float(n.item() if torch.is_tensor(n) else n)
    chunk = chunk or default_chunk(weight.shape[0])
    return _FusedLinearCE.apply(h, weight, bias, y, n, chunk, torch.is_grad_enabled())


def _inner_and_head(model: nn.Module):
    """(the model without its LM head, the head) of a HF causal LM, or None when the head cannot be fused."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(head, nn.Linear) or inner is None or inner is model:
        return None
    hooked = [m for m in (model, head) if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None)]
    if hooked or len(head._modules) or getattr(model.config, "final_logit_softcapping", None):
        return None  # a delta on the head, prompt tokens added at the root, or a logit soft-cap: not fusable
    return inner, head


def causal_lm_loss(model: nn.Module, input_ids, attention_mask=None, labels=None, *, chunk: int | None = None,
                   num_items_in_batch=None, **kwargs) -> torch.Tensor:
    """model(input_ids, attention_mask, labels=labels).loss, computed from the inner model's hidden states
    with `chunked_lm_loss`. Falls back to the model's own loss (with a warning) when the head is adapted or
    wrapped (prompt tokens, a delta on lm_head, soft-capped logits)."""
    labels = input_ids if labels is None else labels
    parts = _inner_and_head(model)
    if parts is None:
        logger.warning("causal_lm_loss: the LM head of %s cannot be fused; using the model's own loss",
                       type(model).__name__)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    inner, head = parts
    out = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return chunked_lm_loss(hidden, head.weight, labels, bias=head.bias, chunk=chunk,
                           num_items_in_batch=num_items_in_batch)

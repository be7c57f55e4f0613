"""Padding-free packing for causal-LM training: several encoded examples per row, up to --max-length tokens.

Isolation goes through transformers' public packed-sequence route (the one DataCollatorWithFlattening feeds):
`position_ids` restart at 0 for each example and no `attention_mask` is passed. transformers' mask builder
(masking_utils.find_packed_sequence_indices) then gives eager/SDPA attention a block-diagonal causal mask, and
FlashAttention-2 runs its varlen kernel from the same position_ids (GPU only; not exercised on this CPU). Each
example's first label is -100, so no token is predicted from the example before it; the row's loss is then the
same token set, and each example's loss the same, as unpacked. `check_isolation` proves it on the real model
before training: a model whose attention ignores packed position_ids is refused, not trained on leaked context.
"""

from __future__ import annotations

import bisect

import torch

from .errors import CliError


def pack(feats: list[dict], max_length: int) -> list[dict]:
    """Best-fit decreasing: longest examples first, each into the fullest row that still has room."""
    order = sorted(range(len(feats)), key=lambda i: (-len(feats[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = len(feats[i]["input_ids"])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = max_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return [packed_row([feats[i] for i in sorted(r)]) for r in rows]


def packed_row(examples: list[dict]) -> dict:
    ids, labels, pos, lens = [], [], [], []
    for f in examples:
        n = len(f["input_ids"])
        ids += f["input_ids"]
        labels += [-100] + list(f["labels"][1:])  # never predict an example's first token from the one before
        pos += range(n)
        lens.append(n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_lens": lens}


def collate_packed(feats: list[dict], pad_id: int) -> dict:
    """Rows padded to the longest; the padding is its own example (positions from 0, labels -100), so no real token
    sees it. No attention_mask: it would switch transformers' packed-sequence detection off."""
    n = max(len(f["input_ids"]) for f in feats)
    ids = torch.full((len(feats), n), pad_id, dtype=torch.long)
    labels = torch.full((len(feats), n), -100, dtype=torch.long)
    pos = torch.arange(n).repeat(len(feats), 1)
    for i, f in enumerate(feats):
        L = len(f["input_ids"])
        ids[i, :L] = torch.tensor(f["input_ids"])
        labels[i, :L] = torch.tensor(f["labels"])
        pos[i, :L] = torch.tensor(f["position_ids"])
        pos[i, L:] = torch.arange(n - L)
    real = sum(len(f["input_ids"]) for f in feats)
    # use_cache=False: a model that makes a KV cache (config.use_cache, also in training) turns transformers'
    # packed-sequence detection off, and the examples of a row would see each other
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False,
            "num_tokens": torch.tensor(real)}


def refuse_virtual_tokens(config) -> None:
    """Methods that add virtual tokens to each row (prompt, prefix, P-tuning, MAM's prefix) place them once per row,
    not once per packed example."""
    if getattr(config, "is_prompt_learning", False) or getattr(config, "num_virtual_tokens", None):
        raise CliError(f"--packing cannot be used with {type(config).__name__}: its virtual tokens are placed once "
                       "per row, so only the first packed example would see them",
                       "drop --packing for this method, or use a method without virtual tokens (e.g. lora)")


@torch.no_grad()
def check_isolation(model, vocab_size: int) -> None:
    """Two random examples packed into one row must give the logits each gives alone."""
    dev = next(p for p in model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, max(4, min(vocab_size, 1000)), (n,), generator=g) for n in (6, 5))
    was = model.training
    model.eval()
    try:
        alone = torch.cat([model(input_ids=x[None].to(dev)).logits[0] for x in (a, b)])
        row = torch.cat([a, b])[None].to(dev)
        pos = torch.cat([torch.arange(6), torch.arange(5)])[None].to(dev)
        packed = model(input_ids=row, position_ids=pos, use_cache=False).logits[0].float()
    except Exception as e:  # noqa: BLE001 — any failure of the packed forward means no packing for this model
        raise CliError(f"--packing: a packed forward pass failed on this model ({type(e).__name__}: {str(e)[:200]})",
                       "drop --packing") from None
    finally:
        model.train(was)
    tol = 1e-4 if alone.dtype == torch.float32 else 2e-2  # fp32: isolation is exact up to rounding
    alone = alone.float()
    err = float((packed - alone).abs().max())
    scale = float(alone.abs().max()) or 1.0
    if not err <= tol * scale:
        raise CliError(f"--packing: this model's attention does not isolate packed examples (a packed row's logits "
                       f"differ from the examples' own by {err:.3g}); it does not build its mask through "
                       "transformers' packed-sequence support", "drop --packing for this model")

"""Evaluation passes: loss + task metrics over encoded examples, and greedy generation for exact-match/BLEU/ROUGE.
Each process takes a shard; records are gathered, so the same code runs on one device or several."""

from __future__ import annotations

import contextlib

import torch

from . import metrics


def _shard(items, accelerator):
    if accelerator is None or accelerator.num_processes == 1:
        return items
    return items[accelerator.process_index::accelerator.num_processes]


def _gather(records, accelerator):
    if accelerator is None or accelerator.num_processes == 1:
        return records
    from accelerate.utils import gather_object

    return gather_object(records)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def run_eval(model, task, feats, batch_size: int, accelerator=None) -> dict:
    was_training = model.training
    model.eval()
    dev = _device(model)
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    records = []
    mine = _shard(feats, accelerator)
    # longest first: fewer padded tokens per batch (results do not depend on the order)
    order = sorted(range(len(mine)), key=lambda i: -len(mine[i]["input_ids"]))
    with autocast:
        for s in range(0, len(order), batch_size):
            chunk = [mine[i] for i in order[s:s + batch_size]]
            batch = task.collate(chunk)
            inputs = {k: v.to(dev) for k, v in batch.items() if k != "labels"}
            if task.name == "seq2seq":
                inputs["labels"] = batch["labels"].to(dev)  # builds decoder inputs
            logits = model(**inputs).logits
            records += task.eval_records(logits.cpu(), batch, chunk)
    model.train(was_training)
    return task.finalize(_gather(records, accelerator))


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   encoder_decoder: bool, temperature: float = 0.0) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded for decoder-only models)."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    dev = _device(model)
    pad = tokenizer.pad_token_id
    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None)
    eos = list(dict.fromkeys((eos if isinstance(eos, list) else [eos] if eos is not None else [])
                             + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
    sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    gc = GenerationConfig(max_new_tokens=max_new_tokens, **sample, pad_token_id=pad,
                          eos_token_id=eos or None,
                          decoder_start_token_id=getattr(base, "decoder_start_token_id", None))
    outs = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            if encoder_decoder:
                ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
            else:
                ids[i, n - len(p):], mask[i, n - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gc)
        new = out if encoder_decoder else out[:, n:]
        outs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return outs


def generation_eval(model, task, tokenizer, feats, n: int, max_new_tokens: int, batch_size: int,
                    accelerator=None) -> tuple[dict, list[tuple[str, str]]]:
    """Metrics on the first n examples with references, and (prediction, reference) pairs."""
    with_ref = [f for f in feats if "ref" in f][:n]
    if not with_ref:
        return {}, []
    mine = _shard(with_ref, accelerator)
    preds = generate_texts(model, tokenizer, [f["prompt_ids"] for f in mine], max_new_tokens, batch_size,
                           task.name == "seq2seq")
    pairs = _gather(list(zip(preds, [f["ref"] for f in mine])), accelerator)
    return metrics.generation([p for p, _ in pairs], [r for _, r in pairs]), pairs

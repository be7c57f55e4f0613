"""Evaluation passes: loss + task metrics over encoded examples, and greedy generation for exact-match/BLEU/ROUGE.
Each process takes a shard; records are gathered, so the same code runs on one device or several."""

from __future__ import annotations

import contextlib
import math

import torch

from . import metrics


def _shard(items, accelerator):
    if accelerator is None or accelerator.num_processes == 1:
        return items
    return items[accelerator.process_index::accelerator.num_processes]


def _batches_each(n_items: int, batch_size: int, accelerator) -> int:
    """Batches every process runs: those of the largest shard. Under FSDP2 / ZeRO-3 a forward is a collective
    (parameters are gathered block by block), so a process that stopped early would leave the others waiting."""
    n = 1 if accelerator is None else accelerator.num_processes
    return math.ceil(math.ceil(n_items / n) / batch_size)


def _padded(chunks: list[list], n_batches: int, dummy) -> list[tuple[list, bool]]:
    """(chunk, real) pairs: this process's chunks, then dummy chunks (results dropped) up to n_batches."""
    return [(c, True) for c in chunks] + [([dummy], False)] * (n_batches - len(chunks))


def _sharded(model, accelerator) -> bool:
    from ..distributed import sharding_of

    return accelerator is not None and accelerator.num_processes > 1 and any(
        sharding_of(p) is not None for p in model.parameters())


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
    chunks = [[mine[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    with autocast:
        for chunk, real in _padded(chunks, _batches_each(len(feats), batch_size, accelerator), feats[0] if feats else None):
            batch = task.collate(chunk)
            inputs = {k: v.to(dev) for k, v in batch.items() if k != "labels"}
            if task.name == "seq2seq":
                inputs["labels"] = batch["labels"].to(dev)  # builds decoder inputs
            logits = model(**inputs).logits
            if real:  # each row of the eval set counted once, by the process whose shard holds it
                records += task.eval_records(logits.cpu(), batch, chunk)
    model.train(was_training)
    return task.finalize(_gather(records, accelerator))


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                   encoder_decoder: bool, temperature: float = 0.0, n_batches: int = 0,
                   synced: bool = False, dummy: list[int] | None = None, chat: bool = False) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded for decoder-only models). Sharded model on several
    processes: every process runs n_batches generate calls (dummy ones after its own prompts) and `synced`
    keeps each call stepping until every process is done (transformers' synced_gpus), as forwards are collectives.
    chat: prompts rendered by the chat template; a reply ends at its end-of-turn marker (chat_data.end_of_turn)."""
    from transformers import GenerationConfig

    from .chat_data import cut_at, stop_ids_and_text

    was_training = model.training
    model.eval()
    dev = _device(model)
    pad = tokenizer.pad_token_id
    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None)
    eos = list(dict.fromkeys((eos if isinstance(eos, list) else [eos] if eos is not None else [])
                             + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))
    stop_ids, marker = stop_ids_and_text(tokenizer) if chat else ([], "")
    eos = list(dict.fromkeys(eos + stop_ids))
    stop_text = {"stop_strings": [marker]} if marker and not stop_ids else {}
    sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    gc = GenerationConfig(max_new_tokens=max_new_tokens, **sample, pad_token_id=pad,
                          eos_token_id=eos or None, **stop_text,
                          decoder_start_token_id=getattr(base, "decoder_start_token_id", None))
    outs = []
    chunks = [prompts[s:s + batch_size] for s in range(0, len(prompts), batch_size)]
    for chunk, real in _padded(chunks, n_batches, dummy or (prompts[0] if prompts else None)):
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            if encoder_decoder:
                ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
            else:
                ids[i, n - len(p):], mask[i, n - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gc,
                             **({"synced_gpus": True} if synced else {}),
                             **({"tokenizer": tokenizer} if stop_text else {}))
        new = out if encoder_decoder else out[:, n:]
        if real:
            outs += [cut_at(t, marker).strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
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
                           task.name == "seq2seq", n_batches=_batches_each(len(with_ref), batch_size, accelerator),
                           synced=_sharded(model, accelerator), dummy=with_ref[0]["prompt_ids"],
                           chat=bool(task.meta.get("chat")))
    pairs = _gather(list(zip(preds, [f["ref"] for f in mine])), accelerator)
    return metrics.generation([p for p, _ in pairs], [r for _, r in pairs]), pairs

"""Prompt-family methods on NLU with MiniLM: SST-2 (accuracy) and CoNLL-2003 NER (entity F1), vs our LoRA.

The issue's budget, every method alike: the first 8,000 training rows, 1 epoch, batch 32, AdamW with 6% linear
warmup then linear decay, grad-norm clip 1.0, full validation set, seeds 0 1 2. SST-2 reuses the shared protocol's
data encoding (max length 64); CoNLL labels the first word-piece of each word (max length 128).

    .venv/bin/python benchmarks/nlu_prompt.py --task sst2 --methods prompt_tuning prefix_tuning p_tuning_v2 mam lora
    .venv/bin/python benchmarks/nlu_prompt.py --task conll --methods lora p_tuning_v2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sst2_protocol as P  # noqa: E402
import unipeft  # noqa: E402

DATA = Path(os.environ.get("UNIPEFT_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")).resolve()

# Method -> (registry name, options, learning rate by task). LoRA on SST-2 uses the protocol lr; the
# others come from a sweep (SST-2: prefix {5e-4, 1e-3, 2e-3}, P-tuning v2 {5e-3, 1e-2, 3e-2, 5e-2},
# MAM {5e-4, 1e-3, 3e-3}; CoNLL: LoRA {5e-4, 2e-3}, P-tuning v2 {1e-2, 3e-2}); results/nlu_prompt.md has them.
METHODS = {
    "lora": ("lora", {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"]},
             {"sst2": 5e-4, "conll": 2e-3}),
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 20}, {"sst2": 3e-2, "conll": 3e-2}),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 20, "prefix_projection": True,
                                        "encoder_hidden_size": 512}, {"sst2": 1e-3, "conll": 1e-3}),
    # the same prefix with real tokens at positions 0..T-1 (the default before 605749e, where this table was made)
    "prefix_tuning_unshifted": ("prefix_tuning", {"num_virtual_tokens": 20, "prefix_projection": True,
                                                  "encoder_hidden_size": 512, "position_shift": False},
                                {"sst2": 1e-3, "conll": 1e-3}),
    "p_tuning_v2": ("p_tuning_v2", {"num_virtual_tokens": 20}, {"sst2": 3e-2, "conll": 3e-2}),
    "mam": ("mam", {"num_virtual_tokens": 20, "encoder_hidden_size": 512, "bottleneck_size": 64},
            {"sst2": 5e-4, "conll": 5e-4}),
}


# -- data ---------------------------------------------------------------------------------------------------

def conll(model_dir, train_rows, max_length=128):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(path, limit=None):
        rows = P.load_rows(path, limit)
        enc = tok([r["tokens"] for r in rows], is_split_into_words=True, truncation=True, max_length=max_length)
        out = []
        for i, r in enumerate(rows):
            words, prev, labels = enc.word_ids(i), None, []
            for w in words:
                labels.append(-100 if w is None or w == prev else r["ner_tags"][w])
                prev = w
            out.append((enc["input_ids"][i], labels, r["ner_tags"]))
        return out

    names = json.loads((DATA / "conll2003" / "labels.json").read_text())
    return encode(DATA / "conll2003" / "train.jsonl", train_rows), encode(DATA / "conll2003" / "validation.jsonl"), names


def batch_tokens(rows, idx, device, pad=0):
    n = max(len(rows[i][0]) for i in idx)
    ids = torch.tensor([rows[i][0] + [pad] * (n - len(rows[i][0])) for i in idx], device=device)
    mask = torch.tensor([[1] * len(rows[i][0]) + [0] * (n - len(rows[i][0])) for i in idx], device=device)
    labels = torch.tensor([rows[i][1] + [-100] * (n - len(rows[i][1])) for i in idx], device=device)
    return {"input_ids": ids, "attention_mask": mask}, labels


def chunks(tags: list[str]) -> set:
    """Entities as (type, start, end), conlleval-style: an I- that does not continue a chunk opens one."""
    out, start, kind = set(), None, None
    for i, t in enumerate(tags + ["O"]):
        b, _, k = t.partition("-")
        if start is not None and (b in ("O", "B") or k != kind):
            out.add((kind, start, i))
            start = None
        if b == "B" or (b == "I" and start is None):
            start, kind = i, k
    return out


def entity_f1(gold: list[list[str]], pred: list[list[str]]) -> float:
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred):
        G, Pr = chunks(g), chunks(p)
        tp, n_pred, n_gold = tp + len(G & Pr), n_pred + len(Pr), n_gold + len(G)
    prec, rec = tp / max(n_pred, 1), tp / max(n_gold, 1)
    return 2 * prec * rec / max(prec + rec, 1e-12)


# -- train / eval ---------------------------------------------------------------------------------------------

def run(task, method, seed, lr, model_dir, data, device, log):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    name, opts, _ = METHODS[method]
    P.seed_everything(seed)
    if task == "sst2":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        task_type, train_rows = "SEQ_CLS", data.train
    else:
        model = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=len(data[2]))
        task_type, train_rows = "TOKEN_CLS", data[0]
    peft = unipeft.get_peft_model(model, unipeft.methods()[name].factory(task_type=task_type, **opts)).to(device)
    params = [p for p in peft.parameters() if p.requires_grad]
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i:i + 32] for i in range(0, len(order), 32)]
    warmup = math.ceil(0.06 * len(batches))
    opt = torch.optim.AdamW(params, lr=lr, eps=1e-8, weight_decay=0.0)
    sched = P.linear_warmup_decay(opt, warmup, len(batches))
    peft.train()
    t0 = time.perf_counter()
    for step, idx in enumerate(batches, 1):
        if task == "sst2":
            inputs, labels = train_rows.batch(idx)
            inputs, labels = {k: v.to(device) for k, v in inputs.items()}, labels.to(device)
            loss = F.cross_entropy(peft(**inputs).logits.float(), labels)
        else:
            inputs, labels = batch_tokens(train_rows, idx, device)
            logits = peft(**inputs).logits.float()
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            log(f"    {method} seed {seed} step {step}/{len(batches)} loss {loss.item():.4f}")
    train_s = time.perf_counter() - t0
    peft.eval()
    with torch.no_grad():
        if task == "sst2":
            correct = 0
            for s in range(0, len(data.val), 64):
                inputs, labels = data.val.batch(list(range(s, min(s + 64, len(data.val)))))
                logits = peft(**{k: v.to(device) for k, v in inputs.items()}).logits
                correct += int((logits.argmax(-1).cpu() == labels).sum())
            score = correct / len(data.val)
        else:
            val, names = data[1], data[2]
            gold, pred = [], []
            for s in range(0, len(val), 64):
                idx = list(range(s, min(s + 64, len(val))))
                inputs, labels = batch_tokens(val, idx, device)
                arg = peft(**inputs).logits.argmax(-1).cpu()
                for j, i in enumerate(idx):
                    keep = labels[j].cpu() != -100
                    p = [names[int(x)] for x in arg[j][keep]]
                    g = [names[t] for t in val[i][2]][: len(p)]
                    gold.append(g)
                    pred.append(p)
            score = entity_f1(gold, pred)
    return {"task": task, "method": method, "seed": seed, "lr": lr, "score": score, "train_s": round(train_s, 1),
            "trainable": sum(p.numel() for p in params), "device": str(device)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["sst2", "conll"], default="sst2")
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "prefix_tuning_unshifted"],
                    help="default: every method but the prefix_tuning_unshifted variant")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--lr", nargs="*", default=[], help="overrides, e.g. prefix_tuning=5e-3")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-rows", type=int, default=8000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.model_dir is None:
        from unipeft.cli.embedded import minilm_path

        a.model_dir = str(minilm_path())
    model_dir = a.model_dir
    lrs = {m: METHODS[m][2][a.task] for m in METHODS}
    for o in a.lr:
        m, v = o.split("=")
        lrs[m] = [float(x) for x in v.split(",")]
    data = P.load_data(model_dir, DATA / "sst2", train_rows=a.train_rows) if a.task == "sst2" else conll(
        model_dir, a.train_rows)
    results = []
    log = lambda s: print(s, flush=True)  # noqa: E731
    for m in a.methods:
        for lr in (lrs[m] if isinstance(lrs[m], list) else [lrs[m]]):
            for seed in a.seeds:
                r = run(a.task, m, seed, lr, model_dir, data, torch.device(a.device), log)
                results.append(r)
                log(json.dumps(r))
    summary = {}
    for r in results:
        summary.setdefault((r["method"], r["lr"]), []).append(r["score"])
    print("\n| task | method | lr | per seed | mean |\n|---|---|---:|---|---:|")
    for (m, lr), s in summary.items():
        print(f"| {a.task} | {m} | {lr:g} | {', '.join(f'{x:.4f}' for x in s)} | **{sum(s) / len(s):.4f}** |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"args": vars(a), "runs": results, "versions": P.versions(),
                                           "machine": P.machine()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

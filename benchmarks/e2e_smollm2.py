"""SmolLM2-135M on E2E NLG: prompt tuning (TEXT init) and prefix tuning vs the untuned model.

Train on the first --train-rows rows of e2e_nlg/train.jsonl (1 epoch), then evaluate on the first 200 distinct
meaning representations of validation.jsonl: loss / perplexity of the first reference, and corpus BLEU (sacrebleu)
of greedy generations against all references of each MR. CPU, fp32, 2 threads.

    .venv/bin/python benchmarks/e2e_smollm2.py --out benchmarks/results/e2e_smollm2.json
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

import torch  # noqa: E402

import unipeft  # noqa: E402
from unipeft.cli.embedded import embedded_path  # noqa: E402

DATA = Path(os.environ.get("UNIPEFT_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")) / "e2e_nlg"
PROMPT = "Meaning representation: {mr}\nDescription:"
INIT_TEXT = "Write one fluent sentence describing the restaurant with every attribute given."


def rows(path, limit=None):
    out = []
    with open(path) as f:
        for line in f:
            out.append(json.loads(line))
            if limit and len(out) >= limit:
                break
    return out


def encode(tok, mr, ref, max_length):
    p = tok(PROMPT.format(mr=mr), add_special_tokens=False)["input_ids"]
    t = tok(" " + ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + t)[:max_length]
    return ids, ([-100] * len(p) + t)[:max_length]


def collate(items, pad):
    n = max(len(i) for i, _ in items)
    ids = torch.tensor([i + [pad] * (n - len(i)) for i, _ in items])
    labels = torch.tensor([lab + [-100] * (n - len(lab)) for _, lab in items])
    return {"input_ids": ids, "attention_mask": (torch.arange(n)[None] < torch.tensor([len(i) for i, _ in items])[:, None]).long(),
            "labels": labels}


def validation(n_mrs):
    groups = {}
    for r in rows(DATA / "validation.jsonl"):
        groups.setdefault(r["meaning_representation"], []).append(r["human_reference"])
        if len(groups) > n_mrs:
            groups.pop(r["meaning_representation"])
            break
    return list(groups.items())


@torch.no_grad()
def evaluate(model, tok, val, max_length, max_new_tokens=48, batch=20):
    import sacrebleu

    model.eval()
    nll = n = 0
    for s in range(0, len(val), batch):
        b = collate([encode(tok, mr, refs[0], max_length) for mr, refs in val[s:s + batch]], tok.pad_token_id)
        out = model(**b)
        k = int((b["labels"][:, 1:] != -100).sum())
        nll, n = nll + out.loss.item() * k, n + k
    hyps = []
    tok.padding_side = "left"
    for s in range(0, len(val), batch):
        prompts = [PROMPT.format(mr=mr) for mr, _ in val[s:s + batch]]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        hyps += [t.strip().split("\n")[0] for t in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    refs = [refs for _, refs in val]
    width = max(len(r) for r in refs)
    ref_streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(hyps, ref_streams).score
    return {"loss": nll / n, "perplexity": math.exp(nll / n), "bleu": bleu, "samples": hyps[:3]}


def train(model, tok, data, lr, batch, log):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = math.ceil(len(data) / batch)
    warm = math.ceil(0.06 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warm if s < warm else max(0.0, (steps - s) / (steps - warm)))
    model.train()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = model(**collate(data[i * batch:(i + 1) * batch], tok.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (i + 1) % 25 == 0:
            log(f"  step {i + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    return time.perf_counter() - t0, steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--val-mrs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--methods", nargs="+", default=["untuned", "prompt_tuning", "prefix_tuning"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_path()
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    data = [encode(tok, r["meaning_representation"], r["human_reference"], a.max_length)
            for r in rows(DATA / "train.jsonl", a.train_rows)]
    val = validation(a.val_mrs)
    log = lambda s: print(s, flush=True)  # noqa: E731
    configs = {
        "prompt_tuning": (unipeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="TEXT",
                                                     prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=str(path)), 3e-2),
        "prefix_tuning": (unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, prefix_projection=True,
                                                     encoder_hidden_size=512), 3e-3),
    }
    results = {}
    for m in a.methods:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        row = {"method": m}
        if m != "untuned":
            cfg, lr = configs[m]
            model = unipeft.get_peft_model(model, cfg)
            row["trainable"] = model.get_nb_trainable_parameters()[0]
            row["train_s"], row["steps"] = train(model, tok, data, lr, a.batch, log)
            row["lr"] = lr
        t0 = time.perf_counter()
        row.update(evaluate(model, tok, val, a.max_length))
        row["eval_s"] = time.perf_counter() - t0
        results[m] = row
        log(json.dumps(row))
    print("\n| method | trainable | train steps | val loss | perplexity | BLEU |\n|---|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        print(f"| {m} | {r.get('trainable', 0):,} | {r.get('steps', 0)} | {r['loss']:.3f} | {r['perplexity']:.2f} | {r['bleu']:.1f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results, "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

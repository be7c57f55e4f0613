"""CPU seconds per training step of several variants, alternating steps in ONE process (issue 14 item 8).

On a shared machine wall times and separate processes mislead; one process stepping variant A, B, C, A, B, C, ...
at a fixed thread count sees the same load for each, and its CPU time per step (time.process_time) is the
steadier measure. Median over the measured rounds (after warm-up rounds). Each step: model(input_ids=...,
attention_mask=..., labels=...).loss, backward, AdamW step, zero_grad(set_to_none=True) — the call users make.

Variants (--variants): hf (HF PEFT LoRA), ours (unipeft LoRA as shipped), and ablations of ours toggled on the
same model before its step: ours_norecompute (activation recompute off), ours_noinplace (the LoRA add out of place),
ours_viewinplace (the LoRA add as addmm_ on a view of the output, as before the fix), ours_fused (LoRA inside the host
GEMMs, the CUDA default; takes effect with --dropout 0), ours_fused_nogroups (... with q|k|v and gate|up apart); old (an
earlier tree, see --old).
Same config as benchmarks/memory.py's smollm2 rows (SmolLM2-135M, LoRA r=16 on the seven linear kinds, dropout 0.05).

    PYTHONPATH=src .venv/bin/python benchmarks/cpu_step_ab.py --threads 2 --rounds 5 --variants hf ours
    git archive <commit> src/unipeft | tar -x -C /tmp/o && mv /tmp/o/src/unipeft /tmp/o/unipeft_old
    PYTHONPATH=src .venv/bin/python benchmarks/cpu_step_ab.py --old /tmp/o --variants hf old ours
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _base():
    import torch
    from transformers import AutoModelForCausalLM

    from unipeft.cli.embedded import embedded_path
    m = AutoModelForCausalLM.from_pretrained(str(embedded_path()), dtype=torch.float32)
    m.config.use_cache = False
    return m


def build_hf():
    import peft
    return peft.get_peft_model(_base(), peft.LoraConfig(task_type="CAUSAL_LM", **LORA))


def build_ours(package: str = "unipeft"):
    import importlib
    unipeft = importlib.import_module(package)
    return unipeft.get_peft_model(_base(), unipeft.LoraConfig(task_type="CAUSAL_LM", **LORA))


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def ablation(name: str):
    """A context manager turning one of ours' features off for a step (the model is shared with 'ours')."""
    if name == "ours":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for part in name.split("_")[1:]:
        if part == "norecompute":
            from unipeft.training.recompute import ActivationRecompute
            stack.enter_context(_patched(ActivationRecompute, "_open", lambda self, module, args: None))
        elif part == "noinplace":
            from unipeft.positions.weight import LinearDeltaSite
            stack.enter_context(_patched(LinearDeltaSite, "_writes_into", lambda self, module, out: False))
        elif part == "fused":  # LoRA inside the host GEMMs (positions.weight.HostForward), the CUDA default
            from unipeft.positions import weight
            stack.enter_context(_patched(weight, "FUSED_HOST_DEVICES", frozenset({"cpu"})))
        elif part == "nogroups":  # ... each linear apart (positions/host_group.py off)
            from unipeft.positions.host_group import HostGroups
            stack.enter_context(_patched(HostGroups, "active", lambda self: False))
        elif part == "viewinplace":  # before the fix: addmm_ on a 2-D view of h (autograd rebases the view)
            from unipeft import functional as Fn
            stack.enter_context(_patched(Fn, "addmm_into", lambda h, z, B, alpha: h.view(-1, h.shape[-1]).addmm_(
                z, B.t(), alpha=alpha).view(h.shape)))
        else:
            raise SystemExit(f"unknown ablation {part!r}")
    return stack


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["hf", "ours"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=LORA["lora_dropout"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=6, help="measured rounds (each variant one step per round)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", default=None, help="a variant to profile for one extra step (per-op CPU table)")
    ap.add_argument("--json", default=None, help="write the per-step records here")
    ap.add_argument("--old", default=None, help="a folder holding another copy of the package renamed unipeft_old "
                    "(git archive <commit> src/unipeft); variant 'old' trains with it, in the same process")
    a = ap.parse_args(argv)
    if a.old:
        sys.path.insert(0, a.old)
    LORA["lora_dropout"] = a.dropout

    import torch
    torch.set_num_threads(a.threads)
    models = {}
    for v in a.variants:
        kind = v if v in ("hf", "old") else "ours"
        if kind not in models:
            torch.manual_seed(0)
            m = build_hf() if kind == "hf" else build_ours("unipeft_old" if kind == "old" else "unipeft")
            m.train()
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
            models[kind] = (m, opt)
    g = torch.Generator().manual_seed(1234)
    vocab = models[next(iter(models))][0].config.vocab_size
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step(v):
        m, opt = models[v if v in ("hf", "old") else "ours"]
        with ablation(v) if v not in ("hf", "old") else contextlib.nullcontext():
            c0, w0 = time.process_time(), time.perf_counter()
            loss = m(**batch).loss
            c1 = time.process_time()
            loss.backward()
            c2 = time.process_time()
            opt.step()
            opt.zero_grad(set_to_none=True)
            c3, w3 = time.process_time(), time.perf_counter()
        return {"variant": v, "cpu": c3 - c0, "fwd": c1 - c0, "bwd": c2 - c1, "opt": c3 - c2, "wall": w3 - w0,
                "loss": loss.item(), "load": os.getloadavg()[0]}

    recs = []
    for r in range(a.warmup + a.rounds):
        for v in a.variants:
            rec = dict(step(v), round=r, measured=r >= a.warmup)
            recs.append(rec)
            print(json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in rec.items()}), flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(a.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    print(f"\nthreads={a.threads} batch={a.batch}x{a.seq} rounds={a.rounds} (alternating steps, one process)")
    ref = None
    for v in a.variants:
        xs = [x for x in recs if x["variant"] == v and x["measured"]]
        med = {k: statistics.median(x[k] for x in xs) for k in ("cpu", "fwd", "bwd", "opt", "wall")}
        ref = ref or med["cpu"]
        print(f"{v:24s} CPU s/step {med['cpu']:.3f} (fwd {med['fwd']:.3f} bwd {med['bwd']:.3f} opt {med['opt']:.3f})"
              f"  wall {med['wall']:.3f}  vs {a.variants[0]}: {med['cpu'] / ref:.3f}x  "
              f"[min {min(x['cpu'] for x in xs):.3f} max {max(x['cpu'] for x in xs):.3f}]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(recs, f)


if __name__ == "__main__":
    sys.exit(main())

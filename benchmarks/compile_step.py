"""A LoRA training step (forward + backward + AdamW) eager vs `torch.compile(model)`, on CPU.

LoRA r=16 on all seven linear kinds (q, k, v, o, gate, up, down), dropout 0 (compiled dropout draws from another
generator, so losses would not be comparable). Eager runs unipeft's default path (chunked loss, fused sibling
projections); compiled code runs the plain per-delta graph and the model's own loss. Median step time after
warm-up; the first compiled step (tracing + Inductor) is reported as compile time.

    .venv/bin/python benchmarks/compile_step.py --model tiny
    .venv/bin/python benchmarks/compile_step.py --model smollm2 --batch 2 --seq 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def build(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import unipeft
    from unipeft.cli.embedded import embedded_path

    torch.manual_seed(0)
    if name == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(str(embedded_path()), dtype=torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    model.config.use_cache = False
    peft = unipeft.get_peft_model(model, unipeft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **LORA))
    peft.train()
    return peft


def measure(fn, peft, batch, steps: int, warmup: int) -> dict:
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = fn(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 5))
    return {"first_s": round(times[0], 2), "step_s": round(statistics.median(times[warmup:]), 4), "losses": losses}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "compile_step.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(1)
    res = {"model": args.model, "batch": args.batch, "seq": args.seq}
    for mode in ("eager", "compiled"):  # a fresh, identically seeded model for each
        peft = build(args.model)
        ids = torch.randint(0, peft.config.vocab_size, (args.batch, args.seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        fn = peft if mode == "eager" else torch.compile(peft)
        res[mode] = measure(fn, peft, batch, args.steps, args.warmup)
        g = torch.Generator().manual_seed(1)
    res["compiled_vs_eager"] = round(res["compiled"]["step_s"] / res["eager"]["step_s"], 3)
    res["max_loss_diff"] = max(abs(a - b) for a, b in zip(res["eager"]["losses"], res["compiled"]["losses"]))
    res["torch"] = torch.__version__
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()

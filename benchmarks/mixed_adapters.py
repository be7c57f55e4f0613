"""Mixed-adapter batches on SmolLM2-135M: 8 rows over 8 LoRA adapters in one forward, against an 8-row batch on one
adapter and against the same 8 rows run one adapter at a time.

    python benchmarks/mixed_adapters.py [--seq 128] [--rounds 7] [--out benchmarks/results/mixed_adapters.json]

Issue 13's bars: mixed >= 0.8x the single-adapter batch's throughput and >= 3x one adapter at a time. Each round times
the three ways back to back (inference, no grad, fp32); medians are reported with versions and machine. The rows'
outputs are checked against their single-adapter runs first, so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import unipeft
from unipeft.cli.embedded import load_embedded


def build(n_adapters: int, r: int):
    model, tok = load_embedded()
    cfg = dict(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               init_lora_weights=False)  # random B: every adapter changes the output
    torch.manual_seed(0)
    peft = unipeft.get_peft_model(model, unipeft.LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, n_adapters):
        peft.add_adapter(f"a{i}", unipeft.LoraConfig(**cfg))
    return peft.eval(), tok


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/mixed_adapters.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    peft, _ = build(a.adapters, a.r)
    names = [f"a{i}" for i in range(a.adapters)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 40000, (a.adapters, a.seq), generator=g)
    mask = torch.ones_like(ids)

    def single():  # the whole batch on one adapter
        peft.set_adapter("a0")
        return peft(input_ids=ids, attention_mask=mask).logits

    def mixed():
        return peft(input_ids=ids, attention_mask=mask, adapter_names=names).logits

    def one_at_a_time():
        out = []
        for i, n in enumerate(names):
            peft.set_adapter(n)
            out.append(peft(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits)
        return torch.cat(out)

    with torch.no_grad():
        err = (mixed() - one_at_a_time()).abs().max().item()
        assert err < 1e-4, f"mixed rows differ from their single-adapter runs by {err}"
        for f in (single, mixed, one_at_a_time):  # warm-up
            f()
        times = {"single_adapter_batch": [], "mixed_batch": [], "one_adapter_at_a_time": []}
        for _ in range(a.rounds):
            times["single_adapter_batch"].append(timed(single))
            times["mixed_batch"].append(timed(mixed))
            times["one_adapter_at_a_time"].append(timed(one_at_a_time))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = a.adapters * a.seq
    result = {
        "config": vars(a), "max_abs_diff_mixed_vs_separate": err,
        "median_s": med, "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "mixed_vs_single_throughput": med["single_adapter_batch"] / med["mixed_batch"],
        "mixed_speedup_vs_one_at_a_time": med["one_adapter_at_a_time"] / med["mixed_batch"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "unipeft": unipeft.__version__},
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
    }
    print(json.dumps(result, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

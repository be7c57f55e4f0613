"""Mixed-adapter batches on SmolLM2-135M: 8 rows over 8 LoRA adapters in one forward, against an 8-row batch on one
adapter and against the same 8 rows run one adapter at a time.

    python benchmarks/mixed_adapters.py [--seq 128] [--rounds 7] [--out benchmarks/results/mixed_adapters.json]
    python benchmarks/mixed_adapters.py --device cuda --random-shape smollm2 --dtype bf16 --batch 8 --seq 512

`--random-shape smollm2` builds a LlamaForCausalLM with SmolLM2-135M's shape and random weights (no download, no
tokenizer: random token ids), so the benchmark runs on a GPU machine without the embedded model. Rows are spread
round-robin over the adapters (`--batch` rows, `--adapters` adapters).

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


SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=100000.0, tie_word_embeddings=True)  # SmolLM2-135M's config.json


def base_model(shape: str | None, device: str, dtype: torch.dtype):
    if shape is None:
        model, _ = load_embedded()
    elif shape == "smollm2":
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2))
    else:
        raise SystemExit(f"--random-shape {shape!r}: only 'smollm2' is known")
    return model.to(device=device, dtype=dtype)


def build(n_adapters: int, r: int, shape: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    model = base_model(shape, device, dtype)
    cfg = dict(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               init_lora_weights=False)  # random B: every adapter changes the output
    torch.manual_seed(0)
    peft = unipeft.get_peft_model(model, unipeft.LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, n_adapters):
        peft.add_adapter(f"a{i}", unipeft.LoraConfig(**cfg))
    return peft.eval()


def timed(fn, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=None, help="rows (default: one per adapter)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--random-shape", choices=("smollm2",), default=None,
                    help="random weights in this model's shape instead of the embedded SmolLM2")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/mixed_adapters.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    peft = build(a.adapters, a.r, a.random_shape, a.device, dtype)
    rows = a.batch or a.adapters
    names = [f"a{i % a.adapters}" for i in range(rows)]
    g = torch.Generator().manual_seed(1)
    vocab = peft.get_base_model().config.vocab_size
    ids = torch.randint(10, min(40000, vocab), (rows, a.seq), generator=g).to(a.device)
    mask = torch.ones_like(ids)

    def single():  # the whole batch on one adapter
        peft.set_adapter("a0")
        return peft(input_ids=ids, attention_mask=mask).logits

    def mixed():
        return peft(input_ids=ids, attention_mask=mask, adapter_names=names).logits

    groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n], device=a.device) for n in dict.fromkeys(names)}

    def one_at_a_time():  # each adapter on its own rows, one forward per adapter
        out = None
        for n, r in groups.items():
            peft.set_adapter(n)
            logits = peft(input_ids=ids[r], attention_mask=mask[r]).logits
            out = logits.new_empty((rows, *logits.shape[1:])) if out is None else out
            out[r] = logits
        return out

    with torch.no_grad():
        got, want = mixed().float(), one_at_a_time().float()
        err = (got - want).abs().max().item()
        # bf16: batch shapes change the kernels' summation order; the bound is relative to the logits' scale
        tol = 1e-4 if dtype == torch.float32 else 0.05 * want.abs().max().item()
        assert err < tol, f"mixed rows differ from their single-adapter runs by {err} (tolerance {tol})"
        for f in (single, mixed, one_at_a_time):  # warm-up
            f()
        times = {"single_adapter_batch": [], "mixed_batch": [], "one_adapter_at_a_time": []}
        for _ in range(a.rounds):
            times["single_adapter_batch"].append(timed(single, a.device))
            times["mixed_batch"].append(timed(mixed, a.device))
            times["one_adapter_at_a_time"].append(timed(one_at_a_time, a.device))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = rows * a.seq
    result = {
        "config": {**vars(a), "rows": rows, "model": a.random_shape or "embedded SmolLM2-135M"},
        "max_abs_diff_mixed_vs_separate": err, "tolerance": tol,
        "median_s": med, "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "mixed_vs_single_throughput": med["single_adapter_batch"] / med["mixed_batch"],
        "mixed_speedup_vs_one_at_a_time": med["one_adapter_at_a_time"] / med["mixed_batch"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "unipeft": unipeft.__version__},
        "machine": (f"{torch.cuda.get_device_name(torch.device(a.device))}, CUDA {torch.version.cuda}"
                    if a.device.startswith("cuda") else
                    f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"),
    }
    print(json.dumps(result, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""CPU micro-benchmark (issue 16): prefix tuning's training step against prompt tuning's, on the fast prefix path
(no dense mask: causal_lower_right) and the explicit dense-mask path, and the MLP reparameterization once per
forward against once per layer. A small random-weight Llama (GQA, RoPE, sdpa), fp32, one thread.

    python benchmarks/prefix_cpu.py [--steps 20] [--out benchmarks/results/prefix_cpu.json]

A step is `model(input_ids=ids, labels=ids).loss`, backward, AdamW, zero_grad. Rows are interleaved round by round
(every row once per round, after 3 warm-up rounds) so drift from other load on the machine reaches all rows alike;
the median over rounds of the process's CPU time (one thread, so other processes' load does not count) is
reported, wall-clock beside it. On CPU, SDPA has no flash kernel for a lower-right causal bias, so torch
materializes a (T, P+S) mask inside SDPA: CPU numbers show the overhead removed around the attention, not the
GPU kernel's (benchmarks/gpu.py rows ours_prefix / ours_prefix_explicit measure that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1024, max_position_embeddings=512)
BATCH, SEQ, P = 2, 128, 16

ROWS = {  # label -> (method, mask path, MLP once per forward)
    "prompt": ("prompt", "fast", True),
    "prefix_fast": ("prefix", "fast", True),
    "prefix_explicit": ("prefix", "explicit", True),
    "prefix_proj_fast": ("prefix_proj", "fast", True),
    "prefix_proj_explicit_per_layer_mlp": ("prefix_proj", "explicit", False),  # both items of issue 16 undone
}


def build(method: str):
    import unipeft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa", use_cache=False))
    cfg = {"prompt": lambda: unipeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
           "prefix": lambda: unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
           "prefix_proj": lambda: unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                             prefix_projection=True, encoder_hidden_size=256)}[method]()
    return unipeft.get_peft_model(model, cfg).train()


@contextlib.contextmanager
def per_layer_mlp(on: bool):
    """on: undo the once-per-forward MLP table (each layer computes its slice, as before issue 16)."""
    from unipeft.deltas.prefix import PrefixDelta

    begin = PrefixDelta.begin_pass
    if on:
        PrefixDelta.begin_pass = lambda self, cache: begin(self, cache=False)
    try:
        yield
    finally:
        PrefixDelta.begin_pass = begin


def main(argv=None) -> None:
    from unipeft.positions.attention_kv import prefix_mask_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "results" / "prefix_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)
    models = {label: build(method) for label, (method, _, _) in ROWS.items()}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}
    times: dict = {k: [] for k in ROWS}
    walls: dict = {k: [] for k in ROWS}
    for r in range(3 + args.steps):
        for label, (_, path, once) in ROWS.items():
            with prefix_mask_path(path), per_layer_mlp(not once):
                t, w = time.process_time(), time.perf_counter()
                models[label](input_ids=ids, labels=ids).loss.backward()
                opts[label].step()
                opts[label].zero_grad(set_to_none=True)
                dt, dw = time.process_time() - t, time.perf_counter() - w
            if r >= 3:
                times[label].append(dt)
                walls[label].append(dw)
    base = statistics.median(times["prompt"])
    rows = []
    print("| row | CPU ms / step (median) | min | x prompt | wall ms (median) |\n|---|---|---|---|---|")
    for label in ROWS:
        med, wall = statistics.median(times[label]), statistics.median(walls[label])
        rows.append({"label": label, "cpu_ms": 1e3 * med, "cpu_min_ms": 1e3 * min(times[label]),
                     "x_prompt": med / base, "wall_ms": 1e3 * wall})
        print(f"| {label} | {1e3 * med:.1f} | {1e3 * min(times[label]):.1f} | {med / base:.3f} | {1e3 * wall:.1f} |")
    meta = {"shape": SHAPE, "batch": BATCH, "seq": SEQ, "virtual_tokens": P, "threads": 1, "steps": args.steps,
            "torch": torch.__version__, "host": f"{platform.machine()} {platform.processor()}",
            "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Training-step speed and memory on one GPU, side by side: HF PEFT (defaults, bf16 adapters, + liger-kernel) and
unipeft, for LoRA, a bottleneck adapter, prefix tuning and prompt tuning, on random-weight Llama shapes.

    python benchmarks/gpu.py [--shapes 1b 8b] [--only LABEL ...] [--out benchmarks/results/gpu]

Method (as ../shared/reference/gpu-baseline.md measured HF PEFT): a Llama shape built on the GPU with random
weights in bf16 (sdpa attention, use_cache off); one fixed batch of random token ids with labels = input_ids; a step
is `model(input_ids=ids, labels=ids).loss`, backward, AdamW (torch defaults, lr 1e-4), zero_grad(set_to_none). 3
warm-up and 10 timed steps with a synchronize around each; the median is reported. Peak memory is
max_memory_allocated over warm-up and timed steps. Each row runs in its own process, so one row's allocator state
never reaches the next. Every row goes through the standard call; a row's name says what differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
               rms_norm_eps=1e-5, max_position_embeddings=8192),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
               rms_norm_eps=1e-5, max_position_embeddings=8192),
}
BATCH = {"1b": 8, "8b": 4}
SEQ = 2048
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# label -> settings. lib: hf | ours; method: lora | houlsby | scaled_parallel | prefix | prompt
ROWS = {
    "hf_lora_defaults": dict(lib="hf", method="lora"),
    "hf_lora_bf16": dict(lib="hf", method="lora", adapter_bf16=True),
    "hf_lora_bf16_liger": dict(lib="hf", method="lora", adapter_bf16=True, liger=True),
    "hf_prompt_liger": dict(lib="hf", method="prompt", liger=True),  # the frozen-backbone floor's proxy
    "hf_prefix": dict(lib="hf", method="prefix"),
    "ours_lora": dict(lib="ours", method="lora"),
    "ours_lora_liger": dict(lib="ours", method="lora", liger=True),
    # LoRA added by hooks on the linears' outputs instead of inside their GEMMs (positions.weight.HostForward off)
    "ours_lora_liger_hooks": dict(lib="ours", method="lora", liger=True, host_fused=False),
    # each linear computed apart, q|k|v and gate|up not in one node each (positions/host_group.py off)
    "ours_lora_liger_ungrouped": dict(lib="ours", method="lora", liger=True, host_groups=False),
    "ours_houlsby": dict(lib="ours", method="houlsby"),
    "ours_scaled_parallel": dict(lib="ours", method="scaled_parallel"),
    "ours_prefix": dict(lib="ours", method="prefix"),
    "ours_prefix_explicit": dict(lib="ours", method="prefix", mask_path="explicit"),  # the dense-mask reference
    "ours_prefix_proj": dict(lib="ours", method="prefix_proj"),  # MLP reparameterization, once per forward
    "ours_prompt": dict(lib="ours", method="prompt"),
    "ours_prompt_liger": dict(lib="ours", method="prompt", liger=True),  # our frozen-backbone floor
    "ours_houlsby_liger": dict(lib="ours", method="houlsby", liger=True),
    "ours_scaled_parallel_liger": dict(lib="ours", method="scaled_parallel", liger=True),
    "ours_prefix_liger": dict(lib="ours", method="prefix", liger=True),
    # the frozen base in FP8 (unipeft.quant, scheme fp8): the stretch goal against the bf16 floor above
    "ours_prompt_liger_fp8": dict(lib="ours", method="prompt", liger=True, fp8=True),
    "ours_lora_liger_fp8": dict(lib="ours", method="lora", liger=True, fp8=True),
    # with gradient checkpointing (the 8B memory rows)
    "hf_lora_bf16_liger_gc": dict(lib="hf", method="lora", adapter_bf16=True, liger=True, gc=True),
    "hf_lora_defaults_gc": dict(lib="hf", method="lora", gc=True),
    "ours_lora_gc": dict(lib="ours", method="lora", gc=True),
    "ours_lora_liger_gc": dict(lib="ours", method="lora", liger=True, gc=True),
}


def _liger(ours: bool) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    # ours computes its loss in chunks through the model's own forward; liger's fused linear-CE replaces that forward
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=not ours)


def _build(shape: str, row: dict):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if row.get("liger") and row["lib"] == "hf":
        _liger(ours=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    if row.get("liger") and row["lib"] == "ours":  # the library's opt-in: liger on this instance, our loss kept
        from unipeft.kernels import apply_liger
        apply_liger(model)
    model.config.use_cache = False
    if row.get("fp8"):
        from unipeft.quant import quantize_model
        quantize_model(model, "fp8", compute_dtype=torch.bfloat16)
    if row.get("gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    method = row["method"]
    if row["lib"] == "hf":
        import peft
        cfg = {"lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16, lora_dropout=0.0,
                                               target_modules=LINEARS),
               "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
               "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)}[method]()
        return peft.get_peft_model(model, cfg, autocast_adapter_dtype=not row.get("adapter_bf16"))
    import unipeft
    cfg = {"lora": lambda: unipeft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=16, lora_dropout=0.0,
                                              target_modules=LINEARS),
           "houlsby": lambda: unipeft.AdapterConfig.houlsby(task_type="CAUSAL_LM"),
           "scaled_parallel": lambda: unipeft.AdapterConfig.scaled_parallel(task_type="CAUSAL_LM"),
           "prompt": lambda: unipeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
           "prefix": lambda: unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
           "prefix_proj": lambda: unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                             prefix_projection=True, encoder_hidden_size=512),
           }[method]()
    pm = unipeft.get_peft_model(model, cfg)
    if row.get("host_groups") is False:
        from unipeft.positions.weight import adapter_caches
        for handle in pm._handles.values():
            adapter_caches(handle.switch)[2].enabled = False
    if row.get("gc"):
        pm.gradient_checkpointing_enable()
    return pm


def worker(shape: str, label: str) -> dict:
    if ROWS[label].get("host_fused") is False:
        from unipeft.positions import weight
        weight.FUSED_HOST_DEVICES = frozenset()
    path = ROWS[label].get("mask_path")  # which prefix mask path (unipeft.positions.attention_kv.prefix_mask_path)
    if path is None:
        return _worker(shape, label)
    from unipeft.positions.attention_kv import prefix_mask_path
    with prefix_mask_path(path):
        return _worker(shape, label)


def _worker(shape: str, label: str) -> dict:
    import torch

    row = ROWS[label]
    model = _build(shape, row)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (BATCH[shape], SEQ), generator=g).cuda()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(13):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
    step = statistics.median(times)
    prof = os.environ.get("UNIPEFT_GPU_PROFILE")  # a folder: the CUDA kernel table of two more steps goes there
    if prof:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        Path(prof).mkdir(parents=True, exist_ok=True)
        table = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=70, max_name_column_width=70)
        Path(prof, f"profile_{shape}_{label}.txt").write_text(table)
    return {"shape": shape, "label": label, "row": row, "batch": BATCH[shape], "seq": SEQ,
            "step_s": step, "step_min_s": min(times), "step_max_s": max(times),
            "tok_s": BATCH[shape] * SEQ / step, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "trainable": sum(p.numel() for p in params), "losses": losses,
            "trainable_dtypes": sorted({str(p.dtype) for p in params})}


def _versions() -> dict:
    import importlib.metadata as md
    v = {"python": platform.python_version()}
    for p in ("torch", "transformers", "peft", "liger-kernel", "triton", "accelerate"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    return v


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--shapes", nargs="*", default=["1b", "8b"], choices=sorted(SHAPES))
    ap.add_argument("--only", nargs="*", help="row labels (default: every row without _gc on 1b, every row on 8b)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=str(HERE / "results" / "gpu"))
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker)), flush=True)
        return
    records = []
    for shape in args.shapes:
        labels = args.only or [lbl for lbl in ROWS if shape == "8b" or not lbl.endswith("_gc")]
        for label in labels:
            t = time.time()
            try:
                p = subprocess.run([sys.executable, __file__, "--worker", shape, label], capture_output=True,
                                   text=True, timeout=args.timeout)
                line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
                rec = json.loads(line[7:]) if line else {"shape": shape, "label": label,
                                                         "error": (p.stderr or p.stdout)[-1500:]}
            except subprocess.TimeoutExpired:
                rec = {"shape": shape, "label": label, "error": f"timeout after {args.timeout} s"}
            rec["wall_s"] = round(time.time() - t, 1)
            records.append(rec)
            print(json.dumps({k: rec.get(k) for k in ("shape", "label", "tok_s", "peak_gib", "wall_s", "error")}),
                  flush=True)
            _write(args, argv, records)  # after every row: a call cut short keeps what it measured
    print(_write(args, argv, records))


def _write(args, argv, records) -> str:
    meta = {"versions": _versions(), "host": f"{platform.machine()} {os.cpu_count()} cpus",
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python3", "benchmarks/gpu.py"] + (argv or sys.argv[1:]))}
    import torch
    meta["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    lines = [f"<!-- {meta['command']} ({meta['date']}) -->", f"GPU: {meta['gpu']}; versions: {json.dumps(meta['versions'])}", "",
             "| shape | row | tok/s | step ms (min–max) | peak GiB | trainable | vs hf_lora_defaults | vs hf_lora_bf16_liger |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for shape in dict.fromkeys(r["shape"] for r in records):
        by = {r["label"]: r for r in records if r["shape"] == shape}
        for label, r in by.items():
            if "error" in r:
                lines.append(f"| {shape} | {label} | error: {r['error'][-150:]!r} | | | | | |")
                continue
            rel = [f"{r['tok_s'] / by[ref]['tok_s']:.2f}×" if ref in by and "tok_s" in by[ref] else ""
                   for ref in ("hf_lora_defaults", "hf_lora_bf16_liger")]
            lines.append(f"| {shape} | {label} | {r['tok_s']:,.0f} | {1e3 * r['step_s']:.0f} ({1e3 * r['step_min_s']:.0f}–"
                         f"{1e3 * r['step_max_s']:.0f}) | {r['peak_gib']:.1f} | {r['trainable']:,} | {rel[0]} | {rel[1]} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

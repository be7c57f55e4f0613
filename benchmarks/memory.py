"""Training-step memory and time, side by side: full FT, HF PEFT LoRA, unipeft LoRA, unipeft QLoRA.

Every configuration runs in its own process (a fresh heap, so peak RSS is its own). Peak RSS = VmHWM after
writing 5 to /proc/self/clear_refs just before the training loop (so model loading is not counted, the
warm-up steps are). On CUDA: torch.cuda.max_memory_allocated / reserved after reset_peak_memory_stats.
Step = forward + backward + AdamW step + zero_grad(set_to_none). Median over the measured steps after
warm-up; each step records process CPU time / wall time ("util", 2.0 = both cores ours on the CPU box).
Rounds run the configurations interleaved (A B C, A B C, ...), so load from other jobs spreads evenly.
Every row computes its loss as users do, `model(input_ids=..., attention_mask=..., labels=...).loss` in training
mode (unipeft: the chunked loss, `unipeft.training.losses.ChunkedLoss`); a row needing a special call names it.

    .venv/bin/python benchmarks/memory.py --suite smollm2 --rounds 2
    .venv/bin/python benchmarks/memory.py --suite llama1b
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLEAN_UTIL = 1.75  # a step whose process used ≥ 1.75 of the 2 cores had the machine to itself

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
                max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)
LLAMA_8B = dict(LLAMA_1B, hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, head_dim=128,
                tie_word_embeddings=False)
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, intermediate_size=28672)
LLAMA_TINY = dict(LLAMA_1B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, head_dim=16,
                  tie_word_embeddings=False)  # dry runs of the GPU suites on a CPU
SHAPES = {"llama1b": LLAMA_1B, "llama8b": LLAMA_8B, "llama70b": LLAMA_70B, "tiny": LLAMA_TINY}

# name -> (label, settings); model "smollm2" = the embedded SmolLM2-135M-Instruct, else a random Llama shape
_SMOL = dict(model="smollm2", batch=4, seq=256)
_1B = dict(model="llama1b", batch=1, seq=512, gc=True, warmup=1, steps=2)
_8B = dict(model="llama8b", batch=1, seq=2048, gc=True, warmup=1, steps=3)
SUITES = {
    "smollm2": [
        ("full", dict(_SMOL, method="full")),
        ("hf_lora", dict(_SMOL, method="hf_lora")),
        ("ours_lora", dict(_SMOL, method="lora")),
        # the floor of any adapter step on this base: the frozen model's forward, every layer's input-gradient
        # backward and the loss, with one trained virtual token (LoRA's step is this plus its own terms)
        ("floor_prompt1", dict(_SMOL, method="prompt", tokens=1)),
        # diagnostic, a special call: model(..., labels=..., skip_logits=False) builds the full logits and HF's loss
        ("ours_lora_call_skip_logits_false", dict(_SMOL, method="lora", skip_logits=False)),
        ("hf_lora_lean_heap", dict(_SMOL, method="hf_lora", lean_heap=True)),  # fairness: same heap setting
        ("ours_lora_lean_heap", dict(_SMOL, method="lora", lean_heap=True)),
        ("ours_qlora_nf4", dict(_SMOL, method="lora", quant="nf4", dtype="bfloat16")),
    ],
    # GPU (--device cuda): 8B shape at 2048 tokens, ours vs HF PEFT's QLoRA recipe on the same NF4 modules
    "llama8b": [
        ("ours_qlora_nf4_gc", dict(_8B, method="lora", quant="nf4", dtype="bfloat16")),
        ("hf_qlora_nf4_gc", dict(_8B, method="hf_lora", quant="nf4", dtype="bfloat16")),
        ("ours_qlora_nf4_gc_offload", dict(_8B, offload=True, method="lora", quant="nf4", dtype="bfloat16")),
        # + the input embedding table in host memory (unipeft.memory.host_embedding)
        ("ours_qlora_nf4_gc_hostemb", dict(_8B, host_emb=True, method="lora", quant="nf4", dtype="bfloat16")),
        ("ours_qlora_nf4_gc_offload_hostemb", dict(_8B, host_emb=True, offload=True, method="lora", quant="nf4",
                                                   dtype="bfloat16")),
        # batch 4, as in the GPU baseline's 8B LoRA rows (../shared/reference/gpu-baseline.md)
        ("ours_qlora_nf4_gc_b4", dict(_8B, batch=4, method="lora", quant="nf4", dtype="bfloat16",
                                      vs="hf_qlora_nf4_gc_b4")),
        ("hf_qlora_nf4_gc_b4", dict(_8B, batch=4, method="hf_lora", quant="nf4", dtype="bfloat16")),
    ],
    # GPU: a 70B shape at 2048 tokens, built layer by layer, under a 48 GiB cap (--mem-cap-gib 48)
    "llama70b": [
        ("ours_qlora_nf4_gc", dict(model="llama70b", batch=1, seq=2048, gc=True, warmup=1, steps=2, method="lora",
                                   quant="nf4", dtype="bfloat16")),
        # stretch: under a 24 GiB cap, the frozen NF4 layers wait in pinned host memory and visit one at a time
        ("ours_qlora_nf4_gc_stream", dict(model="llama70b", batch=1, seq=2048, gc=True, warmup=1, steps=2,
                                          method="lora", quant="nf4", dtype="bfloat16",
                                          stream=True, host_emb=True, mem_cap_gib=24)),
    ],
    "llama1b": [
        ("ours_qlora_nf4_gc", dict(_1B, method="lora", quant="nf4", dtype="bfloat16")),
        ("ours_qlora_nf4_gc_lean_heap", dict(_1B, method="lora", quant="nf4", dtype="bfloat16",
                                             lean_heap=True)),
        ("hf_lora_fp32_gc", dict(_1B, method="hf_lora", steps=1)),
    ],
}


# ----------------------------------------------------------------------------------------- one process


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024  # MiB
    return -1


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(cfg: dict):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, cfg.get("dtype", "float32"))
    device = cfg.get("device", "cpu")
    if cfg["model"] == "smollm2":
        from unipeft.cli.embedded import embedded_path
        path, config = str(embedded_path()), None
    else:
        path, config = None, LlamaConfig(**SHAPES[cfg["model"]])
    if cfg.get("quant"):
        from unipeft.quant import Quantization, load_quantized, random_source
        q = Quantization(scheme=cfg["quant"], compute_dtype=dtype)
        model = load_quantized(config or path, q, source=random_source(device=device) if config else None,
                               device=device, stream=bool(cfg.get("stream")))
    elif path:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    if cfg.get("host_emb"):  # the untied input table to host memory (1 GiB of bf16 on an 8B Llama)
        from unipeft.memory.host_embedding import embeddings_on_host
        embeddings_on_host(model, device)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    method = cfg["method"]
    if method == "full":
        if cfg.get("gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, model
    if method == "hf_lora":
        import peft
        if cfg.get("quant"):  # HF's QLoRA recipe on the same bitsandbytes modules (flags its loader would set)
            model.is_loaded_in_4bit, model.is_loaded_in_8bit = cfg["quant"] == "nf4", cfg["quant"] == "int8"
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.get("gc")),
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        elif cfg.get("gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
        return pm, pm
    import unipeft
    config = (unipeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg["tokens"]) if method == "prompt"
              else unipeft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    pm = unipeft.get_peft_model(model, config)
    if cfg.get("gc"):
        pm.gradient_checkpointing_enable(offload_activations=bool(cfg.get("offload")))
    return pm, pm


def worker(cfg: dict) -> dict:
    import torch

    if cfg.get("lean_heap"):
        from unipeft.training.hostmem import lean_heap
        lean_heap()
    torch.set_num_threads(int(cfg.get("threads", 2)))
    torch.manual_seed(0)
    device = cfg.get("device", "cpu")
    cuda = device.startswith("cuda")
    if cuda and cfg.get("mem_cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cfg["mem_cap_gib"] * 2**30 / total)
    t0 = time.time()
    model, pm = _build(cfg)
    load_s = time.time() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    # every row goes through the call users make; a row with a special call says so in its name
    call = dict(batch, **({"skip_logits": cfg["skip_logits"]} if "skip_logits" in cfg else {}))
    loss_fn = lambda: model(**call).loss  # noqa: E731

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rss_before = _status("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    steps, losses = [], []
    for i in range(cfg.get("warmup", 2) + cfg.get("steps", 5)):
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn()
        sync()
        w1 = time.perf_counter()
        loss.backward()
        sync()
        w2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        w3, c3 = time.perf_counter(), time.process_time()
        losses.append(round(loss.item(), 4))
        if i >= cfg.get("warmup", 2):
            steps.append({"s": w3 - w0, "fwd": w1 - w0, "bwd": w2 - w1, "opt": w3 - w2, "cpu": c3 - c0,
                          "util": (c3 - c0) / (w3 - w0)})
    out = {"load_s": round(load_s, 2), "rss_before_loop_mib": rss_before, "losses": losses, "steps": steps,
           "trainable": sum(p.numel() for p in params)}
    stream = getattr(model, "_unipeft_stream", None)  # PeftModel passes attributes through to the base model
    if stream is not None:
        out["layer_loads"] = stream.loads
    if cuda:
        out["peak_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        out["host_peak_rss_mib"] = _status("VmHWM")  # never reset: building the model is included
        out["gpu"] = torch.cuda.get_device_name(0)
    else:
        out["peak_rss_mib"] = _status("VmHWM")
    return out


# ----------------------------------------------------------------------------------------- the driver


def _versions() -> dict:
    import importlib.metadata as md
    v = {"python": platform.python_version()}
    for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    return v


def run_one(label: str, cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg)]
    t = time.time()
    load0 = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rec = {"label": label, "config": cfg, "wall_s": round(time.time() - t, 1), "loadavg_start": round(load0, 2)}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        rec["error"] = (p.stderr or p.stdout)[-2000:]
    else:
        rec.update(json.loads(lines[-1][len("RESULT "):]))
    return rec


def summarize(records: list[dict]) -> dict:
    by = {}
    for r in records:
        by.setdefault(r["label"], []).append(r)
    table = {}
    for label, rs in by.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            table[label] = {"error": rs[-1]["error"][-300:]}
            continue
        steps = [s for r in ok for s in r["steps"]]
        # CPU runs: a step is clean when the process had both cores; a GPU step's wall time is the GPU's
        clean = steps if "peak_alloc_mib" in ok[0] else [s for s in steps if s["util"] >= CLEAN_UTIL]
        med = lambda k, xs=(clean or steps): statistics.median(s[k] for s in xs)  # noqa: E731
        row = {"step_s": med("s"), "fwd_s": med("fwd"), "bwd_s": med("bwd"), "opt_s": med("opt"),
               "cpu_s": statistics.median(s["cpu"] for s in steps),
               "step_s_all": statistics.median(s["s"] for s in steps), "n_steps": len(steps), "n_clean": len(clean),
               "util_median": statistics.median(s["util"] for s in steps), "trainable": ok[0]["trainable"],
               "losses": ok[0]["losses"], "runs": len(ok)}
        for k in ("mem_cap_gib", "layer_loads"):
            v = ok[0].get(k, ok[0].get("config", {}).get(k))
            if v is not None:
                row[k] = v
        for k in ("peak_rss_mib", "peak_alloc_mib", "peak_reserved_mib", "host_peak_rss_mib"):
            if k in ok[0]:
                row[k] = max(r[k] for r in ok)
                row[k + "_runs"] = [round(r[k]) for r in ok]
        table[label] = row
    return table


def markdown(suite: str, table: dict, ref: str | None, refs: dict, meta: dict) -> str:
    """`ref`: the default reference row; `refs`: label -> its own reference (a config's "vs")."""
    mem = "peak_rss_mib" if any("peak_rss_mib" in r for r in table.values()) else "peak_alloc_mib"
    lines = [f"### {suite}", "", f"| config | step s (median; clean/all steps) | fwd / bwd / opt s | CPU s/step | peak "
             f"{'RSS' if mem == 'peak_rss_mib' else 'CUDA alloc (reserved; host RSS)'} MiB | trainable | util | "
             + (f"vs {ref} (or the row's own reference): time / CPU time / memory |" if ref else "vs — |"),
             "|---|---|---|---|---|---|---|---|"]
    for label, r in table.items():
        base = table.get(refs.get(label) or ref, {})
        if "error" in r:
            lines.append(f"| {label} | error: {r['error'][-120:]!r} | | | | | | |")
            continue
        vs = ""
        if label == ref or label in refs.values():
            vs = "reference"
        elif base and "error" not in base and mem in base:
            vs = (f"{r['step_s'] / base['step_s']:.2f}× / {r['cpu_s'] / base['cpu_s']:.2f}× / "
                  f"{r[mem] / base[mem]:.2f}×")
        peak = f"{r[mem]:.0f}"
        if "peak_reserved_mib" in r:  # CUDA: allocated (reserved; host peak RSS)
            peak += f" ({r['peak_reserved_mib']:.0f}; host {r.get('host_peak_rss_mib', 0):.0f})"
        if r.get("mem_cap_gib"):
            peak += f" under a {r['mem_cap_gib']:g} GiB cap"
        lines.append(f"| {label} | {r['step_s']:.2f} ({r['n_clean']}/{r['n_steps']}) | {r['fwd_s']:.2f} / {r['bwd_s']:.2f} / "
                     f"{r['opt_s']:.3f} | {r['cpu_s']:.2f} | {peak} | {r['trainable']:,} | {r['util_median']:.2f} | {vs} |")
    lines += ["", f"Step time = median over clean steps (CPU: util ≥ {CLEAN_UTIL}; GPU: all) when a configuration has any, "
              f"else over all steps (then the machine was shared and wall times are inflated; CPU s/step is the steadier "
              f"measure).",
              f"versions: {json.dumps(meta['versions'])}; host: {meta['host']}; {meta['date']}",
              f"command: `{meta['command']}`" if meta.get("command") else "", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--suite", choices=sorted(SUITES), default="smollm2")
    ap.add_argument("--only", nargs="*", help="labels to run (default: the whole suite)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, help="measured steps per process (default per config)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mem-cap-gib", type=float, help="CUDA: cap this process's GPU memory (set_per_process_memory_fraction)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="override the model shape of every config (dry runs)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=str(RESULTS / "memory"))
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    extra = {"device": args.device, **({"steps": args.steps} if args.steps else {}),
             **({"mem_cap_gib": args.mem_cap_gib} if args.mem_cap_gib else {}), **({"model": args.shape} if args.shape else {})}
    configs = [(lbl, {**c, **extra, **{k: c[k] for k in ("mem_cap_gib",) if k in c}})  # a config's own cap wins
               for lbl, c in SUITES[args.suite] if not args.only or lbl in args.only]
    meta = {"versions": _versions(), "host": f"{platform.machine()} {os.cpu_count()} cpus", "suite": args.suite,
            "command": " ".join([Path(sys.executable).name, "benchmarks/memory.py"] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    records = []
    for rnd in range(args.rounds):
        for label, cfg in configs:
            rec = run_one(label, cfg, args.timeout)
            rec["round"] = rnd
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k not in ("config",)})[:600], flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(f"{args.out}_{args.suite}_records.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
    table = summarize(records)
    labels = [lbl for lbl, _ in configs]
    ref = next((lbl for lbl in labels if lbl.startswith("hf_")), None)
    md = markdown(args.suite, table, ref, {lbl: c.get("vs") for lbl, c in configs}, meta)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}_{args.suite}.jsonl", "a") as f:
        f.write(json.dumps({"meta": meta, "table": table, "records": records}) + "\n")
    with open(f"{out}_{args.suite}.md", "w") as f:
        f.write(f"<!-- {meta['command']} ({meta['date']}) -->\n" + md)


if __name__ == "__main__":
    main()

"""`unipeft train` itself on one GPU: tokens/s from its own metrics.jsonl, for the configuration of
benchmarks/gpu.py's 1B row (random-weight Llama-3.2-1B shape in bf16, LoRA r=16 alpha 16 on all seven linears,
no dropout, AdamW lr 1e-4, batch 8 x 2048, no checkpointing), so the CLI is held to the library's number.

    python benchmarks/cli_gpu.py [--liger on off] [--steps 13] [--out OUT.json]

The model folder is written on the GPU machine (random weights, a word-level tokenizer made in code; a 128,256-row
vocabulary as the shape has, of which the tokenizer uses 203 ids: the loss costs the same). Every row is 2,100 words,
cut to 2,048 tokens. tokens/s = batch x 2048 x (steps after warm-up) / (elapsed_s between those log lines).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu import BATCH, LINEARS, SEQ, SHAPES, _versions  # noqa: E402
from gpu_selfcheck import _word_tokenizer  # noqa: E402

WARMUP = 3
DRY = dict(SHAPES["1b"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, intermediate_size=128, vocab_size=512)  # --dry-run: the same flags on a CPU in seconds
DEV = "cuda"


def build(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    words = [f"w{i}" for i in range(200)]
    tok = _word_tokenizer(folder / "model", words)
    torch.manual_seed(0)
    with torch.device(DEV):
        m = AutoModelForCausalLM.from_config(LlamaConfig(**(SHAPES["1b"] if DEV == "cuda" else DRY)),
                                             dtype=torch.bfloat16)
    m.config.pad_token_id, m.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    m.save_pretrained(folder / "model")
    rng = random.Random(0)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(BATCH["1b"] * 40):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(2100))}) + "\n")


def run(folder: Path, liger: str, steps: int) -> dict:
    out = folder / f"run_{liger}"
    cmd = [sys.executable, "-m", "unipeft.cli", "train", "--model", str(folder / "model"), "--task", "causal-lm",
           "--train", str(folder / "train.jsonl"), "--method", "lora", "--r", "16", "--lora-alpha", "16",
           "--lora-dropout", "0", "--target-modules", ",".join(LINEARS), "--lr", "1e-4", "--warmup", "0",
           "--batch-size", str(BATCH["1b"]), "--max-length", str(SEQ if DEV == "cuda" else 64), "--max-steps", str(steps),
           "--log-every", "1", "--save-every", "100000", "--liger", liger, "--output", str(out)]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    rec = {"liger": liger, "exit": p.returncode, "wall_s": round(time.time() - t, 1)}
    if p.returncode:
        return rec | {"error": (p.stderr or p.stdout)[-2000:]}
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    log = [r for r in log if "elapsed_s" in r]
    a, b = log[WARMUP - 1], log[-1]
    rec["tok_s"] = BATCH["1b"] * (SEQ if DEV == "cuda" else 64) * (b["step"] - a["step"]) / (b["elapsed_s"] - a["elapsed_s"])
    rec["losses"] = [round(r["loss"], 4) for r in log]
    rec["start_summary"] = [x for x in p.stdout.splitlines() if "device" in x or "liger" in x][:4]
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--liger", nargs="+", default=["on", "off"], choices=["auto", "on", "off"])
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--out", default=str(HERE / "results" / "cli_gpu.json"))
    ap.add_argument("--dry-run", action="store_true", help="a tiny Llama on the CPU: checks the flags, not speed")
    args = ap.parse_args(argv)
    if args.steps < WARMUP + 1:
        ap.error(f"--steps must be at least {WARMUP + 1}: tokens/s is read after {WARMUP} warm-up steps")
    global DEV
    DEV = "cpu" if args.dry_run else "cuda"
    import torch
    meta = {"versions": _versions(), "gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else None,
            "date": time.strftime("%Y-%m-%d %H:%M"), "host": f"{os.cpu_count()} cpus",
            "command": " ".join(["python3", "benchmarks/cli_gpu.py"] + (argv or sys.argv[1:]))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        build(Path(d))
        recs = []
        for liger in args.liger:
            try:
                recs.append(run(Path(d), liger, args.steps))
            except (IndexError, KeyError, ValueError, ZeroDivisionError) as e:  # a short or odd log: keep the rest
                recs.append({"liger": liger, "error": f"reading the CLI log: {type(e).__name__}: {e}"})
            print(json.dumps({k: v for k, v in recs[-1].items() if k != "losses"}), flush=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "records": recs}, indent=1))  # each run as it ends


if __name__ == "__main__":
    main()

"""Quality of training on an FP8 frozen base (`--quantize fp8`) against the same run on the full-precision base:
`unipeft train` with LoRA, same seed, data and steps, each configuration in its own process.

    sst2  MiniLM-L6 (embedded), seq-cls on SST-2: validation accuracy (872 rows)
    e2e   SmolLM2-135M-Instruct (embedded), causal-lm on E2E NLG as prompt → completion: validation loss

On a CPU torch emulates the FP8 GEMMs (slowly): the same e4m3 operands and scales as on a GPU, but with fp32 outputs
and fp32 elsewhere (the CLI's CPU precision), where a GPU run computes in bf16. Speed is measured on a GPU
(benchmarks/gpu.py, rows *_fp8).

    .venv/bin/python benchmarks/fp8_quality.py [--tasks sst2 e2e] [--gen-samples N] [--out benchmarks/results/fp8_quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("UNIPEFT_DATA", HERE.parent / ".." / "shared" / "data"))
PROMPT = "Meaning representation: {mr}\nDescription:"

TASKS = {
    "sst2": dict(metric="accuracy", args=lambda d: [
        "--model", _embedded("minilm_path"), "--task", "seq-cls", "--train", DATA / "sst2/train.jsonl",
        "--eval", DATA / "sst2/validation.jsonl", "--text-column", "sentence", "--label-column", "label",
        "--max-steps", "400", "--batch-size", "32", "--max-length", "64", "--lr", "1e-3"]),
    "e2e": dict(metric="eval_loss", args=lambda d: [
        "--model", _embedded("embedded_path"), "--task", "causal-lm", "--train", _e2e(d, "train", 1600),
        "--eval", _e2e(d, "validation", 200), "--format", "prompt-completion", "--max-steps", "200",
        "--batch-size", "8", "--max-length", "96", "--lr", "5e-4"]),
}
BASES = {"full": [], "fp8": ["--quantize", "fp8"]}


def _embedded(fn: str) -> str:
    import unipeft.cli.embedded as m
    return str(getattr(m, fn)())


def _e2e(folder: Path, split: str, n: int) -> Path:
    """The first n rows of an E2E split as prompt → completion (written to the scratch folder, never the repo)."""
    out = folder / f"e2e_{split}.jsonl"
    with open(DATA / "e2e_nlg" / f"{split}.jsonl") as f, open(out, "w") as w:
        for i, line in enumerate(f):
            if i >= n:
                break
            r = json.loads(line)
            w.write(json.dumps({"prompt": PROMPT.format(mr=r["meaning_representation"]),
                                "completion": " " + r["human_reference"]}) + "\n")
    return out


def run(task: str, base: str, scratch: Path, extra: list[str]) -> dict:
    out = scratch / f"{task}_{base}"
    cmd = [str(Path(sys.executable).with_name("unipeft")), "train", *map(str, TASKS[task]["args"](scratch)), *BASES[base],
           "--seed", "0", "--method", "lora", "--output", str(out), *extra]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{task}/{base} failed:\n{p.stderr[-3000:]}")
    res = json.loads((out / "eval_results.json").read_text())  # at the best step
    metric = TASKS[task]["metric"]
    return {"task": task, "base": base, metric: res[metric], "eval": res, "seconds": round(time.time() - t, 1),
            "command": " ".join(cmd[1:])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--out", default=str(HERE / "results" / "fp8_quality.json"))
    ap.add_argument("--gen-samples", type=int, default=None, help="e2e: rows generated for BLEU/ROUGE (CLI default 32)")
    args = ap.parse_args(argv)
    import torch
    results = []
    with tempfile.TemporaryDirectory() as d:
        for task in args.tasks:
            extra = ["--gen-samples", str(args.gen_samples)] if args.gen_samples and task == "e2e" else []
            for base in BASES:
                r = run(task, base, Path(d), extra)
                print(json.dumps(r), flush=True)
                results.append(r)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                          "torch": torch.__version__, "results": results}, indent=1))
    for r in results:
        m = TASKS[r["task"]]["metric"]
        print(f"| {r['task']} | {r['base']} | {m} {r[m]:.4f} | {r['seconds']} s |")


if __name__ == "__main__":
    main()

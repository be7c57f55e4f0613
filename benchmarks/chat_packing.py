"""--packing vs unpacked on CPU: SmolLM2-135M-Instruct (embedded) + LoRA on the Alpaca sample as `messages` rows.

Both runs see the same training examples once (--epochs 1, so the same real tokens) with ~500 real tokens per
optimizer step (unpacked: 4 rows padded to the batch's longest; packed: 2 rows of up to 256 tokens), and are
scored on the same held-out rows (unpacked evaluation). tokens/s counts real tokens, not padding.

    nice -n 10 python benchmarks/chat_packing.py --mode unpacked   # one run (a few minutes on 2 busy cores)
    nice -n 10 python benchmarks/chat_packing.py --mode packed
    python benchmarks/chat_packing.py --report                     # -> results/chat_packing.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
WORK = Path("/tmp/unipeft_chat_packing")
ALPACA = Path("/work/shared/data/alpaca/train_subset5k.jsonl")
# Small on purpose: the CPU (2 cores) was shared with ~7 other jobs (load ~12), a 135M step ran at ~6 tokens/s
N_TRAIN, N_EVAL, MAX_LEN = 24, 8, 256
ARGS = {"unpacked": ["--batch-size", "4"], "packed": ["--packing", "--batch-size", "2"]}


def messages_rows():
    WORK.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines()]
    out = []
    for r in rows:
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]})
    for name, part in (("train", out[:N_TRAIN]), ("eval", out[-N_EVAL:])):
        (WORK / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in part))


def command(mode: str) -> list[str]:
    return [sys.executable, "-m", "unipeft.cli", "train", "--train", str(WORK / "train.jsonl"), "--eval",
            str(WORK / "eval.jsonl"), "--output", str(WORK / mode), "--overwrite", "--epochs", "1", "--max-length",
            str(MAX_LEN), "--lr", "1e-3", "--log-every", "1", "--save-every", "100000", "--gen-samples", "0",
            "--seed", "0", *ARGS[mode]]


def report():
    res = {}
    for mode in ARGS:
        log = [json.loads(x) for x in (WORK / mode / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in log if "loss" in r]
        ev = json.loads((WORK / mode / "eval_results.json").read_text())
        res[mode] = {"steps": ev["steps"], "tokens_per_s": round(train[-1]["tokens_per_s"], 1),
                     "train_time_s": ev["train_runtime_s"], "eval_loss": round(ev["eval_loss"], 4),
                     "real_tokens": round(train[-1]["tokens_per_s"] * train[-1]["elapsed_s"]),
                     "command": " ".join(["unipeft"] + command(mode)[3:])}
    res["speedup"] = round(res["packed"]["tokens_per_s"] / res["unpacked"]["tokens_per_s"], 2)
    res["setup"] = (f"SmolLM2-135M-Instruct (embedded), LoRA defaults (r 16, q/k/v/o/down), {N_TRAIN} Alpaca rows as "
                    f"messages, 1 epoch, eval on the last {N_EVAL} rows of the sample, max length {MAX_LEN}, fp32, CPU "
                    "(2 cores shared with other jobs: absolute rates are noisy, the two runs ran back to back)")
    (HERE / "results" / "chat_packing.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# --packing vs unpacked (CPU)", "", res["setup"], "",
          "| run | steps | real tokens/s | train s | eval loss |", "|---|---:|---:|---:|---:|"]
    md += [f"| {m} | {res[m]['steps']} | {res[m]['tokens_per_s']:,} | {res[m]['train_time_s']} | {res[m]['eval_loss']} |"
           for m in ARGS]
    md += ["", f"Packed / unpacked tokens/s: {res['speedup']}x", "", "Commands:", ""]
    md += [f"    {res[m]['command']}" for m in ARGS]
    (HERE / "results" / "chat_packing.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=list(ARGS))
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.report:
        report()
    else:
        messages_rows()
        subprocess.run(command(a.mode), check=True)

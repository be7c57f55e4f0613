"""--packing vs unpacked on CPU, through `unipeft train` as users run it: SmolLM2-135M-Instruct (embedded) + LoRA on
the Alpaca sample as OpenAI `messages` rows.

Built for a shared, loaded CPU (2 cores, other jobs beside it):
- the runs train side by side (started together, one torch thread each, same nice), so whatever load the machine
  has hits all of them alike; a driver polls each run's metrics.jsonl (one record per step) and reads the run's
  CPU seconds from /proc/PID/stat at each step, so its rates cover training steps only (not model load or eval);
- tokens are real (non-pad) trained tokens, the CLI's own count (attention-mask sum unpacked, the collate's count
  packed); rates per CPU second (what the machine's load barely moves) and per wall second, both over each run's
  steps 2..N and over the window in which every run was training;
- same training examples for every run (one epoch of the first N_TRAIN rows), same held-out eval rows (the last
  N_EVAL rows of the sample), evaluated unpacked in both cases (--packing packs training rows only), per-token mean;
- "within noise": a second packed run with another seed gives the seed-to-seed spread the packed - unpacked
  eval-loss difference is read against.

    nice -n 10 python benchmarks/chat_packing.py            # unpacked, packed, packed seed 1 side by side; report
    nice -n 10 python benchmarks/chat_packing.py --group steps_matched   # then unpacked at the packed step count
    python benchmarks/chat_packing.py --report              # report again from WORK
    nice -n 10 python benchmarks/chat_packing.py --padding  # positions computed per real token, whole 5k sample
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
WORK = Path("/tmp/unipeft_chat_packing")
ALPACA = Path("/work/shared/data/alpaca/train_subset5k.jsonl")
# Sized for the shared 2-core CPU (load 5-12 from other jobs; ~95 positions per CPU second for a SmolLM2-135M
# LoRA step on one thread): the unpacked run is ~20 min of wall time at nice 10 beside the others
N_TRAIN, N_EVAL, MAX_LEN, LR = 80, 32, 512, 1e-3
# unpacked: 8 examples per step; packed: 2 rows of up to 512 tokens (~4.6 examples each: 80 examples in 9 steps);
# unpacked_b9 (run afterwards, alone): batch 9, the packed runs' 9 optimizer steps, for the eval-loss comparison
RUNS = {"unpacked": (["--batch-size", "8"], 0), "packed": (["--packing", "--batch-size", "2"], 0),
        "packed_seed1": (["--packing", "--batch-size", "2"], 1), "unpacked_b9": (["--batch-size", "9"], 0)}
GROUPS = {"main": ("unpacked", "packed", "packed_seed1"), "steps_matched": ("unpacked_b9",)}
POLL_S = 0.2


def user_text(r: dict) -> str:
    return r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")


def messages(r: dict) -> dict:
    return {"messages": [{"role": "user", "content": user_text(r)}, {"role": "assistant", "content": r["output"]}]}


def write_rows():
    WORK.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in ALPACA.read_text().splitlines() if line.strip()]
    assert len(rows) >= N_TRAIN + N_EVAL
    for name, part in (("train", rows[:N_TRAIN]), ("eval", rows[-N_EVAL:])):
        (WORK / f"{name}.jsonl").write_text("".join(json.dumps(messages(x)) + "\n" for x in part))


def command(run: str) -> list[str]:
    extra, seed = RUNS[run]
    return [sys.executable, "-m", "unipeft.cli", "train", "--train", str(WORK / "train.jsonl"), "--eval",
            str(WORK / "eval.jsonl"), "--format", "messages", "--output", str(WORK / run), "--overwrite",
            "--epochs", "1", "--max-length", str(MAX_LEN), "--lr", str(LR), "--log-every", "1",
            "--save-every", "100000", "--gen-samples", "0", "--seed", str(seed), *extra]


def _cpu_s(pid: int) -> float | None:
    """utime + stime of the whole process (all threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_side_by_side(group: str):
    """Start the group's runs at once; record (wall, CPU, step, cumulative real tokens) each time a step is logged."""
    runs = GROUPS[group]
    write_rows()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    procs, seen, trace, loads = {}, {}, {r: [] for r in runs}, []
    t0 = time.monotonic()
    for r in runs:
        shutil.rmtree(WORK / r, ignore_errors=True)  # no metrics.jsonl of an earlier run may be read as this one's
        log = open(WORK / f"{r}.log", "w")
        procs[r] = subprocess.Popen(command(r), stdout=log, stderr=subprocess.STDOUT, env=env)
        seen[r] = 0
    last_load = 0.0
    while any(p.poll() is None for p in procs.values()):
        now = time.monotonic()
        for r, p in procs.items():
            if p.poll() is not None:
                continue
            cpu = _cpu_s(p.pid)
            f = WORK / r / "metrics.jsonl"
            lines = f.read_text().splitlines() if f.is_file() else []
            for line in lines[seen[r]:]:
                if not line.endswith("}"):
                    break  # a line being written
                seen[r] += 1
                rec = json.loads(line)
                if "loss" in rec and cpu is not None:
                    trace[r].append({"t": round(now - t0, 3), "cpu_s": cpu, "step": rec["step"], "loss": rec["loss"],
                                     "tokens": round(rec["tokens_per_s"] * rec["elapsed_s"])})
        if now - last_load > 10:
            loads.append(os.getloadavg()[0])
            last_load = now
        time.sleep(POLL_S)
    bad = {r: p.returncode for r, p in procs.items() if p.returncode}
    if bad:
        raise SystemExit(f"runs failed: {bad}; see {WORK}/<run>.log")
    (WORK / f"trace_{group}.json").write_text(json.dumps({"trace": trace, "load_1min": loads, "nice": os.nice(0),
                                                 "wall_s": round(time.monotonic() - t0, 1)}, indent=1))


def _rate(points: list[dict]) -> dict | None:
    """Real tokens of the steps between the first and the last point, per wall and per CPU second."""
    if len(points) < 2:
        return None
    a, b = points[0], points[-1]
    tok, wall, cpu = b["tokens"] - a["tokens"], b["t"] - a["t"], b["cpu_s"] - a["cpu_s"]
    return {"steps": b["step"] - a["step"], "tokens": tok, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "tokens_per_wall_s": round(tok / wall, 2), "tokens_per_cpu_s": round(tok / cpu, 2),
            "cpu_share": round(cpu / wall, 3)}


def report():
    saved = json.loads((WORK / "trace_main.json").read_text())
    trace = saved["trace"]
    start = max(tr[0]["t"] for tr in trace.values())  # the window in which every run of the main group trained
    end = min(tr[-1]["t"] for tr in trace.values())
    later = WORK / "trace_steps_matched.json"
    extra = json.loads(later.read_text()) if later.is_file() else None
    if extra:
        trace = {**trace, **extra["trace"]}
    res = {"runs": {}}
    for r in [r for r in RUNS if r in trace]:
        ev = json.loads((WORK / r / "eval_results.json").read_text())
        tr = trace[r]
        res["runs"][r] = {
            "steps": ev["steps"], "real_tokens": tr[-1]["tokens"], "train_runtime_s": ev["train_runtime_s"],
            "first_loss": round(tr[0]["loss"], 4), "train_loss_last": round(tr[-1]["loss"], 4),
            "eval_loss": round(ev["eval_loss"], 5),
            "steps_2_to_n": _rate(tr),
            "common_window": _rate([p for p in tr if start <= p["t"] <= end]) if r in GROUPS["main"] else None,
            "command": " ".join(["unipeft"] + command(r)[3:])}
    R = res["runs"]
    u, p = R["unpacked"], R["packed"]
    if not (p["steps_2_to_n"] and u["steps_2_to_n"]):
        raise SystemExit("a run logged fewer than 2 steps: no rate (raise N_TRAIN)")
    res["speedup_per_cpu_s"] = round(p["steps_2_to_n"]["tokens_per_cpu_s"] / u["steps_2_to_n"]["tokens_per_cpu_s"], 3)
    res["speedup_per_wall_s_common_window"] = (
        round(p["common_window"]["tokens_per_wall_s"] / u["common_window"]["tokens_per_wall_s"], 3)
        if p["common_window"] and u["common_window"] else None)
    res["eval_loss_packed_minus_unpacked"] = round(p["eval_loss"] - u["eval_loss"], 5)
    res["eval_loss_seed_spread_packed"] = round(R["packed_seed1"]["eval_loss"] - p["eval_loss"], 5)
    if "unpacked_b9" in R:
        res["eval_loss_packed_minus_unpacked_same_steps"] = round(p["eval_loss"] - R["unpacked_b9"]["eval_loss"], 5)
        ld = extra["load_1min"]
        res["steps_matched_run"] = {"wall_s": extra["wall_s"], "load_1min": {"min": min(ld), "max": max(ld)} if ld
                                    else None}
    loads = saved["load_1min"]
    res["machine"] = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                      "load_1min_during_runs": {"min": min(loads), "mean": round(sum(loads) / len(loads), 2),
                                                "max": max(loads)} if loads else None,
                      "threads_per_run": 1, "nice": saved["nice"], "wall_s_all_runs": saved["wall_s"]}
    res["versions"] = _versions()
    res["setup"] = (f"SmolLM2-135M-Instruct (embedded), LoRA defaults (r 16; q/k/v/o/down), fp32, lr {LR:g}, linear "
                    f"schedule; first {N_TRAIN} Alpaca-sample rows as `messages`, 1 epoch; eval: the last {N_EVAL} "
                    f"rows, unpacked, mean token cross-entropy on the responses; max length {MAX_LEN}")
    if (WORK / "base_eval.json").is_file():
        res["base_eval_loss"] = round(json.loads((WORK / "base_eval.json").read_text())["eval_loss"], 5)
    if (WORK / "padding.json").is_file():
        res["padding_whole_sample"] = json.loads((WORK / "padding.json").read_text())
    (HERE / "results" / "chat_packing.json").write_text(json.dumps(res, indent=2) + "\n")
    md = _markdown(res)
    (HERE / "results" / "chat_packing.md").write_text(md)
    print(md)


def _markdown(res: dict) -> str:
    R, m = res["runs"], res["machine"]
    ld = m["load_1min_during_runs"]
    md = ["# --packing vs unpacked (CPU, through `unipeft train`)", "", res["setup"] + ".", "",
          f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs (1-min load {ld['min']:.1f}-{ld['max']:.1f}, "
          f"mean {ld['mean']:.1f}, during the runs); the runs {', '.join(GROUPS['main'])} trained side by side, one "
          f"torch thread each, nice {m['nice']}; {m['wall_s_all_runs'] / 60:.1f} min for all"
          + ("; unpacked_b9 ran afterwards (alone, beside other jobs: its wall rate is not comparable, its CPU rate "
             "is)" if "unpacked_b9" in R else "") + ". Versions: "
          + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
          "| run | seed | steps | real tokens | real tokens / CPU s | real tokens / wall s | same, common window "
          "| first → last train loss | eval loss |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r, x in R.items():
        s, c = x["steps_2_to_n"], x["common_window"]
        md.append(f"| {r} | {RUNS[r][1]} | {x['steps']} | {x['real_tokens']:,} | {s['tokens_per_cpu_s']:.1f} | "
                  f"{s['tokens_per_wall_s']:.2f} | {c['tokens_per_wall_s']:.2f} | "
                  f"{x['first_loss']:.3f} → {x['train_loss_last']:.3f} | {x['eval_loss']:.4f} |"
                  if c else f"| {r} | {RUNS[r][1]} | {x['steps']} | {x['real_tokens']:,} | {s['tokens_per_cpu_s']:.1f} "
                            f"| {s['tokens_per_wall_s']:.2f} | – | {x['first_loss']:.3f} → {x['train_loss_last']:.3f} "
                            f"| {x['eval_loss']:.4f} |")
    md += ["", f"**Packed / unpacked real tokens per CPU second: {res['speedup_per_cpu_s']}x**"
           + (f"; per wall second while all runs trained: {res['speedup_per_wall_s_common_window']}x."
              if res["speedup_per_wall_s_common_window"] else "."),
           f"**Eval loss, packed - unpacked (seed 0): {res['eval_loss_packed_minus_unpacked']:+.4f}**; packed seed 1 - "
           f"seed 0: {res['eval_loss_seed_spread_packed']:+.4f} (the seed-to-seed spread the difference is read "
           "against)."
           + (f" **Same 9 optimizer steps (unpacked batch 9, seed 0): packed - unpacked "
              f"{res['eval_loss_packed_minus_unpacked_same_steps']:+.4f}.**"
              if "eval_loss_packed_minus_unpacked_same_steps" in res else "")
           + (f" Untrained base on the same rows: {res['base_eval_loss']:.4f} (training moved the eval loss by "
              f"{res['base_eval_loss'] - R['packed']['eval_loss']:.3f}-{res['base_eval_loss'] - min(x['eval_loss'] for x in R.values()):.3f})."
              if "base_eval_loss" in res else ""), "",
           "Rates cover training steps 2..N of each run (step 1's allocation warm-up, model loading and evaluation "
           "excluded), measured by a driver that reads each run's metrics.jsonl and /proc CPU seconds at every "
           "step; 'common window': the same, restricted to the time in which every run was still training "
           "(the packed runs finish first). Real tokens: the CLI's count of non-pad trained tokens. The two "
           "layouts see the same examples in one epoch, but in different groups per optimizer step (packed: "
           "~9 examples per step, unpacked 8), so their training trajectories differ like two seeds' would.", "",
           "Reading: packing trains the same real tokens for "
           f"{1 / res['speedup_per_cpu_s']:.0%} of the CPU time (batch 8)"
           + (f", {R['unpacked_b9']['steps_2_to_n']['tokens_per_cpu_s'] / R['packed']['steps_2_to_n']['tokens_per_cpu_s']:.0%}"
              " against batch 9" if "unpacked_b9" in R else "")
           + "; the speed-up stays under the whole sample's positions ratio below (not separated here: a position "
           "of a ~500-token packed row costs more attention than one of a shorter padded row, and 80 rows pad "
           "differently from 5,000). The eval-loss differences between "
           "layouts are of the size of those between seeds and between batch sizes of the same layout, and small "
           "against what training moved: the same eval loss within noise, as expected (packing changes which "
           "examples share a step, not any example's loss: tests/test_packing.py checks that to 1e-5).", "",
           "Commands (`nice -n 10 python benchmarks/chat_packing.py [--group steps_matched]` starts them, "
           "OMP_NUM_THREADS=1):", ""]
    md += [f"    {x['command']}" for x in R.values()]
    if "padding_whole_sample" in res:
        p = res["padding_whole_sample"]
        md += ["", f"Whole sample ({p['examples']:,} rows as messages, {p['real_tokens']:,} real tokens, mean "
               f"{p['mean_length']} tokens, max length {p['max_length']}): unpacked batches of 8 compute "
               f"{1 / p['unpacked_batch8_real_fraction']:.2f} positions per real token, packed rows (2 per batch, "
               f"{p['examples_per_row']} examples per row) {1 / p['packed_2rows_real_fraction']:.2f}: "
               f"{p['computed_positions_ratio']}x fewer positions (`python benchmarks/chat_packing.py --padding`; "
               "tokenizer only), the bound on the CPU speed-up when a position costs the same in both layouts."]
    return "\n".join(md) + "\n"


def padding(batch=8, rows=2, max_length=MAX_LEN):
    """Real tokens / computed positions over the whole sample: unpacked batches of `batch` examples in a random
    order vs packed rows (`rows` per batch). Per-position cost is the same, so this bounds the speed-up."""
    import torch
    from transformers import AutoTokenizer

    from unipeft.cli.embedded import embedded_path
    from unipeft.cli.lm import CausalLM
    from unipeft.cli.packing import pack

    WORK.mkdir(exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(embedded_path()))
    mrows = [messages(json.loads(x)) for x in ALPACA.read_text().splitlines() if x.strip()]
    task = CausalLM.from_data(tok, max_length, mrows, "messages", {})
    feats, truncated = task.encode(mrows, "messages")
    lens = [len(f["input_ids"]) for f in feats]
    perm = torch.randperm(len(lens), generator=torch.Generator().manual_seed(0)).tolist()
    unpacked = sum(batch * max(lens[i] for i in perm[k:k + batch]) for k in range(0, len(perm), batch))
    plens = [len(r["input_ids"]) for r in pack(feats, max_length)]
    pperm = torch.randperm(len(plens), generator=torch.Generator().manual_seed(0)).tolist()
    packed = sum(rows * max(plens[i] for i in pperm[k:k + rows]) for k in range(0, len(pperm), rows))
    real = sum(lens)
    out = {"examples": len(lens), "truncated": truncated, "real_tokens": real, "mean_length": round(real / len(lens), 1),
           "max_length": max_length, "packed_rows": len(plens), "examples_per_row": round(len(lens) / len(plens), 2),
           f"unpacked_batch{batch}_real_fraction": round(real / unpacked, 4),
           f"packed_{rows}rows_real_fraction": round(real / packed, 4),
           "computed_positions_ratio": round(unpacked / packed, 2)}
    (WORK / "padding.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def base_eval():
    """The untrained base's eval loss on the same held-out rows, the same way the CLI scores them: the scale
    against which the runs' eval-loss differences are read."""
    import torch

    from unipeft.cli.data import read_rows
    from unipeft.cli.embedded import embedded_path
    from unipeft.cli.evaluate import run_eval
    from unipeft.cli.lm import CausalLM
    from unipeft.cli.modeling import load_model, load_tokenizer

    torch.set_num_threads(1)
    write_rows()
    path = str(embedded_path())
    tok = load_tokenizer(path, "causal-lm")
    train = read_rows(str(WORK / "train.jsonl"), "--train")
    task = CausalLM.from_data(tok, MAX_LEN, train, "train.jsonl", {"format": "messages"})
    feats, _ = task.encode(read_rows(str(WORK / "eval.jsonl"), "--eval"), "eval")
    m = run_eval(load_model(path, task, tok), task, feats, 8)
    (WORK / "base_eval.json").write_text(json.dumps({"eval_loss": m["eval_loss"]}))
    print(m)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _versions() -> dict:
    import torch
    import transformers

    import unipeft

    return {"unipeft": unipeft.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--padding", action="store_true")
    ap.add_argument("--base", action="store_true", help="the untrained base's eval loss on the same rows")
    ap.add_argument("--group", choices=list(GROUPS), default="main",
                    help="main: unpacked, packed, packed seed 1 side by side; steps_matched: unpacked batch 9, after")
    a = ap.parse_args()
    if a.padding:
        padding()
    elif a.base:
        base_eval()
    elif a.report:
        report()
    else:
        run_side_by_side(a.group)
        report()

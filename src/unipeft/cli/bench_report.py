"""The bench's outputs: results.json (every cell record), results.csv (one line per cell), results.md (the method x
task table, each cell a number or the reason it cannot exist, then the details) and plots: per task the metric
against trainable % (log x axis, one labelled point per row, the papers' picture), and time / memory bars."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from . import bench_plan as BP

CSV_FIELDS = ("task", "row", "impl", "seed", "status", "metric_name", "metric", "trainable", "trainable_pct",
              "steps", "s_per_step", "train_s", "eval_s", "eval_merged_s", "merged_eval_loss_delta",
              "merged_metric_delta", "gen_s",
              "wall_s", "cpu_s", "peak_mem_mb", "peak_rss_mb", "lr", "reason")


def _row_label(row: str, impl: str) -> str:
    plan = BP.METHODS[row]
    name = "full fine-tuning" if plan.method is None else row
    return f"{name} (HF PEFT)" if impl == "peft" else name


def flat(records, cells) -> list[dict]:
    out = []
    for c, r in zip(cells, records):
        task = BP.TASKS[c.task]
        out.append({"task": c.task, "row": BP.row_key(BP.METHODS[c.row], c.impl), "impl": c.impl, "seed": c.seed,
                    "status": r.get("status"), "metric_name": task.metric, "metric": r.get("metric"),
                    **{k: r.get(k) for k in CSV_FIELDS[7:-1]}, "reason": r.get("reason"),
                    "transformers": (r.get("versions") or {}).get("transformers"),
                    "setup_cpu_s": (r.get("cpu_phases_s") or {}).get("setup"),
                    "threads": (r.get("spec") or {}).get("threads") or 2})  # bench_cell's default
    return out


def aggregate(lines: list[dict]) -> dict[tuple[str, str], dict]:
    """(task, row) -> mean over the seeds that finished, or the reason of a cell that cannot exist / failed."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for ln in lines:
        groups.setdefault((ln["task"], ln["row"]), []).append(ln)
    out = {}
    for key, g in groups.items():
        ok = [x for x in g if x["status"] == "ok"]
        if ok:
            mean = lambda k: sum(x[k] for x in ok if x[k] is not None) / len(ok)  # noqa: E731
            out[key] = {"status": "ok", "n": len(ok), "metric": mean("metric"), "trainable": ok[0]["trainable"],
                        "trainable_pct": ok[0]["trainable_pct"], "s_per_step": mean("s_per_step"),
                        "eval_s": mean("eval_s"), "peak_mem_mb": mean("peak_mem_mb"), "impl": g[0]["impl"],
                        "eval_merged_s": ok[0].get("eval_merged_s"), "cpu_s": _mean_known(ok, "cpu_s"),
                        "transformers": ok[0].get("transformers"),
                        "failed": len(g) - len(ok)}
        else:
            out[key] = {"status": g[0]["status"], "reason": g[0]["reason"], "impl": g[0]["impl"]}
    return out


def _mean_known(group: list[dict], key: str) -> float | None:
    vals = [x[key] for x in group if x.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def cpu_summary(lines: list[dict]) -> str:
    """The bench's cost on an idle machine, estimated from the cells' CPU seconds (which do not grow with other
    jobs' load, unlike wall seconds): a cell's setup (tokenizer, rows, model load) runs on one core, the rest on at
    most its `threads` torch threads, so setup + rest / threads is its wall time with the cores to itself, a floor
    (perfect scaling of the rest); total / threads is a floor of that. The forkserver's one-off imports and the
    report come on top."""
    known = [ln for ln in lines if ln.get("cpu_s") is not None]
    if not known:
        return ""
    threads = [ln.get("threads") or 2 for ln in known]
    cpu = sum(ln["cpu_s"] for ln in known)
    serial = [min(ln.get("setup_cpu_s") or 0.0, ln["cpu_s"]) for ln in known]
    idle = sum(s + (ln["cpu_s"] - s) / n for ln, s, n in zip(known, serial, threads))
    floor = sum(ln["cpu_s"] / n for ln, n in zip(known, threads))
    shown = (f"{threads[0]} thread{'s' if threads[0] > 1 else ''}" if len(set(threads)) == 1
             else f"{min(threads)}-{max(threads)} threads")
    wall = sum(ln["wall_s"] for ln in lines if ln.get("wall_s") is not None)
    missing = len(lines) - len(known)
    return (f"CPU time of the {len(known)} cells: {cpu / 60:.1f} min ({sum(serial) / 60:.1f} min of it in the cells' "
            f"one-core setup), i.e. about {idle / 60:.1f} min of wall time on an idle machine (cells of {shown}; at "
            f"least {floor / 60:.1f}); this run's cells took {wall / 60:.1f} min of wall time"
            + (f"; {missing} cell(s) without a CPU time (from an older run) not counted" if missing else "") + ".")


def caveats(agg: dict, budget: str) -> dict[tuple[str, str], str]:
    """(task, row) -> the known defect behind a reference cell's number (bench_plan.reference_caveat)."""
    out = {}
    for (t, rk), a in agg.items():
        if a["status"] == "ok":
            text = BP.reference_caveat(BP.METHODS[rk.split("@")[0]], a["impl"], BP.TASKS[t].budgets[budget],
                                       a.get("transformers"))
            if text:
                out[t, rk] = text
    return out


def markdown(lines, tasks, rows, budget, command, wall_s) -> str:
    agg = aggregate(lines)
    marked = caveats(agg, budget)
    row_keys = list(dict.fromkeys(ln["row"] for ln in lines))
    L = [f"# unipeft bench — budget `{budget}`", "",
         f"Command: `unipeft {command}`" if command else "", "",
         "Each cell: the task metric (trainable % of the base model's parameters). `n/a`: the cell cannot exist, "
         "with the implementation's own reason; `failed`: it should exist but did not finish (a bug or a limit).", "",
         "| method | " + " | ".join(BP.TASKS[t].title for t in tasks) + " |",
         "|---|" + "---:|" * len(tasks)]
    notes, k, daggers = [], 0, {}
    for rk in row_keys:
        impl = "peft" if rk.endswith("@peft") else "unipeft"
        cells = []
        for t in tasks:
            a = agg.get((t, rk))
            if a is None:
                cells.append("")
            elif a["status"] == "ok":
                mark = ""
                if (t, rk) in marked:  # one dagger per distinct cause, numbered in the order they appear
                    mark = " " + "†" * daggers.setdefault(marked[t, rk], len(daggers) + 1)
                cells.append(f"{a['metric']:.4f}{mark} ({a['trainable_pct']:.3g}%)"
                             + (f" n={a['n']}" if a["n"] > 1 else ""))
            else:
                k += 1
                notes.append(f"{k}. {BP.TASKS[t].name} × {_row_label(rk.split('@')[0], impl)}: {a['reason']}")
                cells.append(f"{a['status']} [{k}]")
        L.append(f"| {_row_label(rk.split('@')[0], impl)} | " + " | ".join(cells) + " |")
    no_ref = [r for r in rows if BP.METHODS[r].method and not BP.METHODS[r].hf_config]
    if no_ref:
        L += ["", f"No HF PEFT reference row for {', '.join(no_ref)}: HF PEFT 0.21 has no such method "
                  "(bottleneck adapters live in AdapterHub `adapters`: benchmarks/results/sst2.md compares them)."]
    if daggers:
        L += [""] + [f"{'†' * n} Not HF PEFT's quality: {text}." for text, n in daggers.items()]
    if notes:
        L += ["", "Cells without a number:", ""] + notes
    L += ["", "## Details", "", "| task | method | metric | trainable | trainable % | s/step | eval s | eval s merged "
          "| cell CPU s | peak MB (cell) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (t, rk), a in agg.items():
        if a["status"] != "ok":
            continue
        mark = " " + "†" * daggers[marked[t, rk]] if (t, rk) in marked else ""
        L.append(f"| {t} | {_row_label(rk.split('@')[0], a['impl'])} | {a['metric']:.4f}{mark} | {a['trainable']:,} | "
                 f"{a['trainable_pct']:.4g} | {a['s_per_step']:.3f} | {a['eval_s']:.2f} | "
                 + (f"{a['eval_merged_s']:.2f}" if a.get("eval_merged_s") is not None else "–")
                 + " | " + (f"{a['cpu_s']:.1f}" if a.get("cpu_s") is not None else "–")
                 + f" | {a['peak_mem_mb']:.0f} |")
    L += ["", "## Plan", ""]
    for t in tasks:
        tp, b = BP.TASKS[t], BP.TASKS[t].budgets[budget]
        L.append(f"- **{tp.title}**: {tp.model}, {tp.cli_task}, {b.train_rows} train rows, batch {b.batch_size} "
                 f"({b.steps} steps, 1 epoch), max length {b.max_length}, {b.eval_rows} eval rows"
                 + (f", {b.gen_rows} generated ({b.max_new_tokens} new tokens)" if b.gen_rows else "")
                 + (f"; {tp.note}" if tp.note else ""))
    for r in rows:
        p = BP.METHODS[r]
        lrs = ", ".join(f"{t} {p.lr_for(t):g}" for t in tasks)
        L.append(f"- **{_row_label(r, 'unipeft')}** (lr {lrs}): {p.source}")
    L += ["", f"Protocol: AdamW (eps {BP.ADAM_EPS:g}, no weight decay), linear warmup over {BP.WARMUP_RATIO:.0%} of "
              f"the steps then linear decay, gradient clipping {BP.MAX_GRAD_NORM:g}, fp32, CPU. s/step: training "
              "wall time per optimizer step; eval s: the evaluation forward passes (no generation); eval s merged: the same "
              "after merge_and_unload() where the implementation merges the method (–: it does not); cell CPU s: the "
              "cell process's CPU seconds (all threads; setup, training, evaluation); peak MB: the "
              "cell process's peak RSS above its start (the preloaded runtime excluded). Times come from a "
              "shared machine: compare within a run only.",
          f"Wall time of this invocation: {wall_s / 60:.1f} min (cells resumed from an earlier run not counted).",
          cpu_summary(lines)]
    return "\n".join(x for x in L) + "\n"


def csv_text(lines) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for ln in lines:
        w.writerow({k: ln.get(k) for k in CSV_FIELDS})
    return buf.getvalue()


def plots(out: Path, lines, tasks, budget: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(lines)
    marked = caveats(agg, budget) if budget else {}
    files = []
    for t in tasks:
        tp = BP.TASKS[t]
        pts = [(rk, a) for (tt, rk), a in agg.items() if tt == t and a["status"] == "ok" and a["trainable_pct"] > 0]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for rk, a in pts:
            hf = rk.endswith("@peft")
            ax.scatter(a["trainable_pct"], a["metric"], marker="s" if hf else "o", color="tab:orange" if hf else
                       ("black" if BP.METHODS[rk.split("@")[0]].method is None else "tab:blue"))
            label = _row_label(rk.split("@")[0], "peft" if hf else "unipeft") + (" † base model's" if (t, rk) in marked
                                                                                 else "")
            ax.annotate(label, (a["trainable_pct"], a["metric"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (% of the base model, log scale)")
        ax.set_ylabel(tp.metric + ("" if tp.greater_is_better else " (lower is better)"))
        ax.set_title(f"{tp.title}: metric vs trainable %")
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        f = out / "plots" / f"{t}_metric_vs_trainable.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    for key, label, name in (("s_per_step", "training s/step", "time"), ("peak_mem_mb", "peak MB above start",
                                                                         "memory")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 5), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            bars = [(rk, a[key]) for (tt, rk), a in agg.items() if tt == t and a["status"] == "ok"]
            ax.barh([_row_label(rk.split("@")[0], "peft" if rk.endswith("@peft") else "unipeft") for rk, _ in bars],
                    [v for _, v in bars], color=["tab:orange" if rk.endswith("@peft") else "tab:blue" for rk, _ in bars])
            ax.set_title(BP.TASKS[t].title, fontsize=9)
            ax.set_xlabel(label)
            ax.tick_params(axis="y", labelsize=7)
            ax.invert_yaxis()
        fig.tight_layout()
        f = out / "plots" / f"{name}.png"
        fig.savefig(f, dpi=110)
        plt.close(fig)
        files.append(f)
    return files


def write_all(out: Path, records, cells, tasks, rows, budget, command=None, wall_s=0.0) -> list[Path]:
    from ..io.atomic import write_text

    lines = flat(records, cells)
    write_text(out / "results.json", json.dumps({"budget": budget, "command": command, "tasks": tasks,
                                                  "methods": rows, "cells": records}, indent=1, default=str) + "\n")
    write_text(out / "results.csv", csv_text(lines))
    write_text(out / "results.md", markdown(lines, tasks, rows, budget, command, wall_s))
    return [out / "results.md", out / "results.csv", out / "results.json"] + plots(out, lines, tasks, budget)


BEGIN, END = "<!-- bench:begin (generated by unipeft bench --doc; edits here are overwritten) -->", "<!-- bench:end -->"


def fill_doc(doc: Path, results_md: str, plots: list[Path]) -> None:
    """Replace the generated section of a results document (between BEGIN and END) with this run's table and
    plots (linked relative to the document); the hand-written text around it (the claims) stays."""
    import os

    from ..io.atomic import write_text

    doc = Path(doc)
    text = doc.read_text() if doc.is_file() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} has no generated section: add the marker lines {BEGIN!r} and {END!r}")
    body = results_md.split("\n", 1)[1].replace("\n## ", "\n### ")  # the run's title line goes; sections nest
    pics = " ".join(f"![{p.stem}]({os.path.relpath(p, doc.resolve().parent)})" for p in plots)
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    write_text(doc, f"{head}{BEGIN}\n{body.strip()}\n\n{pics}\n{END}{tail}")

"""`unipeft bench`: every method x task cell of the fixed plan (bench_plan.py), each in its own process, then the
report (bench_report.py). Resumable: each finished cell is a JSON file in OUT/cells/ written atomically and
stamped with its plan fingerprint; a rerun of the same command skips those and runs the rest (cells that failed
or whose plan changed are run again)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import bench_plan as BP
from .errors import CliError


@dataclass(frozen=True)
class Cell:
    task: str
    row: str  # MethodPlan.row
    impl: str  # "unipeft" | "peft"
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}__{BP.row_key(BP.METHODS[self.row], self.impl)}__s{self.seed}"


def default_data_dir() -> Path:
    """As the tests and benchmarks find it: $UNIPEFT_DATA, else shared/data beside the repository."""
    if os.environ.get("UNIPEFT_DATA"):
        return Path(os.environ["UNIPEFT_DATA"])
    repo = Path(__file__).resolve().parents[3]
    return (repo.parent / "shared" / "data").resolve()


def _names(value: str, known, what: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    if names == ["all"]:
        return list(known)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise CliError(f"unknown {what} {', '.join(map(repr, bad)) or '(none given)'}",
                       f"choose from: all, {', '.join(known)} (comma-separated)")
    return names


def plan_cells(tasks: list[str], rows: list[str], seeds: list[int], reference: bool) -> list[Cell]:
    cells = []
    for t in tasks:
        for r in rows:
            for s in seeds:
                cells.append(Cell(t, r, "unipeft", s))
                if reference and BP.METHODS[r].hf_config:
                    cells.append(Cell(t, r, "peft", s))
    return cells


def _finished(path: Path, fp: str) -> bool:
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return rec.get("fingerprint") == fp and rec.get("status") in ("ok", "n/a")


def _record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # removed, or a run cut off before this cell
        return {"status": "not run", "reason": "no result yet (the bench was stopped before this cell, or its file "
                                               "was removed): rerun the same command to run it"}


def _context():
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["unipeft.cli.bench_cell"])  # torch/transformers/unipeft imported once
    return ctx


def run_one(ctx, cell: Cell, spec: dict, out_file: Path, timeout: int) -> dict:
    from .bench_cell import run_cell
    from ..io.atomic import write_text

    p = ctx.Process(target=run_cell, args=(spec, str(out_file)), name=cell.key)
    p.start()
    try:
        p.join(timeout)
    except KeyboardInterrupt:  # the cell leaves no file (its writes are atomic): a rerun runs it again
        p.terminate()
        p.join(10)
        raise CliError(f"interrupted during cell {cell.key}; the finished cells are kept in {out_file.parent}",
                       "rerun the same command to resume", exit_code=130) from None
    if p.is_alive():
        p.terminate()
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
        rec = {"status": "failed", "reason": f"timed out after {timeout} s (the budget's cell_timeout_s)"}
    elif p.exitcode != 0 or not out_file.is_file():
        rec = {"status": "failed", "reason": f"the cell's process died (exit code {p.exitcode}; killed for "
                                             f"memory?) before writing its result"}
    else:
        return json.loads(out_file.read_text())
    rec.update(spec=spec, fingerprint=None)  # never counted as finished: rerun on resume
    write_text(out_file, json.dumps(rec, indent=1) + "\n")
    return rec


def bench_command(ns) -> int:
    from . import bench_report

    tasks = _names(ns.tasks, list(BP.TASKS), "task")
    rows = _names(ns.methods, list(BP.METHODS), "method")
    seeds = [int(s) for s in str(ns.seeds).split(",") if s.strip()]
    data_dir = Path(ns.data_dir) if ns.data_dir else default_data_dir()
    missing = [BP.TASKS[t].folder for t in tasks if not (data_dir / BP.TASKS[t].folder).is_dir()]
    if missing:
        raise CliError(f"data dir {data_dir} lacks {', '.join(missing)}/",
                       "pass --data-dir DIR (the folder holding sst2/, conll2003/, e2e_nlg/, alpaca/) or set "
                       "UNIPEFT_DATA")
    out = Path(ns.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = plan_cells(tasks, rows, seeds, not ns.no_reference)
    todo = []
    for c in cells:
        task, plan = BP.TASKS[c.task], BP.METHODS[c.row]
        budget = task.budgets[ns.budget]
        fp = BP.fingerprint(task, budget, plan, c.impl, c.seed)
        f = out / "cells" / f"{c.key}.json"
        if not _finished(f, fp):
            todo.append((c, fp, f, budget))
    print(f"unipeft bench: {len(cells)} cells ({len(tasks)} tasks x {len(rows)} methods"
          f"{' + HF PEFT references' if not ns.no_reference else ''}, seeds {seeds}), budget {ns.budget}; "
          f"{len(cells) - len(todo)} already done in {out}, "
          + ("report only" if ns.report_only else f"{len(todo)} to run"), flush=True)
    if ns.report_only:
        todo = []  # write the report from the cells already there (the rest show as "not run")
    t0 = time.time()
    ctx = _context() if todo else None
    for i, (c, fp, f, budget) in enumerate(todo, 1):
        spec = {"task": c.task, "row": c.row, "impl": c.impl, "seed": c.seed, "budget": ns.budget,
                "data_dir": str(data_dir), "threads": ns.threads, "fingerprint": fp}
        rec = run_one(ctx, c, spec, f, budget.cell_timeout_s)
        shown = (f"{BP.TASKS[c.task].metric} {rec['metric']:.4f}, {rec['trainable_pct']:.3g}% trainable, "
                 f"{rec['s_per_step']:.2f} s/step" if rec["status"] == "ok" else f"{rec['status']}: {rec['reason'][:160]}")
        print(f"[{i}/{len(todo)}] {c.key}: {shown} ({rec.get('wall_s', '?')} s, CPU {rec.get('cpu_s', '?')} s; "
              f"{time.time() - t0:.0f} s so far)",
              flush=True)
    records = [_record(out / "cells" / f"{c.key}.json") for c in cells]
    files = bench_report.write_all(out, records, cells, tasks, rows, ns.budget, command=" ".join(sys.argv[1:]) or None,
                                   wall_s=time.time() - t0)
    if ns.doc:
        bench_report.fill_doc(Path(ns.doc), (out / "results.md").read_text(),
                              [f.resolve() for f in files if f.suffix == ".png"])
        files.append(Path(ns.doc))
    print("wrote " + ", ".join(str(p) for p in files), flush=True)
    failed = [c.key for c, r in zip(cells, records) if r.get("status") == "failed"]
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0

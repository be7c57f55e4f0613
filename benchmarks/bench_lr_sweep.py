"""Learning-rate sweep of one `unipeft bench` cell: the same task, budget, seed and options as the plan
(src/unipeft/cli/bench_plan.py), only the lr replaced; one line of JSON per lr. Where the plan's lr for a budget
comes from such a sweep, bench_plan.py cites the result file.

    .venv/bin/python benchmarks/bench_lr_sweep.py --task sst2 --row lora --lrs 5e-4 2e-3 5e-3 \
        --out benchmarks/results/bench_lr_sweep.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from unipeft.cli import bench_cell
from unipeft.cli import bench_plan as BP
from unipeft.cli.bench import default_data_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=sorted(BP.TASKS))
    ap.add_argument("--row", required=True, choices=sorted(BP.METHODS))
    ap.add_argument("--impl", default="unipeft", choices=BP.IMPLS)
    ap.add_argument("--lrs", nargs="+", type=float, required=True)
    ap.add_argument("--budget", default="full", choices=BP.BUDGETS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    plan = BP.METHODS[args.row]
    try:
        for lr in args.lrs:
            BP.METHODS[args.row] = dataclasses.replace(plan, lr={**plan.lr, args.task: lr})
            spec = {"task": args.task, "row": args.row, "impl": args.impl, "seed": args.seed, "budget": args.budget,
                    "data_dir": str(default_data_dir()), "threads": 2}
            t0 = time.time()
            try:
                rec = bench_cell.run(spec)
                line = {"cell_lr": rec["lr"], "metric": rec["metric"], "metrics": rec["metrics"],
                        "first_loss": rec.get("first_loss"),
                        "last_loss": rec.get("last_loss")}
            except Exception as e:  # a diverged lr is a result, not a crash of the sweep
                line = {"error": f"{type(e).__name__}: {e}"[:300]}
            line = {"task": args.task, "row": args.row, "impl": args.impl, "budget": args.budget, "seed": args.seed,
                    "lr": lr, "wall_s": round(time.time() - t0, 1), **line,
                    "date": time.strftime("%Y-%m-%d %H:%M")}
            print(json.dumps(line), flush=True)
            with open(Path(args.out), "a") as f:
                f.write(json.dumps(line) + "\n")
    finally:  # the module's plan as it was, whatever stopped the sweep
        BP.METHODS[args.row] = plan


if __name__ == "__main__":
    main()

"""benchmarks/sst2.py's table: one row per (method, lr); only a method's default-lr row is compared to its reference."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sst2  # noqa: E402


def _run(key, seed, lr, acc):
    return {"key": key, "seed": seed, "lr": lr, "acc": acc, "s_per_step": 1.0, "peak_rss_mb": 1.0,
            "trainable_params": 1, "machine": {"cpu": "x"}}


def test_sweep_points_are_rows_of_their_own_and_not_compared():
    d = sst2.METHODS["multi_head_parallel"].lr
    ref = sst2.METHODS["ah_houlsby"].lr
    runs = [_run("multi_head_parallel", 0, d, 0.80), _run("multi_head_parallel", 1, d, 0.70),
            _run("multi_head_parallel", 0, d * 10, 0.50),
            _run("houlsby", 0, ref, 0.82), _run("houlsby", 0, ref / 10, 0.10), _run("ah_houlsby", 0, ref, 0.81)]
    rows, criteria = sst2.summarise(runs, [0, 1])
    mh = {r["lr"]: r for r in rows if r["key"] == "multi_head_parallel"}
    assert sorted(mh) == sorted([d, d * 10])
    assert abs(mh[d]["mean"] - 0.75) < 1e-12 and mh[d]["default_lr"]
    assert mh[d * 10]["mean"] == 0.50 and not mh[d * 10]["default_lr"]
    # the houlsby criterion uses the default-lr runs only (0.82 vs 0.81), never the 0.10 sweep point
    (c,) = criteria
    assert c["method"] == "houlsby" and abs(c["ours"] - 0.82) < 1e-12 and c["passed"] is True
    sweep = next(r for r in rows if r["key"] == "houlsby" and not r["default_lr"])
    assert "delta" not in sweep and "(lr sweep)" in sst2.markdown(_result(runs, rows, criteria))


def _result(runs, rows, criteria):
    return {"seeds": [0, 1], "summary": rows, "criteria": criteria, "versions": {}, "machine": {}, "train_rows": 1,
            "val_rows": 1, "wall_s": 0.0, "runs": [], "data_fingerprints": {}, "command": "x"}


def test_table_shows_every_seed_and_variant_rows_apart():
    # a resume for seeds 1 2 still shows seed 0's column; a variant is its own row, labelled, never compared
    d, flat = sst2.METHODS["multi_head_parallel"].lr, sst2.METHODS["multi_head_parallel_flat"].lr
    runs = [_run("multi_head_parallel", 0, d, 0.75), _run("multi_head_parallel", 2, d, 0.77),
            _run("multi_head_parallel_flat", 0, flat, 0.60)]
    rows, criteria = sst2.summarise(runs, [2])
    result = _result(runs, rows, criteria)
    result["seeds"] = [2]
    md = sst2.markdown(result)
    assert "| seed 0 | seed 2 |" in md and "| 0.7500 | 0.7700 | **0.7600** |" in md
    assert "| multi_head_parallel (flat table) | unipeft | 0.001 | 0.6000 | — | **0.6000** |" in md
    assert criteria == [] and all("delta" not in r for r in rows)

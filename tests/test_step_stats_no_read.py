"""Review of cli/step_stats.py: recording a step's loss and finiteness must read nothing back from the device. A
0-dim integer tensor used as an index is read by torch's C++ indexing (`tensor.item()`, a wait for the GPU on
CUDA), which the Python-level read counters of test_cli_fast_path.py cannot see; a dispatch mode sees every read
(`aten._local_scalar_dense`) wherever it is made."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unipeft.cli.step_stats import StepStats


class _Reads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_recording_steps_reads_nothing_and_keeps_the_first_bad_value():
    stats = StepStats("cpu")
    with _Reads() as mode:
        stats.add(torch.tensor(2.0))
        stats.check(1, torch.tensor([2.0, 3.0]), "loss")
        stats.check(1, torch.tensor(1.5), "gradient norm")
        stats.add(torch.tensor(float("inf")))
        stats.check(2, torch.tensor([1.0, float("-inf"), float("nan")]), "loss")
        stats.check(3, torch.tensor(float("nan")), "gradient norm")
    assert mode.reads == []
    r = stats.read()
    assert (r.bad_step, r.bad_what, r.last) == (2, "loss", math.inf)
    assert r.bad_value == -math.inf  # the first non-finite value of step 2

"""The method × architecture matrix, with the options that make each method non-identity for tests."""

from __future__ import annotations

import pytest

import unipeft

CORE = ("lora", "ia3", "houlsby", "pfeiffer", "parallel", "scaled_parallel")
ARCHS = ("llama", "gpt2", "bert", "t5")
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
MERGEABLE = ("lora", "ia3")

# Options that start a method away from the identity, so equalities cannot hold vacuously.
RANDOM = {"lora": {"init_lora_weights": False}, "ia3": {"init_ia3_weights": False}}
SMALL = {"lora": {"r": 4, "lora_alpha": 8}}


def random_options(method: str) -> dict:
    return RANDOM.get(method, {"init": "random"})


def config(method: str, arch: str, random: bool = False, **kw):
    opts = {**SMALL.get(method, {}), **(random_options(method) if random else {}), **kw}
    return unipeft.methods()[method].factory(task_type=TASKS[arch], **opts)


def cases(methods=CORE, archs=ARCHS):
    return [pytest.param(m, a, id=f"{m}-{a}") for m in methods for a in archs]

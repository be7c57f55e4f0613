"""The task names of `--task`, each to its class. A module of its own so that lm.py (generative tasks) builds
on tasks.py (the base class, classification) without tasks.py importing it back."""

from __future__ import annotations

from .lm import CausalLM, Seq2Seq
from .tasks import SeqCls, TokenCls

TASKS = {"seq-cls": SeqCls, "token-cls": TokenCls, "causal-lm": CausalLM, "seq2seq": Seq2Seq}


def task_class(name: str):
    return TASKS[name]

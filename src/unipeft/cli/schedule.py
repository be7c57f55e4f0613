"""The CLI's learning-rate schedules (warmup, then linear / cosine / constant), on torch's LambdaLR.

Written out instead of transformers.get_scheduler: importing transformers.optimization imports
transformers.trainer_utils and with it HF PEFT (~1.7 CPU s per start, and the library must never load peft). The
factors equal get_scheduler's ("constant" = its "constant_with_warmup"; cosine = half a cycle), tested against it.
A LambdaLR of plain functions saves the same state_dict keys as get_scheduler's, so old checkpoints resume."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "constant")


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def schedule_factor(name: str, warmup: int, total: int):
    """The multiplier of the base learning rate at `step` (0-based count of optimizer steps taken)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {name!r}: use one of {', '.join(SCHEDULES)}")

    def linear(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def constant(step: int) -> float:
        return _warmup(step, warmup) if step < warmup else 1.0

    return {"linear": linear, "cosine": cosine, "constant": constant}[name]


def make_schedule(name: str, opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor(name, warmup, total))


def linear_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total` (the bench cells' schedule)."""
    return make_schedule("linear", opt, warmup, total)

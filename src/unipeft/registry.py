"""The method registry: named presets over the design space, listed by `unipeft.methods()`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CONFIGS: dict[str, type] = {}  # peft_type -> config class (for loading checkpoints)
METHODS: dict[str, "MethodInfo"] = {}


@dataclass(frozen=True)
class MethodInfo:
    name: str
    factory: Callable  # **options -> PeftConfig
    summary: str
    paper: str
    train_defaults: dict | None = None  # recommended lr / batch / options for the CLI (measured, see benchmarks/)


def register_config(cls):
    if cls.peft_type in CONFIGS and CONFIGS[cls.peft_type] is not cls:
        raise ValueError(f"peft_type {cls.peft_type!r} is registered twice")
    CONFIGS[cls.peft_type] = cls
    return cls


def register_method(name: str, factory: Callable, summary: str, paper: str = "", train_defaults: dict | None = None) -> None:
    if name in METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    METHODS[name] = MethodInfo(name, factory, summary, paper, train_defaults)


def config_class(peft_type: str):
    try:
        return CONFIGS[peft_type]
    except KeyError:
        raise ValueError(f"unknown peft_type {peft_type!r}; this unipeft knows {sorted(CONFIGS)}") from None


def methods() -> dict[str, MethodInfo]:
    """Every registered method, by name. The presets register themselves when `unipeft` is imported (its
    `__init__` imports `unipeft.methods` first), so the registry never imports the methods: no import circle."""
    return dict(METHODS)


def methods_table() -> str:
    """The README's method table, generated from the registry (tests keep the README in sync)."""
    lines = ["| method | config | unified-view point | paper |", "|---|---|---|---|"]
    for name, info in methods().items():
        cfg = info.factory.__self__ if hasattr(info.factory, "__self__") else info.factory
        lines.append(f"| `{name}` | `{cfg.__name__}` | {info.summary} | {info.paper} |")
    return "\n".join(lines)

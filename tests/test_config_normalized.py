"""Frozen configs are written once, at construction: `normalized()` gives canonical forms that __post_init__ sets,
`validate()` only reads. And a linear site refuses a point of the design space it has no hook for."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import unipeft
from conftest import BUILDERS
from unipeft.inject import inject
from unipeft.spec import AtLinear, Compose, Form, Insertion, LowRank

SRC = Path(unipeft.__file__).parent

CASES = [  # config, field, the value given, its canonical form
    (unipeft.LoraConfig, "layers_to_transform", 1, (1,)),
    (unipeft.AdapterConfig, "layers_to_transform", 0, (0,)),
    (unipeft.PTuningV2Config, "prompt_layers", 2, (2,)),
    (unipeft.PromptEncoderConfig, "encoder_reparameterization_type", "lstm", "LSTM"),
    (unipeft.PromptTuningConfig, "prompt_tuning_init", unipeft.PromptTuningInit.SAMPLE_VOCAB, "SAMPLE_VOCAB"),
]


@pytest.mark.parametrize("cls, name, given, canonical", CASES, ids=[c[0].__name__ for c in CASES])
def test_values_are_normalized_at_construction_and_validate_only_reads(cls, name, given, canonical):
    cfg = cls(**{name: given})
    assert getattr(cfg, name) == canonical
    before = dataclasses.asdict(cfg)
    cfg.validate()
    assert dataclasses.asdict(cfg) == before
    assert cls.from_dict(cfg.to_dict()) == cfg  # the canonical form round-trips


def test_only_post_init_writes_a_frozen_config():
    """object.__setattr__ on a config only in PeftConfig.__post_init__ (a validate() that writes would hide in
    any method's file)."""
    writers = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
                f = call.func
                if isinstance(f, ast.Attribute) and f.attr == "__setattr__" and getattr(f.value, "id", "") == "object":
                    writers.append(f"{path.relative_to(SRC)}:{fn.name}")
    assert sorted(set(writers)) == ["config.py:__post_init__", "peft_model.py:__init__"], writers


def test_a_linear_site_refuses_an_additive_delta_on_the_input_side():
    ins = Insertion(delta=LowRank(r=2), position=AtLinear(targets=("q_proj",), input_side=("q_proj",)),
                    form=Form.SEQUENTIAL, compose=Compose.ADD, name="lora")
    model = BUILDERS["llama"]()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="side='in'.*only meaningful with compose=multiply"):
        inject(model, [ins])
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing left behind

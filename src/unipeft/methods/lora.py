"""LoRA: low-rank Δ at chosen linears · parallel · scale α/r.  Hu et al. 2021, arXiv:2106.09685.

h = W x + (α/r)·B A x, with B = 0 at init; rsLoRA (Kalajdzievski 2023) scales by α/√r instead.
Mergeable: W ← W + (α/r)·B A, so inference has zero added latency.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Union

from ..arch.resolve import default_targets, stores_transposed
from ..config import PeftConfig
from ..registry import register_config, register_method
from ..spec import AtLinear, Compose, Form, Insertion, LowRank


@register_config
@dataclass(frozen=True, kw_only=True)
class LoraConfig(PeftConfig):
    peft_type: ClassVar[str] = "LORA"
    hf_format: ClassVar[bool] = True
    unsupported: ClassVar[dict] = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
                                   "layer_replication": None, "trainable_token_indices": None,
                                   "target_parameters": None, "layers_pattern": None}

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Union[tuple[str, ...], str, None] = None
    exclude_modules: Union[tuple[str, ...], str, None] = None
    use_rslora: bool = False
    bias: str = "none"
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Union[tuple[int, ...], int, None] = None
    fan_in_fan_out: bool = False  # accepted for compatibility; Conv1D is detected without it

    def validate(self) -> None:
        LowRank(r=self.r, dropout=self.lora_dropout, init=self.init_lora_weights)  # raises on bad values
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.layers_to_transform, int):
            object.__setattr__(self, "layers_to_transform", (self.layers_to_transform,))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def resolved(self, model, arch):
        cfg = super().resolved(model, arch)
        if cfg.target_modules is None:
            cfg = dataclasses.replace(cfg, target_modules=default_targets(model, arch, ("q", "v")))
        return dataclasses.replace(cfg, fan_in_fan_out=stores_transposed(model, cfg.target_modules, arch))

    def insertions(self, model, arch):
        pos = AtLinear(targets=self.target_modules, exclude=self.exclude_modules, layers=self.layers_to_transform)
        delta = LowRank(r=self.r, dropout=self.lora_dropout, init=self.init_lora_weights)
        return (Insertion(delta=delta, position=pos, form=Form.PARALLEL, compose=Compose.ADD, scale=self.scaling,
                          name="lora"),)

    def bias_mode(self) -> str:
        return {"none": "none", "all": "all", "lora_only": "sites"}[self.bias]


register_method("lora", LoraConfig, "low-rank Δ=(α/r)·BA @ chosen linears · parallel · scaled add · mergeable",
                "arXiv:2106.09685")

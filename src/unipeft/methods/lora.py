"""LoRA: low-rank Δ at chosen linears · parallel · scale α/r.  Hu et al. 2021, arXiv:2106.09685.

h = W x + (α/r)·B A x, with B = 0 at init; rsLoRA (Kalajdzievski 2023) scales by α/√r instead.
Mergeable: W ← W + (α/r)·B A, so inference has zero added latency.

Variants, with HF PEFT's config fields and file format: DoRA (`use_dora`, deltas/dora.py), PiSSA / OLoRA /
Gaussian inits (`init_lora_weights`, deltas/lora_init.py), per-module r and α (`rank_pattern`, `alpha_pattern`),
layer selection by index within a named layer list (`layers_to_transform`, `layers_pattern`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Union

from ..arch.resolve import default_targets, resolve_linears, stores_transposed
from ..deltas.dora import WeightDecomposed
from ..deltas.token_rows import TokenRows
from ..positions.token_rows import AtTokenRows
from ..config import PeftConfig
from ..names import pattern_key
from ..registry import register_config, register_method
from ..spec import AtLinear, Compose, Form, Insertion, LowRank


HF_ONLY = {"cli": False}  # HF PEFT fields kept for file compatibility, not offered as command-line options

# HF PEFT LoraConfig fields unipeft accepts only at their default (a non-default value is a clear error)
NOT_IMPLEMENTED = {
    "lora_bias": (False, "a trained bias on lora_B"),
    "layer_replication": (None, "layer replication (stacking repeated base layers)"),
    "target_parameters": (None, "LoRA on bare nn.Parameters (MoE experts); target the modules instead"),
    "megatron_config": (None, "Megatron tensor-parallel layers"),
    "loftq_config": ({}, "LoftQ"),
    "eva_config": (None, "EVA (data-driven init)"),
    "corda_config": (None, "CorDA (data-driven init)"),
    "lora_ga_config": (None, "LoRA-GA (gradient-driven init)"),
    "velora_config": (None, "VeLoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "use_qalora": (False, "QA-LoRA"),
    "monteclora_config": (None, "MonteCLoRA"),
    "use_bdlora": (None, "block-diagonal LoRA"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
    "ensure_weight_tying": (False, "tying adapters of tied layers"),
}


@register_config
@dataclass(frozen=True, kw_only=True)
class LoraConfig(PeftConfig):
    peft_type: ClassVar[str] = "LORA"
    hf_format: ClassVar[bool] = True

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Union[tuple[str, ...], str, None] = None
    exclude_modules: Union[tuple[str, ...], str, None] = None
    use_rslora: bool = False
    bias: str = "none"
    init_lora_weights: Union[bool, str] = True  # True | False | "gaussian" | "pissa" | "pissa_niter_<n>" | "olora"
    layers_to_transform: Union[tuple[int, ...], int, None] = None
    layers_pattern: Union[tuple[str, ...], str, None] = None
    rank_pattern: Union[dict, None] = field(default_factory=dict)  # module name or regex -> r
    alpha_pattern: Union[dict, None] = field(default_factory=dict)  # module name or regex -> lora_alpha
    use_dora: bool = False
    trainable_token_indices: Union[tuple[int, ...], dict, None] = None  # token ids (or {embedding: ids}) to train
    fan_in_fan_out: bool = False  # accepted for compatibility; Conv1D is detected without it
    # HF PEFT fields accepted at their default only (NOT_IMPLEMENTED) or with no effect here
    lora_bias: bool = field(default=False, metadata=HF_ONLY)
    layer_replication: Union[tuple, None] = field(default=None, metadata=HF_ONLY)
    target_parameters: Union[tuple[str, ...], None] = field(default=None, metadata=HF_ONLY)
    megatron_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    megatron_core: Union[str, None] = field(default="megatron.core", metadata=HF_ONLY)  # read with megatron_config
    loftq_config: Union[dict, None] = field(default_factory=dict, metadata=HF_ONLY)
    eva_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    corda_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    lora_ga_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    velora_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    alora_invocation_tokens: Union[tuple[int, ...], None] = field(default=None, metadata=HF_ONLY)
    use_qalora: bool = field(default=False, metadata=HF_ONLY)
    qalora_group_size: int = field(default=16, metadata=HF_ONLY)  # only read with use_qalora
    monteclora_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    use_bdlora: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    arrow_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    kasa_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)
    ensure_weight_tying: bool = field(default=False, metadata=HF_ONLY)
    runtime_config: Union[dict, None] = field(default=None, metadata=HF_ONLY)  # runtime-only: never saved, as in HF

    def normalized(self) -> dict:
        layers = self.layers_to_transform
        return {**super().normalized(), **({"layers_to_transform": (layers,)} if isinstance(layers, int) else {})}

    def validate(self) -> None:
        for name, (default, what) in NOT_IMPLEMENTED.items():
            v = getattr(self, name)
            if v != default and v is not None and v != {} and v != () and v is not False:  # () : HF's []
                raise ValueError(f"LoraConfig {name}={v!r} ({what}) is not implemented in unipeft; leave {name} at "
                                 f"its default ({default!r})")
        if self.runtime_config and any(_as_dict(self.runtime_config).values()):
            raise ValueError(f"LoraConfig runtime_config={self.runtime_config!r} (ephemeral GPU offload) is not "
                             f"implemented in unipeft; leave runtime_config at its default")
        LowRank(r=self.r, dropout=self.lora_dropout, init=self.init_lora_weights)  # raises on bad values
        for name in ("rank_pattern", "alpha_pattern"):
            pat = getattr(self, name) or {}
            if not isinstance(pat, dict):
                raise ValueError(f"{name} must be a dict of module name (or regex) -> value, got {pat!r}")
            for k, v in pat.items():
                if name == "rank_pattern" and (not isinstance(v, int) or v <= 0):
                    raise ValueError(f"rank_pattern[{k!r}] must be a positive integer r, got {v!r}")
                if name == "alpha_pattern" and not isinstance(v, (int, float)):
                    raise ValueError(f"alpha_pattern[{k!r}] must be a number, got {v!r}")
        t = self.trainable_token_indices
        if isinstance(t, dict):
            clash = [k for k in t if k in (self.modules_to_save or ())]
            if clash:
                raise ValueError(f"{clash} is both in modules_to_save (trained in full) and in trainable_token_indices "
                                 f"(some rows trained); choose one")
        elif t is not None and (not t or not all(isinstance(i, int) for i in t)):
            raise ValueError(f"trainable_token_indices must be a list of token ids or a dict {{embedding name: ids}}, "
                             f"got {t!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string; put the layer "
                             "indices in the regex, or pass target_modules as a list of names")
        if isinstance(self.target_modules, str) and self.layers_pattern:
            raise ValueError("layers_pattern cannot be used when target_modules is a regex string; pass "
                             "target_modules as a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern names the layer list that layers_to_transform indexes; set "
                             "layers_to_transform too (or drop layers_pattern)")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("runtime_config", None)  # HF PEFT never saves it either
        return d

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.lora_alpha)

    def resolved(self, model, arch):
        cfg = super().resolved(model, arch)
        if cfg.target_modules is None:
            cfg = dataclasses.replace(cfg, target_modules=default_targets(model, arch, ("q", "v")))
        return dataclasses.replace(cfg, fan_in_fan_out=stores_transposed(model, cfg.target_modules, arch))

    def _delta(self, r: int):
        cls = WeightDecomposed if self.use_dora else LowRank
        return cls(r=r, dropout=self.lora_dropout, init=self.init_lora_weights)

    def _token_rows(self) -> tuple:
        """Trainable token rows: a list trains rows of the input embedding, a dict {embedding name: ids}."""
        t = self.trainable_token_indices
        if t is None:
            return ()
        named = t.items() if isinstance(t, dict) else [(None, t)]
        return tuple(Insertion(delta=TokenRows(indices=tuple(ids)), position=AtTokenRows(embedding=name),
                               name="token_adapter") for name, ids in named)

    def insertions(self, model, arch):
        return self._lora_insertions(model, arch) + self._token_rows()

    def _lora_insertions(self, model, arch):
        layers_pattern = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
        pos = AtLinear(targets=self.target_modules, exclude=self.exclude_modules, layers=self.layers_to_transform,
                       layers_pattern=layers_pattern or None)
        if not (self.rank_pattern or self.alpha_pattern):
            return (Insertion(delta=self._delta(self.r), position=pos, form=Form.PARALLEL, compose=Compose.ADD,
                              scale=self.scaling, name="lora"),)
        # per-module r and alpha: one insertion per (r, alpha) group, each naming its modules exactly
        groups: dict[tuple, list[str]] = {}
        for name, _ in resolve_linears(model, pos, arch):
            rk, ak = pattern_key(self.rank_pattern or {}, name), pattern_key(self.alpha_pattern or {}, name)
            r = self.rank_pattern[rk] if rk is not None else self.r
            alpha = self.alpha_pattern[ak] if ak is not None else self.lora_alpha
            groups.setdefault((r, alpha), []).append(name)
        return tuple(Insertion(delta=self._delta(r), position=AtLinear(targets=tuple(names)), form=Form.PARALLEL,
                               compose=Compose.ADD, scale=self.scaling_for(r, alpha), name="lora")
                     for (r, alpha), names in groups.items())

    def bias_mode(self) -> str:
        return {"none": "none", "all": "all", "lora_only": "sites"}[self.bias]


def _as_dict(v) -> dict:
    return v if isinstance(v, dict) else dict(vars(v))


register_method("lora", LoraConfig, "low-rank Δ=(α/r)·BA @ chosen linears · parallel · scaled add · mergeable",
                "arXiv:2106.09685")

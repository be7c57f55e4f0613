"""IA3: learned scaling vectors on keys, values and the FFN input · multiply.  Liu et al. 2022, arXiv:2205.05638.

k ← l_k ⊙ W_k x, v ← l_v ⊙ W_v x, FFN: W_out (l_ff ⊙ x). l = 1 at init (identity); mergeable into W.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Union

from ..arch.resolve import default_targets, stores_transposed
from ..config import PeftConfig
from ..registry import register_config, register_method
from ..names import matches
from ..spec import AtLinear, Compose, Form, Insertion, Scaling


@register_config
@dataclass(frozen=True, kw_only=True)
class IA3Config(PeftConfig):
    peft_type: ClassVar[str] = "IA3"
    hf_format: ClassVar[bool] = True

    target_modules: Union[tuple[str, ...], str, None] = None
    exclude_modules: Union[tuple[str, ...], str, None] = None
    feedforward_modules: Union[tuple[str, ...], str, None] = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False  # accepted for compatibility; Conv1D is detected without it

    def validate(self) -> None:
        t, f = self.target_modules, self.feedforward_modules
        if isinstance(t, tuple) and isinstance(f, tuple) and not all(matches(x, t) for x in f):
            raise ValueError(f"feedforward_modules {list(f)} must be a subset of target_modules {list(t)}")

    def resolved(self, model, arch):
        cfg = super().resolved(model, arch)
        if cfg.target_modules is None:
            cfg = dataclasses.replace(cfg, target_modules=default_targets(model, arch, ("k", "v", "ffn_out")))
        if cfg.feedforward_modules is None:
            cfg = dataclasses.replace(cfg, feedforward_modules=default_targets(model, arch, ("ffn_out",)))
        return dataclasses.replace(cfg, fan_in_fan_out=stores_transposed(model, cfg.target_modules, arch))

    def insertions(self, model, arch):
        pos = AtLinear(targets=self.target_modules, exclude=self.exclude_modules, input_side=self.feedforward_modules)
        return (Insertion(delta=Scaling(init=self.init_ia3_weights), position=pos, form=Form.PARALLEL,
                          compose=Compose.MULTIPLY, name="ia3"),)


register_method("ia3", IA3Config, "scaling vector l @ k, v, FFN input · multiply · mergeable", "arXiv:2205.05638")

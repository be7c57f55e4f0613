"""P-tuning v2: deep prompts — flat prefix K/V at every (or chosen) layer, with the model's own task head.
Liu et al. ACL 2022, arXiv:2110.07602. Equals prefix tuning without reparameterization; `prompt_layers`
selects the layers (the paper's depth ablation). SEQ_CLS trains a linear head on the first token,
TOKEN_CLS a per-token head (sequence tagging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from ..config import PromptLearningConfig
from ..registry import register_config, register_method
from .prefix_tuning import PrefixTuningConfig


@register_config
@dataclass(frozen=True, kw_only=True)
class PTuningV2Config(PromptLearningConfig):
    peft_type: ClassVar[str] = "P_TUNING_V2"
    hf_format: ClassVar[bool] = False

    prompt_layers: Union[tuple[int, ...], None] = None  # None: all layers
    reparameterization: bool = False
    encoder_hidden_size: Union[int, None] = None

    def normalized(self) -> dict:
        layers = self.prompt_layers
        return {**super().normalized(), **({"prompt_layers": (layers,)} if isinstance(layers, int) else {})}

    def insertions(self, model, arch):
        prefix = PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, token_dim=self.token_dim,
                                    prefix_projection=self.reparameterization,
                                    encoder_hidden_size=self.encoder_hidden_size, position_shift=False)
        return prefix.prefix_insertions(model, self.prompt_layers)


register_method("p_tuning_v2", PTuningV2Config, "flat prefix K/V @ chosen layers · gate, task head",
                "arXiv:2110.07602",
                train_defaults={"lr": 3e-2, "method_options": {"num_virtual_tokens": 20}})

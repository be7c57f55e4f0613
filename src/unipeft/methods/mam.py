"""MAM adapter: prefix tuning at attention + scaled parallel adapter at the FFN.  He et al. 2022,
arXiv:2110.04366 (paper defaults: prefix length 30, bottleneck 512, s = 4). Two insertions at disjoint
positions, so MAM is exactly its two parts applied together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from ..config import PromptLearningConfig
from ..registry import register_config, register_method
from .adapter import AdapterConfig
from .prefix_tuning import PrefixTuningConfig


@register_config
@dataclass(frozen=True, kw_only=True)
class MAMConfig(PromptLearningConfig):
    peft_type: ClassVar[str] = "MAM"
    hf_format: ClassVar[bool] = False
    key_prefix: ClassVar[str] = "base_model.model."

    num_virtual_tokens: int = 30
    prefix_projection: bool = True
    encoder_hidden_size: Union[int, None] = 512
    bottleneck_size: int = 512
    scaling: Union[float, str] = 4.0
    non_linearity: str = "relu"
    adapter_init: str = "identity"

    def parts(self) -> tuple[PrefixTuningConfig, AdapterConfig]:
        prefix = PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, token_dim=self.token_dim,
                                    prefix_projection=self.prefix_projection,
                                    encoder_hidden_size=self.encoder_hidden_size, position_shift=False)
        adapter = AdapterConfig.scaled_parallel(bottleneck_size=self.bottleneck_size, scaling=self.scaling,
                                                non_linearity=self.non_linearity, init=self.adapter_init)
        return prefix, adapter

    def insertions(self, model, arch):
        prefix, adapter = self.parts()
        adapter = adapter.resolved(model, arch)
        return prefix.insertions(model, arch) + adapter.insertions(model, arch)


register_method("mam", MAMConfig, "prefix @ attention + scaled parallel adapter @ FFN", "arXiv:2110.04366",
                train_defaults={"lr": 5e-4, "method_options": {"num_virtual_tokens": 20, "bottleneck_size": 64}})

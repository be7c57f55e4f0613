"""Named points in the design space: one small self-registering file per method."""

from .adapter import AdapterConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .mam import MAMConfig
from .mh_parallel import MultiHeadParallelConfig
from .p_tuning import PromptEncoderConfig
from .p_tuning_v2 import PTuningV2Config
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig

__all__ = ["LoraConfig", "IA3Config", "AdapterConfig", "PromptTuningConfig", "PromptEncoderConfig",
           "PrefixTuningConfig", "PTuningV2Config", "MAMConfig", "MultiHeadParallelConfig"]

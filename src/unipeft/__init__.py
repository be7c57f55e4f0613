"""unipeft: parameter-efficient fine-tuning as points of one design space (He et al., ICLR 2022)."""

from . import methods as _methods  # noqa: F401  (registers the presets)
from .auto import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,
                   AutoPeftModelForQuestionAnswering, AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
                   AutoPeftModelForTokenClassification)
from .config import PeftConfig, TaskType
from .config_dict import get_peft_config
from .handle import Handle
from .memory.host_embedding import HostEmbedding, embeddings_on_host
from .inject import inject
from .inject_adapter import inject_adapter_in_model
from .kbit import prepare_model_for_kbit_training
from .methods import (AdapterConfig, IA3Config, LoraConfig, MAMConfig, MultiHeadParallelConfig, PrefixTuningConfig,
                      PromptEncoderConfig, PromptTuningConfig, PTuningV2Config)
from .methods.p_tuning_template import apply_template
from .peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForQuestionAnswering,
                         PeftModelForSeq2SeqLM, PeftModelForSequenceClassification, PeftModelForTokenClassification,
                         get_peft_model)
from .peft_types import PeftType, PromptEncoderReparameterizationType, PromptTuningInit
from .registry import methods
from .state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from .spec import (AtAttentionKV, AtInput, AtLinear, AtSublayer, Bottleneck, Compose, Form, Insertion, LowRank,
                   Prefix, Prompt, Scaling, Sublayer)

__version__ = "0.1.0"

__all__ = [
    "get_peft_model", "PeftModel", "PeftModelForCausalLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "PeftModelForSeq2SeqLM", "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction", "PeftConfig", "TaskType", "LoraConfig", "IA3Config", "AdapterConfig",
    "PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "PTuningV2Config", "MAMConfig", "MultiHeadParallelConfig",
    "apply_template",
    "Prefix", "Prompt",
    "methods", "inject", "Handle", "Insertion", "Form", "Compose", "AtLinear", "AtSublayer", "AtAttentionKV",
    "AtInput", "Sublayer", "LowRank", "Scaling", "Bottleneck", "embeddings_on_host", "HostEmbedding",
    # HF PEFT's public names
    "get_peft_config", "PeftType", "PromptTuningInit", "PromptEncoderReparameterizationType",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model",
    "prepare_model_for_kbit_training", "AutoPeftModel", "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction",
]

"""unipeft: parameter-efficient fine-tuning as points of one design space (He et al., ICLR 2022)."""

from . import methods as _methods  # noqa: F401  (registers the presets)
from .config import PeftConfig, TaskType
from .handle import Handle
from .host_embedding import HostEmbedding, embeddings_on_host
from .inject import inject
from .methods import (AdapterConfig, IA3Config, LoraConfig, MAMConfig, PrefixTuningConfig, PromptEncoderConfig,
                      PromptTuningConfig, PTuningV2Config)
from .prompts import apply_template
from .peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForQuestionAnswering,
                         PeftModelForSeq2SeqLM, PeftModelForSequenceClassification, PeftModelForTokenClassification,
                         get_peft_model)
from .registry import methods
from .spec import (AtAttentionKV, AtInput, AtLinear, AtSublayer, Bottleneck, Compose, Form, Insertion, LowRank,
                   Prefix, Prompt, Scaling, Sublayer)

__version__ = "0.1.0"

__all__ = [
    "get_peft_model", "PeftModel", "PeftModelForCausalLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "PeftModelForSeq2SeqLM", "PeftModelForQuestionAnswering",
    "PeftModelForFeatureExtraction", "PeftConfig", "TaskType", "LoraConfig", "IA3Config", "AdapterConfig",
    "PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "PTuningV2Config", "MAMConfig", "apply_template",
    "Prefix", "Prompt",
    "methods", "inject", "Handle", "Insertion", "Form", "Compose", "AtLinear", "AtSublayer", "AtAttentionKV",
    "AtInput", "Sublayer", "LowRank", "Scaling", "Bottleneck", "embeddings_on_host", "HostEmbedding",
]

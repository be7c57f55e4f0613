"""HF PEFT's public enums: PeftType (the methods unipeft implements, plus its own) and the init choices."""

from __future__ import annotations

from enum import Enum


class PeftType(str, Enum):
    """A config's `peft_type`. Equal to the plain string (`LoraConfig.peft_type == PeftType.LORA`); HF PEFT's
    member names for the methods both libraries have, then unipeft's own (HF PEFT cannot load those)."""

    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    IA3 = "IA3"
    # unipeft's own
    BOTTLENECK_ADAPTER = "BOTTLENECK_ADAPTER"
    P_TUNING_V2 = "P_TUNING_V2"
    MAM = "MAM"
    MH_PARALLEL_ADAPTER = "MH_PARALLEL_ADAPTER"

    def __str__(self) -> str:
        return self.value


class PromptTuningInit(str, Enum):
    """How PromptTuningConfig starts the prompt table (prompt_tuning_init)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


class PromptEncoderReparameterizationType(str, Enum):
    """PromptEncoderConfig's encoder_reparameterization_type."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value

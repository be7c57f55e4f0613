"""P-tuning v1: virtual tokens made by a prompt encoder, anywhere in a template.  Liu et al. 2021,
arXiv:2103.10385.

    template "[P][P][P] {text} [P][P] It was [MASK]."  →  ids with slots (< 0) where the [P]s are;
    the encoder (bi-LSTM + MLP, or MLP) turns P embeddings into the virtual tokens that fill the slots.

Without a template the virtual tokens are prepended (HF PEFT's P_TUNING), and logits include their positions
as HF PEFT's do (`keep_virtual_logits=False` cuts them). `unipeft.methods.p_tuning_template.apply_template`
tokenizes text through a template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from ..config import PromptLearningConfig
from ..registry import register_config, register_method
from ..spec import AtInput, Compose, Form, Insertion, Prompt


@register_config
@dataclass(frozen=True, kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"  # "MLP" | "LSTM"
    encoder_hidden_size: Union[int, None] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    template: Union[str, None] = None  # e.g. "[P][P][P] {text} [P][P] It was [MASK]."
    keep_virtual_logits: bool = True  # False: logits line up with input_ids (prepended virtual positions cut)

    def normalized(self) -> dict:  # PromptEncoderReparameterizationType.LSTM, "lstm" -> "LSTM"
        kind = str(self.encoder_reparameterization_type).upper().split(".")[-1]
        return {**super().normalized(), "encoder_reparameterization_type": kind}

    def validate(self) -> None:
        super().validate()
        kind = self.encoder_reparameterization_type
        Prompt(length=self.num_virtual_tokens, encoder=kind)
        if self.template is not None:
            if "{text}" not in self.template:
                raise ValueError(f"template {self.template!r} has no {{text}} placeholder: write where the input "
                                 f"goes, e.g. \"[P][P] {{text}} [P] It was [MASK].\"")
            n = self.template.count("[P]")
            if n != self.num_virtual_tokens:
                raise ValueError(f"template has {n} [P] slots but num_virtual_tokens is {self.num_virtual_tokens}")

    def insertions(self, model, arch):
        delta = Prompt(length=self.num_virtual_tokens, encoder=self.encoder_reparameterization_type,
                       encoder_hidden_size=self.encoder_hidden_size, encoder_num_layers=self.encoder_num_layers,
                       encoder_dropout=self.encoder_dropout)
        return (Insertion(delta=delta, position=AtInput(keep_virtual_logits=self.keep_virtual_logits),
                          form=Form.SEQUENTIAL, compose=Compose.ADD, name="prompt"),)


register_method("p_tuning", PromptEncoderConfig, "prompt encoder (LSTM/MLP) @ input, template slots · concat",
                "arXiv:2103.10385",
                train_defaults={"lr": 1e-2, "method_options": {"num_virtual_tokens": 20}})

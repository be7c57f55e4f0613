"""Prompt tuning: P learned embeddings at the input.  Lester et al. 2021, arXiv:2104.08691.

x ← [E_1 … E_P ; x]. Init: RANDOM, SAMPLE_VOCAB (rows of the vocabulary) or TEXT (the embeddings of a
text's tokens, with the tokenizer's special tokens, cut or repeated to fill P as HF PEFT does) — the paper's
class-label / vocabulary init. Logits include the P virtual positions (HF PEFT's; real tokens' are
logits[:, P:]); `keep_virtual_logits=False` cuts them so they line up with input_ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from ..config import PromptLearningConfig, init_text_ids
from ..registry import register_config, register_method
from ..spec import AtInput, Compose, Form, Insertion, Prompt


@register_config
@dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Union[str, None] = None
    tokenizer_name_or_path: Union[str, None] = None
    tokenizer_kwargs: Union[dict, None] = None
    keep_virtual_logits: bool = True  # False: logits line up with input_ids (virtual positions cut)

    def normalized(self) -> dict:  # PromptTuningInit.TEXT, "text" -> "TEXT"
        return {**super().normalized(), "prompt_tuning_init": str(self.prompt_tuning_init).upper().split(".")[-1]}

    def validate(self) -> None:
        super().validate()
        init = self.prompt_tuning_init
        Prompt(length=self.num_virtual_tokens, init=init)
        if init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'")

    def insertions(self, model, arch):
        init, ids = self.prompt_tuning_init, ()
        if init == "TEXT" and self.inference_mode:
            init = "RANDOM"  # loading a checkpoint: the saved table replaces any init
        elif init == "TEXT":
            ids = init_text_ids(self.prompt_tuning_init_text, self.tokenizer_name_or_path, self.num_virtual_tokens,
                                self.tokenizer_kwargs)
        delta = Prompt(length=self.num_virtual_tokens, init=init, init_ids=ids)
        return (Insertion(delta=delta, position=AtInput(keep_virtual_logits=self.keep_virtual_logits),
                          form=Form.SEQUENTIAL, compose=Compose.ADD, name="prompt"),)


register_method("prompt_tuning", PromptTuningConfig, "prompt embeddings @ input · concat", "arXiv:2104.08691",
                train_defaults={"lr": 3e-2, "method_options": {"num_virtual_tokens": 20}})

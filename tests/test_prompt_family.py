"""The prompt family (prompt tuning, prefix tuning, P-tuning v1/v2, multi-head PA, MAM) on every family:
training, save/load, resume, padding, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BUILDERS, assert_padding_invariant, batch_for, logits_of
from matrix import PROMPT, PROMPT_ARCHS, cases, config
from torch import nn

from unipeft import PeftModel, get_peft_model

CASES = cases(PROMPT, PROMPT_ARCHS)


def build(method, arch, random=False, **kw):
    return get_peft_model(BUILDERS[arch](), config(method, arch, random=random, **kw))


def train(peft, b, steps=15, lr=3e-2):
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr)
    peft.train()
    for _ in range(steps):
        peft(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    peft.eval()


def eval_loss(peft, b) -> float:
    with torch.no_grad():
        return peft(**b).loss.item()


@pytest.mark.parametrize("method,arch", CASES)
def test_training_lowers_loss_then_save_load_and_resume(method, arch, tmp_path):
    peft = build(method, arch, random=True)
    b = batch_for(arch)
    before = eval_loss(peft, b)
    train(peft, b)
    mid = eval_loss(peft, b)
    assert mid < before - 1e-3, (before, mid)
    with torch.no_grad():
        out = logits_of(peft, b)
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, b), out, rtol=0, atol=0)
    # resume: the reparameterization (MLP / LSTM) comes back trainable, and training goes on
    resumed = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == peft.get_nb_trainable_parameters()[0]
    assert eval_loss(resumed, b) == pytest.approx(mid, abs=1e-6)
    train(resumed, b)
    assert eval_loss(resumed, b) < mid - min(1e-4, mid / 2)  # mid may already be near 0 (BERT prefix)


# Left padding changes the base model's own answer where BERT's classifier pools position 0, a pad, unless a prompt
# sits there (the prompt family derives positions from the mask, so absolute position embeddings do not move).
BASE_LEFT_PAD_VARIANT = {(m, "bert") for m in ("multi_head_parallel", "prefix", "prefix_proj", "p_tuning_v2", "mam")}


PAD_CASES = [pytest.param(*c.values, side, id=f"{c.id}-{side}") for side in ("right", "left") for c in CASES
             if side == "right" or tuple(c.values) not in BASE_LEFT_PAD_VARIANT]


@pytest.mark.parametrize("method,arch,side", PAD_CASES)
def test_padded_and_unpadded_rows_agree(method, arch, side):
    assert_padding_invariant(build(method, arch, random=True), arch, side)


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for m in model.modules():  # T5 / GPT-2 keep dropout rates in configs too
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0


@pytest.mark.parametrize("method,arch", CASES + cases(("lora", "ia3", "houlsby", "scaled_parallel"), ("llama", "bert", "t5")))
def test_gradient_checkpointing_gives_the_same_gradients(method, arch):
    b = batch_for(arch)
    grads = []
    for ckpt in (False, True):
        peft = build(method, arch, random=True)
        _no_dropout(peft)
        if ckpt:
            peft.gradient_checkpointing_enable()
            assert peft.get_base_model().is_gradient_checkpointing
        peft.train()
        peft(**b).loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, f"no gradient reaches {n}"
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("method,arch", cases(PROMPT, ("llama", "t5")))
def test_remove_restores_the_model(method, arch):
    base = BUILDERS[arch]()
    ref = copy.deepcopy(base)
    peft = get_peft_model(base, config(method, arch, random=True))
    impl = ref.config._attn_implementation
    model = peft.unload()
    assert model.config._attn_implementation == impl
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]
    b = batch_for(arch)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, b), logits_of(ref, b), rtol=0, atol=0)

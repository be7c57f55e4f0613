"""Parity with HF PEFT (the dev-only oracle) for prompt tuning, P-tuning and prefix tuning:
the same weights give the same logits, and each library loads the other's checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import BUILDERS

import unipeft

hf = pytest.importorskip("peft")
P = 4


def _batch(arch):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (2, 6), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch == "t5":
        b["decoder_input_ids"] = torch.randint(3, 96, (2, 4), generator=g)
    return b


def _configs(kind, arch, **kw):
    task = "SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"
    if kind == "prompt":
        return unipeft.PromptTuningConfig(task_type=task, num_virtual_tokens=P, **kw), hf.PromptTuningConfig(
            task_type=task, num_virtual_tokens=P)
    if kind in ("p_mlp", "p_lstm"):
        t = "MLP" if kind == "p_mlp" else "LSTM"
        return (unipeft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_reparameterization_type=t,
                                            encoder_hidden_size=16, **kw),
                hf.PromptEncoderConfig(task_type=task, num_virtual_tokens=P, encoder_reparameterization_type=t,
                                       encoder_hidden_size=16))
    proj = kind == "prefix_proj"
    return (unipeft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=proj,
                                       encoder_hidden_size=16, **kw),
            hf.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=proj, encoder_hidden_size=16))


def _hf_logits(model, b, kind):
    """HF's logits as they are: with prompt tuning / P-tuning on decoders they include the P virtual positions,
    and so do ours (the HF-compatible default)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**b).logits


def _ours_logits(model, b):
    with torch.no_grad():
        return model(**b).logits


KINDS_DEC = ["prompt", "p_mlp", "p_lstm", "prefix", "prefix_proj"]
CASES = [pytest.param(k, "llama", id=f"{k}-llama") for k in KINDS_DEC] + [
    pytest.param(k, "t5", id=f"{k}-t5") for k in KINDS_DEC]


@pytest.mark.parametrize("kind,arch", CASES)
def test_we_load_hf_checkpoints(kind, arch, tmp_path):
    _, hcfg = _configs(kind, arch)
    theirs = hf.get_peft_model(BUILDERS[arch](), hcfg)
    b = _batch(arch)
    y = _hf_logits(theirs, b, kind)
    with torch.no_grad():
        base = BUILDERS[arch]()(**b).logits
    assert (y[:, -base.shape[1]:] - base).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path)
    ours = unipeft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path)
    torch.testing.assert_close(_ours_logits(ours, b), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,arch", CASES)
def test_hf_loads_our_checkpoints(kind, arch, tmp_path):
    ocfg, _ = _configs(kind, arch)
    ours = unipeft.get_peft_model(BUILDERS[arch](), ocfg)
    b = _batch(arch)
    y = _ours_logits(ours, b)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path)
    torch.testing.assert_close(_hf_logits(theirs, b, kind), y, rtol=0, atol=1e-5)
    # and our file still resumes training with the reparameterization (HF keeps only the derived table)
    resumed = unipeft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path, is_trainable=True)
    assert resumed.get_nb_trainable_parameters()[0] == ours.get_nb_trainable_parameters()[0]



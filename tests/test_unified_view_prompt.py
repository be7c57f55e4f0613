"""Unified-view identities of the prompt family (He et al., ICLR 2022)."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of

import unipeft
from unipeft import functional as Fn


def test_prefix_attention_is_a_gated_mix():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    pk, pv = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    concat, _ = Fn.attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2))
    torch.testing.assert_close(Fn.prefix_attention_gated(q, k, v, pk, pv), concat, rtol=0, atol=1e-6)


def test_the_seam_computes_the_gated_mix_inside_a_real_model():
    """Capture q, k, v at one attention of a prefixed model and check its output against eq. 7."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    # our positions (real tokens at 0..T-1): q is rebuilt below with those
    peft = unipeft.get_peft_model(model, unipeft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM",
                                                                    position_shift=False))
    attn = model.model.layers[0].self_attn
    seen = {}
    attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("out", a[0]))
    site = attn._unipeft_kv[0]  # one prefix site per adapter

    ids = torch.randint(3, 96, (1, 5))
    with torch.no_grad():
        site.capture = seen  # first pass: record the real tokens' (rotated) keys and values
        peft(input_ids=ids)
        site.capture = None
        k, v = seen[site]
        q_hook = attn.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o))
        peft(input_ids=ids)
        q_hook.remove()
    # rebuild q as Llama does (rotary); the last query sees every real key, so no causal mask is needed
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = seen["q"].view(1, 5, 4, 8).transpose(1, 2)
    cos, sin = model.model.rotary_emb(q, torch.arange(5)[None])
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    pk, pv = site.delta.kv(0, 1, q.dtype)
    last = Fn.prefix_attention_gated(q[:, :, -1:], k, v, pk, pv)
    out = seen["out"].view(1, 5, 4, 8)[:, -1:].transpose(1, 2)
    torch.testing.assert_close(out, last, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_p_tuning_v2_is_prefix_tuning_without_reparameterization(arch):
    task = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}[arch]
    a = unipeft.get_peft_model(BUILDERS[arch](), unipeft.PTuningV2Config(num_virtual_tokens=4, task_type=task))
    b = unipeft.get_peft_model(BUILDERS[arch](), unipeft.PrefixTuningConfig(num_virtual_tokens=4, task_type=task,
                                                                             position_shift=False))
    with torch.no_grad():
        for (na, pa), (nb, pb) in zip(a.handle.adapter_parameters().items(), b.handle.adapter_parameters().items()):
            assert na == nb and pa.shape == pb.shape
            pb.copy_(torch.randn_like(pb))
            pa.copy_(pb)
        batch = batch_for(arch)
        torch.testing.assert_close(logits_of(a, batch), logits_of(b, batch), rtol=0, atol=0)


def test_p_tuning_v2_prompt_layers_select_layers():
    peft = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.PTuningV2Config(num_virtual_tokens=4, prompt_layers=[1]))
    assert [s.host_name for s in peft.handle.sites] == ["model.layers.1.self_attn"]


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_prompt_tuning_equals_inputs_embeds_concatenation(arch):
    task = {"llama": "CAUSAL_LM", "bert": "TOKEN_CLS", "t5": "SEQ_2_SEQ_LM"}[arch]
    base = BUILDERS["bert_tok" if arch == "bert" else arch]()
    peft = unipeft.get_peft_model(base, unipeft.PromptTuningConfig(num_virtual_tokens=4, task_type=task))
    b = batch_for(arch)
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        prompts = peft.handle.sites[0].delta()
        x = torch.cat([prompts.expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], 1)
        m = torch.cat([torch.ones(ids.shape[0], 4, dtype=mask.dtype), mask], 1)
        extra = {"decoder_input_ids": b["labels"]} if arch == "t5" else {}
        with peft.disable_adapter():
            ref = base(inputs_embeds=x, attention_mask=m, **extra).logits
        out = peft(input_ids=ids, attention_mask=mask, **extra).logits
    # logits include the virtual positions, as HF PEFT's do
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_mam_equals_its_two_parts_applied_together(arch):
    task = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}[arch]
    cfg = unipeft.MAMConfig(num_virtual_tokens=4, encoder_hidden_size=16, bottleneck_size=8, adapter_init="random",
                            task_type=task)
    mam = unipeft.get_peft_model(BUILDERS[arch](), cfg)
    prefix_cfg, adapter_cfg = cfg.parts()
    model = BUILDERS[arch]()
    arch_spec = unipeft.arch.find_arch(model)
    ins = prefix_cfg.resolved(model, arch_spec).insertions(model, arch_spec)
    h1 = unipeft.inject(model, ins)
    h2 = unipeft.inject(model, adapter_cfg.resolved(model, arch_spec).insertions(model, arch_spec))
    mine = {**h1.adapter_parameters(), **h2.adapter_parameters()}
    theirs = {k: v for k, v in mam.handle.adapter_parameters().items() if k in mine}
    assert mine.keys() == theirs.keys()
    with torch.no_grad():
        for k in mine:
            mine[k].copy_(theirs[k])
        b = batch_for(arch)
        torch.testing.assert_close(logits_of(model, b), logits_of(mam, b), rtol=0, atol=0)

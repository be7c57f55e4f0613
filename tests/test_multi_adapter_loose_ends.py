"""Multi-adapter loose ends (issue 13): the chunked-loss hook survives deleting the adapter that installed it,
add_weighted_adapter keeps its sources' trainable dtype, the state-dict functions serve any adapter by name (HF
PEFT's signatures), and an init that rewrites the shared base weights (PiSSA/OLoRA) is refused beside other adapters."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of

import unipeft
from unipeft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

hf = pytest.importorskip("peft")


def lora(**kw):
    return LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)


def test_chunked_loss_survives_deleting_the_first_adapter():
    peft = unipeft.get_peft_model(BUILDERS["llama"](), lora())
    peft.add_adapter("b", lora())
    peft.set_adapter("b")
    peft.delete_adapter("default")
    b = batch_for("llama")
    peft.train()
    out = peft(input_ids=b["input_ids"], labels=b["labels"])
    assert out.__dict__.get("_unipeft_no_logits"), "full logits were computed: the chunked-loss hook is gone"
    with torch.no_grad():
        full = peft(input_ids=b["input_ids"], labels=b["labels"], skip_logits=False)
    assert full.logits is not None
    torch.testing.assert_close(out.loss, full.loss, rtol=0, atol=1e-5)
    # and only one hook: deleting again (the adapter holding the new hook) keeps exactly one
    peft.add_adapter("c", lora())
    peft.set_adapter("c")
    peft.delete_adapter("b")
    assert peft(input_ids=b["input_ids"], labels=b["labels"]).__dict__.get("_unipeft_no_logits")
    hooks = [e for h in peft._handles.values() for e in h.extras if type(e).__name__ == "ChunkedLoss"]
    assert len(hooks) == 1


@pytest.mark.parametrize("autocast,want", [(True, torch.float32), (False, torch.bfloat16)])
def test_weighted_adapter_inherits_autocast_adapter_dtype(autocast, want):
    peft = unipeft.get_peft_model(BUILDERS["llama"]().to(torch.bfloat16), lora(), autocast_adapter_dtype=autocast)
    peft.add_adapter("b", lora(), autocast_adapter_dtype=autocast)
    assert {p.dtype for p in peft._handles["b"].adapter_parameters().values()} == {want}
    peft.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="cat")
    assert {p.dtype for p in peft._handles["mix"].adapter_parameters().values()} == {want}
    peft.add_adapter("other", lora(), autocast_adapter_dtype=not autocast)
    with pytest.raises(ValueError, match="different autocast_adapter_dtype"):
        peft.add_weighted_adapter(["default", "other"], [0.5, 0.5], "bad", combination_type="cat")
    assert "bad" not in peft.peft_config


def test_state_dict_functions_take_adapter_name_as_hf_peft():
    for ours, theirs in ((unipeft.get_peft_model_state_dict, hf.get_peft_model_state_dict),
                         (unipeft.set_peft_model_state_dict, hf.set_peft_model_state_dict)):
        mine, hfs = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
        assert list(mine)[:3] == list(hfs)[:3] and mine["adapter_name"].default == hfs["adapter_name"].default
    b = batch_for("llama")
    src = unipeft.get_peft_model(BUILDERS["llama"](), lora())
    with torch.no_grad():
        for p in src.handle.adapter_parameters().values():  # off any shared init
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        want = logits_of(src, b)
    sd = get_peft_model_state_dict(src)
    peft = unipeft.get_peft_model(BUILDERS["llama"](), lora())
    peft.add_adapter("b", lora())
    with torch.no_grad():
        first = logits_of(peft, b)
        assert not torch.allclose(first, want, atol=1e-3)
        set_peft_model_state_dict(peft, sd, adapter_name="b")  # "b" is not active
        torch.testing.assert_close(logits_of(peft, b), first, rtol=0, atol=1e-6)  # the active one is untouched
        got = get_peft_model_state_dict(peft, adapter_name="b")
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
        full = {k: v.clone() for k, v in peft.state_dict().items()}
        got = get_peft_model_state_dict(peft, state_dict=full, adapter_name="b")
        assert all(torch.equal(got[k], sd[k]) for k in sd)
        assert not all(torch.equal(get_peft_model_state_dict(peft)[k], sd[k]) for k in sd)  # default differs
        peft.set_adapter("b")
        torch.testing.assert_close(logits_of(peft, b), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_init_beside_other_adapters_is_refused(init):
    b = batch_for("llama")
    peft = unipeft.get_peft_model(BUILDERS["llama"](), lora())
    with torch.no_grad():
        before = logits_of(peft, b)
        w = {n: p.clone() for n, p in peft.get_base_model().named_parameters()}
    with pytest.raises(ValueError, match="leaves the residual"):
        peft.add_adapter("p", LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], init_lora_weights=init))
    assert set(peft.peft_config) == {"default"}
    with torch.no_grad():  # refused before anything changed: base weights and outputs exactly as before
        assert all(torch.equal(p, w[n]) for n, p in peft.get_base_model().named_parameters())
        torch.testing.assert_close(logits_of(peft, b), before, rtol=0, atol=1e-6)
    # the other way round: a residual base under a new adapter
    first = unipeft.get_peft_model(BUILDERS["llama"](), LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                  target_modules=["q_proj"], init_lora_weights=init))
    with pytest.raises(ValueError, match="left a residual"):
        first.add_adapter("b", lora())
    assert set(first.peft_config) == {"default"}

"""Shared invariants of every method on every family (tiny random models, CPU, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BUILDERS, assert_padding_invariant, batch_for, logits_of
from matrix import FAMILIES, FAMILY_CASES, FAMILY_OPTIONS, MERGEABLE, cases, config

from unipeft import PeftModel, get_peft_model
from unipeft.arch import ARCHS, find_arch


def build(method, arch, random=False, **kw):
    base = BUILDERS[arch]()
    ref = copy.deepcopy(base)
    return base, ref, get_peft_model(base, config(method, arch, random=random, **kw))


def loss_of(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize("method,arch", cases())
def test_identity_at_init(method, arch):
    base, ref, peft = build(method, arch)
    b = batch_for(arch)
    with torch.no_grad():
        out = logits_of(peft, b)
        with peft.disable_adapter():
            off = logits_of(peft, b)
        torch.testing.assert_close(out, off, rtol=0, atol=0)
        torch.testing.assert_close(out, logits_of(ref, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,arch", cases())
def test_only_adapter_trainable_and_every_param_gets_gradient(method, arch):
    base, ref, peft = build(method, arch, random=True)
    owned = peft.handle.adapter_parameters()
    trainable = {n for n, p in peft.get_base_model().named_parameters() if p.requires_grad}
    assert trainable == set(owned) and trainable
    base_names = {n for n, _ in ref.named_parameters()}
    for n in trainable:  # adapter params are new, or the task head (a trained copy of the original)
        assert n not in base_names or n.split(".")[0] in ("classifier", "score")
    loss_of(peft, batch_for(arch)).backward()
    for n, p in owned.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"


@pytest.mark.parametrize("method,arch", cases())
def test_training_lowers_loss_and_leaves_base_unchanged(method, arch):
    base, ref, peft = build(method, arch)
    b = batch_for(arch)
    frozen = {n: p.detach().clone() for n, p in peft.get_base_model().named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=3e-2)
    with torch.no_grad():
        before = loss_of(peft, b).item()
    peft.train()  # dropout on while training; losses compared in eval mode
    for _ in range(15):
        loss_of(peft, b).backward()
        opt.step()
        opt.zero_grad()
    peft.eval()
    with torch.no_grad():
        after = loss_of(peft, b).item()
    assert after < before - 1e-3, (before, after)
    for n, p in peft.get_base_model().named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"


@pytest.mark.parametrize("method,arch", cases())
def test_save_load_reproduces_outputs(method, arch, tmp_path):
    base, ref, peft = build(method, arch, random=True)
    b = batch_for(arch)
    with torch.no_grad():
        out = logits_of(peft, b)
        assert not torch.allclose(out, logits_of(ref, b), atol=1e-4), "adapter has no effect: test would be vacuous"
    peft.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    loaded = PeftModel.from_pretrained(ref, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, b), out, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == peft.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method,arch", cases(MERGEABLE))
def test_merge_equals_unmerged_and_unmerge_restores(method, arch):
    base, ref, peft = build(method, arch, random=True)
    b = batch_for(arch)
    weights = {n: p.detach().clone() for n, p in ref.named_parameters()}
    with torch.no_grad():
        out = logits_of(peft, b)
        assert not torch.allclose(out, logits_of(ref, b), atol=1e-4)
        peft.merge_adapter()
        peft.merge_adapter()  # idempotent
        torch.testing.assert_close(logits_of(peft, b), out, rtol=0, atol=1e-5)
        peft.unmerge_adapter()
        torch.testing.assert_close(logits_of(peft, b), out, rtol=0, atol=1e-5)
        for n, p in peft.get_base_model().named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
        merged = peft.merge_and_unload()
        torch.testing.assert_close(logits_of(merged, b), out, rtol=0, atol=1e-5)
        assert set(dict(merged.named_parameters())) == set(weights)  # plain model again


@pytest.mark.parametrize("method,arch", cases(("houlsby", "scaled_parallel"), ("llama", "bert")))
def test_non_linear_adapters_refuse_to_merge(method, arch):
    base, ref, peft = build(method, arch, random=True)
    with pytest.raises(ValueError, match="cannot be merged"):
        peft.merge_adapter()
    assert not peft.handle.merged


@pytest.mark.parametrize("method,arch", cases())
def test_remove_restores_the_original_model_bit_exactly(method, arch):
    base, ref, peft = build(method, arch, random=True)
    modules_before = [(n, type(m)) for n, m in ref.named_modules()]
    b = batch_for(arch)
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.1)
    loss_of(peft, b).backward()
    opt.step()
    model = peft.unload()
    assert model is base
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, b), logits_of(ref, b), rtol=0, atol=0)


@pytest.mark.parametrize("method,arch", cases())
def test_padded_and_unpadded_rows_agree(method, arch):
    base, ref, peft = build(method, arch, random=True)
    assert_padding_invariant(peft, arch)


@pytest.mark.parametrize("method,arch", [pytest.param(m, a, id=f"{m}-{a}") for m, a in FAMILY_CASES])
def test_family_row(method, arch, tmp_path):
    """One row per family: the invariants above in one pass (the adapter changes the output, gradients reach
    every adapter parameter and nothing else, padding, save/load, merge, bit-exact unload)."""
    b, opts = batch_for(arch), FAMILY_OPTIONS.get((method, arch), {})
    ref = BUILDERS[arch]()
    assert ref.config.model_type == arch and find_arch(ref) is ARCHS[arch]
    with torch.no_grad():
        base_out = logits_of(ref, b)
    base = copy.deepcopy(ref)
    peft = get_peft_model(base, config(method, arch, random=True, **opts))
    with torch.no_grad():
        out = logits_of(peft, b)
    assert not torch.allclose(out, base_out, atol=1e-4), "adapter has no effect: the row would be vacuous"

    owned = peft.handle.adapter_parameters()
    trainable = {n for n, p in peft.get_base_model().named_parameters() if p.requires_grad}
    assert trainable == set(owned) and trainable
    loss_of(peft, b).backward()
    for n, p in owned.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    peft.zero_grad()

    assert_padding_invariant(peft, arch)

    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, b), out, rtol=0, atol=0)

    if method in MERGEABLE:
        with torch.no_grad():
            peft.merge_adapter()  # fp32 rounding of W + ΔW: 1e-5 relative to the logits' scale
            torch.testing.assert_close(logits_of(peft, b), out, rtol=0, atol=1e-5 * max(1.0, out.abs().max().item()))
            peft.unmerge_adapter()
        # the base's own parameters (a task head's original sits at <head>.original_module, HF's layout)
        params = {n.replace(".original_module.", "."): p for n, p in base.named_parameters()}
        for n, q in ref.named_parameters():
            torch.testing.assert_close(params[n], q, rtol=0, atol=1e-6, msg=n)

    model = loaded.unload()  # never merged: the restored weights must be bit-exact
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in ref.named_modules()]


def test_every_registered_family_has_a_row():
    from unipeft.arch import ARCHS as TABLE

    assert set(TABLE) == set(FAMILIES) | {"llama", "gpt2", "bert", "t5"}
    assert {a for _, a in FAMILY_CASES} == set(FAMILIES)

"""LoRA computed inside its host linear's GEMMs (`positions.weight.HostForward`, `functional.linear_low_rank`; on by
default on CUDA only) equals the formula and the hook path: values and gradients, and it steps aside wherever the
hook path must run (dropout draws, mixed batches, a second adapter, merged or disabled adapters, a part of a fused
linear, a trainable weight). Here the CPU is added to the fused devices so the same torch code runs."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_decoder, tiny_llama

import unipeft
from unipeft import functional as Fn
from unipeft.positions import weight


@pytest.fixture
def fused(monkeypatch):
    """Turn the fused host path on for the CPU and count its calls."""
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset({"cpu"}))
    calls = []
    real = Fn.linear_low_rank

    def counted(*a):
        calls.append(a[0].shape)
        return real(*a)
    monkeypatch.setattr(Fn, "linear_low_rank", counted)
    return calls


@pytest.mark.parametrize("bias", [True, False])
def test_linear_low_rank_is_the_formula(bias):
    torch.manual_seed(0)
    dd = dict(dtype=torch.float64)
    x = torch.randn(2, 5, 6, **dd, requires_grad=True)
    W = torch.randn(7, 6, **dd, requires_grad=True)
    b = torch.randn(7, **dd, requires_grad=True) if bias else None
    A = torch.randn(3, 6, **dd, requires_grad=True)
    B = torch.randn(7, 3, **dd, requires_grad=True)
    s = 0.625
    want = x @ W.T + (b if bias else 0) + s * (x @ A.T) @ B.T
    got = Fn.linear_low_rank(x, W, b, A, B, s)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, W, b, A, B) if t is not None]
    g = torch.randn_like(want)
    for gw, gg in zip(torch.autograd.grad(want, inputs, g), torch.autograd.grad(got, inputs, g)):
        torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: Fn.linear_low_rank(t[0], t[1], t[2] if bias else None, t[-2], t[-1], s),
                                    tuple(inputs))


def _lora(model, **kw):
    cfg = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
               lora_dropout=0.0)
    return unipeft.get_peft_model(model, unipeft.LoraConfig(**{**cfg, **kw}))


def _loss_and_grads(peft, **call):
    peft.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the model's own dropout draws the same masks
    loss = peft(**call).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None}


def _same(a, b, rtol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=1e-6)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=rtol, atol=1e-6 * a[1][k].abs().max().item())


@pytest.mark.parametrize("make,call", [
    (tiny_llama, lambda ids: dict(input_ids=ids, labels=ids)),
    (lambda: tiny_bert(), lambda ids: dict(input_ids=ids, labels=torch.tensor([0, 1]))),  # linears with biases
], ids=["llama", "bert"])
def test_training_step_equals_the_hook_path(monkeypatch, fused, make, call):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    task = "SEQ_CLS" if make is not tiny_llama else "CAUSAL_LM"
    peft = _lora(make(), task_type=task).train()
    got = _loss_and_grads(peft, **call(ids))
    n = len(fused)
    assert n == sum(1 for _, m in peft.named_modules() if "forward" in m.__dict__)  # every adapted linear, once
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset())
    want = _loss_and_grads(peft, **call(ids))
    assert len(fused) == n  # the reference did not fuse
    _same(got, want)


def test_with_gradient_checkpointing(monkeypatch, fused):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    peft = _lora(tiny_llama()).train()
    want = _loss_and_grads(peft, input_ids=ids, labels=ids)
    peft.gradient_checkpointing_enable()
    got = _loss_and_grads(peft, input_ids=ids, labels=ids)
    assert fused
    _same(got, want)


def test_steps_aside_where_the_hook_path_must_run(monkeypatch, fused):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    # a dropout draw in training: the hook path (its mask is shared with siblings)
    peft = _lora(tiny_llama(), lora_dropout=0.1).train()
    peft(input_ids=ids, labels=ids)
    assert not fused
    peft.eval()  # no draw in eval: fused
    peft(input_ids=ids)
    assert fused
    fused.clear()

    peft = _lora(tiny_llama()).train()
    plain = tiny_llama()(input_ids=ids).logits
    with peft.disable_adapter():
        torch.testing.assert_close(peft(input_ids=ids).logits, plain)
    assert not fused
    peft.merge_adapter()
    merged = peft(input_ids=ids).logits
    assert not fused
    peft.unmerge_adapter()
    torch.testing.assert_close(peft(input_ids=ids).logits, merged, rtol=1e-4, atol=1e-5)
    assert fused
    fused.clear()

    # autocast computing in another dtype than the weight's: the hook path (F.linear casts, ours would not)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft(input_ids=ids)
    assert not fused
    peft.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft(input_ids=ids)
    assert fused
    fused.clear()
    peft.to(torch.float32)

    # a trainable base weight
    q = peft.base_model.model.model.layers[0].self_attn.q_proj
    q.weight.requires_grad_(True)
    peft(input_ids=ids)
    assert len(fused) == sum(1 for _, m in peft.named_modules() if "forward" in m.__dict__) - 1
    q.weight.requires_grad_(False)


def test_two_deltas_on_one_host(monkeypatch, fused):
    """Two LoRA insertions on the same linears, both on: one is computed inside the GEMMs, the other by its hook."""
    from unipeft.inject import inject
    from unipeft.spec import AtLinear, Insertion, LowRank

    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    model = tiny_llama()
    for r, s, name in ((4, 2.0, "a"), (2, 0.5, "b")):
        inject(model, (Insertion(delta=LowRank(r=r, init=False), position=AtLinear(targets=("q_proj", "down_proj")),
                                 scale=s, name="lora"),), adapter_name=name)
    got = model(input_ids=ids).logits
    assert len(fused) == 4  # q_proj and down_proj of 2 layers, each once
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset())
    torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_mixed_adapter_batches_take_the_hook_path(monkeypatch, fused):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    peft = _lora(tiny_llama())
    peft.add_adapter("b", unipeft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules="all-linear",
                                             init_lora_weights=False))
    peft.eval()
    mixed = peft(input_ids=ids, adapter_names=["default", "b"]).logits
    assert not fused
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset())
    torch.testing.assert_close(mixed, peft(input_ids=ids, adapter_names=["default", "b"]).logits)


def test_part_of_a_fused_linear_is_not_computed_whole(monkeypatch, fused):
    """phi3's qkv_proj holds q, k and v: LoRA on q_proj acts on q's columns only, so the host is never fused."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    peft = _lora(tiny_decoder("phi3"), target_modules=["q_proj", "o_proj"])
    got = peft(input_ids=ids).logits
    assert len(fused) == 2  # o_proj in each of the 2 layers; never qkv_proj
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset())
    torch.testing.assert_close(got, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_unload_restores_the_class_forward(fused):
    model = tiny_llama()
    peft = _lora(model)
    hosts = [m for _, m in peft.named_modules() if "forward" in m.__dict__]
    assert hosts and all(isinstance(m, torch.nn.Linear) for m in hosts)
    base = peft.unload()
    assert not any("forward" in m.__dict__ for m in base.modules())


def test_a_forward_wrapped_after_injection_is_not_fused(monkeypatch, fused):
    """accelerate's hooks (device placement, casts) wrap `forward` and may return a new tensor, which the site's hook
    could not tell from an unfused output: such a host takes the hook path."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Copy(ModelHook):
        def post_forward(self, module, output):
            return output.clone()

    peft = _lora(tiny_llama())
    q = peft.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset())
    want = q(x)
    add_hook_to_module(q, Copy())
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset({"cpu"}))
    torch.testing.assert_close(q(x), want, rtol=1e-6, atol=1e-6)
    assert not fused


def test_interleaved_calls_each_skip_only_their_own_add(monkeypatch, fused):
    """Two calls of one linear in flight at once (threads): each output's hook knows it was fused from the output
    itself, not from shared state the other call overwrote."""
    peft = _lora(tiny_llama())
    q = peft.base_model.model.model.layers[0].self_attn.q_proj
    (site,) = q.forward.__self__.sites
    x1, x2 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset())
    want1, want2 = q(x1), q(x2)
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset({"cpu"}))
    out1, out2 = q.forward(x1), q.forward(x2)  # both forwards first, then both hooks, as two threads may run them
    assert len(fused) == 2
    torch.testing.assert_close(site._parallel(q, (x2,), out2), want2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(site._parallel(q, (x1,), out1), want1, rtol=1e-6, atol=1e-6)

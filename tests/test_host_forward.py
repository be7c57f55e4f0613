"""LoRA computed inside its host linear's GEMMs (`positions.weight.HostForward`, `functional.linear_low_rank`; on by
default on CUDA only) equals the formula and the hook path: values and gradients, and it steps aside wherever the
hook path must run (dropout draws, mixed batches, a second adapter, merged or disabled adapters, a part of a fused
linear, a trainable weight). The linears reading one x (q, k, v; gate, up) are computed in one node once learned
(`positions/host_group.py`, `functional.linears_low_rank`), and a left output is served only to the call it was
made for. Here the CPU is added to the fused devices so the same torch code runs."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_decoder, tiny_llama

import unipeft
from unipeft import functional as Fn
from unipeft.positions import weight


@pytest.fixture
def fused(monkeypatch):
    """Turn the fused host path on for the CPU and count its calls (a group's call counts once per linear)."""
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset({"cpu"}))
    calls = []
    real, real_group = Fn.linear_low_rank, Fn.linears_low_rank

    def counted(*a):
        calls.append(a[0].shape)
        return real(*a)

    def counted_group(x, A, ranks, *a):
        calls.extend([("group", len(ranks))] * len(ranks))
        return real_group(x, A, ranks, *a)
    monkeypatch.setattr(Fn, "linear_low_rank", counted)
    monkeypatch.setattr(Fn, "linears_low_rank", counted_group)
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
    f = lambda *t: Fn.linear_low_rank(t[0], t[1], t[2] if bias else None, t[-2], t[-1], s)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(inputs))
    assert torch.autograd.gradgradcheck(f, tuple(inputs))  # second derivatives (a gradient penalty) too


@pytest.mark.parametrize("bias", [True, False])
def test_linears_low_rank_is_the_formula(bias):
    """Three linears reading one x, in one node: each output and every gradient as the formula, also when one output
    is not used (it gets no gradient)."""
    torch.manual_seed(0)
    dd = dict(dtype=torch.float64)
    x = torch.randn(2, 5, 6, **dd, requires_grad=True)
    outs, ranks, scales = (7, 3, 4), (3, 2, 1), (0.625, 2.0, 1.5)
    Ws = [torch.randn(o, 6, **dd, requires_grad=True) for o in outs]
    bs = [torch.randn(o, **dd, requires_grad=True) if bias else None for o in outs]
    As = [torch.randn(r, 6, **dd, requires_grad=True) for r in ranks]
    Bs = [torch.randn(o, r, **dd, requires_grad=True) for o, r in zip(outs, ranks)]
    want = [x @ W.T + (b if bias else 0) + s * (x @ A.T) @ B.T for W, b, A, B, s in zip(Ws, bs, As, Bs, scales)]
    got = Fn.linears_low_rank(x, torch.cat(As), ranks, scales, Ws, bs, Bs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    inputs = [x] + [t for group in (Ws, bs, As, Bs) for t in group if t is not None]
    for used in ((0, 1, 2), (0, 2)):  # (0, 2): the second output unused, as when k_proj is never called
        gs = {i: torch.randn_like(want[i]) for i in used}
        loss_w = sum((want[i] * gs[i]).sum() for i in used)
        loss_g = sum((got[i] * gs[i]).sum() for i in used)
        gw = torch.autograd.grad(loss_w, inputs, retain_graph=True, allow_unused=True)
        gg = torch.autograd.grad(loss_g, inputs, retain_graph=True, allow_unused=True)
        for a, b in zip(gg, gw):
            if b is None:  # the unused output's W, b, B
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    f = lambda x, A, *t: Fn.linears_low_rank(x, A, ranks, scales, t[0:3], bs, t[3:6])  # noqa: E731
    args = (x, torch.cat(As).detach().requires_grad_(), *Ws, *Bs)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)  # second derivatives (a gradient penalty) too


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


def _same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=rtol, atol=atol * a[1][k].abs().max().item())


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
    """float64: the grouped linears (in effect from the second pass) sum in another order, within fp32 rounding."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    peft = _lora(tiny_llama().double()).train()
    want = _loss_and_grads(peft, input_ids=ids, labels=ids)
    peft.gradient_checkpointing_enable()
    got = _loss_and_grads(peft, input_ids=ids, labels=ids)
    assert ("group", 3) in fused
    _same(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_linears_over_steps_equal_the_hook_path(monkeypatch, fused, checkpointing):
    """Three optimizer steps: the first pass computes each linear apart and learns q|k|v and gate|up; from the second
    on each group is one node (k, v, up take what q, gate left), and every loss and gradient is the hook path's."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))

    def steps(on):
        monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset({"cpu"} if on else ()))
        peft = _lora(tiny_llama().double()).train()
        if checkpointing:
            peft.gradient_checkpointing_enable()
        opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
        out = []
        for _ in range(3):
            fused.clear()
            out.append(_loss_and_grads(peft, input_ids=ids, labels=ids) + (list(fused),))
            opt.step()
        return out

    got, want = steps(True), steps(False)
    passes = 2 if checkpointing else 1  # the recompute runs every layer again
    first = got[0][2]  # 2 layers × 7 linears, each apart: learning
    assert len(first) == 14 * passes and not any(c[0] == "group" for c in first)
    for _, _, calls in got[1:]:  # 2 layers × (q|k|v, gate|up) in one node each, o and down apart
        assert calls.count(("group", 3)) == 2 * 3 * passes and calls.count(("group", 2)) == 2 * 2 * passes
        assert len(calls) == 14 * passes
    for g, w in zip(got, want):
        _same(g[:2], w[:2], rtol=1e-10, atol=1e-12)


def test_a_left_output_is_served_only_to_its_own_call(monkeypatch, fused):
    """q_proj(x) computes k's and v's outputs too; k_proj and v_proj take them only for the same x, unchanged since,
    with unchanged weights: otherwise they compute their own, so every call returns what the hook path returns."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    peft = _lora(tiny_llama().double()).train()
    for _ in range(2):  # learn the groups; they take effect at the next pass
        peft(input_ids=ids, labels=ids).loss.backward()
    attn = peft.base_model.model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj

    def hooked(lin, x):
        monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset())
        try:
            return lin(x)
        finally:
            monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset({"cpu"}))

    x = torch.randn(2, 5, 32, dtype=torch.float64)
    fused.clear()
    torch.testing.assert_close(q(x), hooked(q, x), rtol=1e-12, atol=1e-12)
    assert fused == [("group", 3)] * 3
    with torch.no_grad():
        k.lora.default.B.add_(0.25)  # k's weights change after q_proj computed k's output
    torch.testing.assert_close(k(x), hooked(k, x), rtol=1e-12, atol=1e-12)
    assert fused == [("group", 3)] * 6  # k computed anew: a group call of its own (the group is in effect)
    x2 = x + 1
    torch.testing.assert_close(v(x2), hooked(v, x2), rtol=1e-12, atol=1e-12)  # another tensor: not v's left output
    assert fused[6:] == [("group", 3)] * 3  # computed (a group call of its own), not served
    x.mul_(2)  # x changed in place after the group computed v's output from it
    torch.testing.assert_close(v(x), hooked(v, x), rtol=1e-12, atol=1e-12)
    fused.clear()
    q(x)
    torch.testing.assert_close(v(x), hooked(v, x), rtol=1e-12, atol=1e-12)
    assert fused == [("group", 3)] * 3  # v's output was left by q's call and served


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


def test_groups_under_inference_mode(fused):
    """Inference tensors carry no version to check a left output by: under torch.inference_mode each linear computes
    its own output, after training has put the groups in effect, with the hook path's values."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    peft = _lora(tiny_llama().double()).train()
    for _ in range(2):
        peft(input_ids=ids, labels=ids).loss.backward()
    peft.eval()
    with torch.no_grad():
        peft(input_ids=ids)
        assert ("group", 3) in fused
    for _ in range(2):
        with torch.inference_mode():
            got = peft(input_ids=ids).logits
    weight.FUSED_HOST_DEVICES = frozenset()
    with torch.inference_mode():
        torch.testing.assert_close(got, peft(input_ids=ids).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["inside_gemms", "hooks_siblings"])
def test_checkpointed_backward_after_no_grad_forwards(monkeypatch, fused, dropout):
    """Forwards without gradients between a checkpointed forward and its backward (an evaluation, generation, a
    reference model's logits) must not put groups into effect before that backward: its recompute replays the
    forward's choices. Gradients as without checkpointing."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))

    def run(checkpointing):
        peft = _lora(tiny_llama().double(), lora_dropout=dropout).train()
        if checkpointing:
            peft.gradient_checkpointing_enable()
        out = []
        for step in range(4):
            peft.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            fused.clear()
            loss = peft(input_ids=ids, labels=ids).loss
            grouped = fused.count(("group", 3))
            with torch.no_grad():
                for _ in range(2):
                    peft(input_ids=ids)
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None},
                        grouped))
        sib = next(m.siblings for m in peft.modules() if getattr(m, "siblings", None) is not None)
        return out, len(sib._groups)

    (got, sib_got), (want, _) = run(True), run(False)
    for g, w in zip(got, want):
        _same(g[:2], w[:2], rtol=1e-10, atol=1e-12)
    if dropout == 0:  # q|k|v of both layers in one node from the second step on, checkpointed or not
        assert [g[2] for g in got] == [0, 6, 6, 6]
    else:  # the hook path: the sibling projections are learned and in effect
        assert sib_got == 10  # q, k, v and gate, up of 2 layers: each member holds its group


def test_groups_are_learned_when_serving_only(fused):
    """A model only ever run without gradients (serving an unmerged adapter) learns its groups too."""
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))
    peft = _lora(tiny_llama().double()).eval()
    with torch.no_grad():
        for _ in range(3):
            fused.clear()
            peft(input_ids=ids)
    assert fused.count(("group", 3)) == 6 and fused.count(("group", 2)) == 4


def test_sharing_scope_is_the_numbered_block():
    from unipeft.positions.weight import sharing_scope
    assert sharing_scope("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert sharing_scope("transformer.h.0.mlp.fc_in") == "transformer.h.0"  # a parallel block shares with attn
    assert sharing_scope("decoder.block.1.layer.1.EncDecAttention.k") == "decoder.block.1.layer.1"
    assert sharing_scope("encoder.attn.q") == "encoder.attn"  # no numbered module: the parent


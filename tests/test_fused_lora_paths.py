"""The fast LoRA training path equals the plain one: values and gradients (issue 14 item 8).

The fast path (`LowRankDelta.add_scaled`) draws one dropout mask per input tensor, projects sibling deltas' A's in
one matmul and folds the dropout's 1/(1−p) into its addmm's alpha. The plain path is h + s·B·A·dropout(x) as the
formula reads. Expected values come from the formula with the mask drawn independently (the kernel's documented
bits: 16 per element from the default generator), or from the model with the fast path switched off.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, tiny_llama

from unipeft import LoraConfig, get_peft_model
from unipeft.deltas.dropout import DropoutCache
from unipeft.deltas.low_rank import LowRankDelta
from unipeft.deltas.siblings import SiblingProjections
from unipeft.spec import LowRank


def _keep(shape, p, seed):
    """The mask the CPU kernel draws after torch.manual_seed(seed), written out from its definition."""
    n = torch.Size(shape).numel()
    torch.manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2 ** 63), None)
    cut = round(p * 65536)
    return words.view(torch.int16)[:n].view(shape) >= cut - 32768, 65536.0 / (65536 - cut)


def _deltas(p, n=3, d_in=12, outs=(12, 6, 6)):
    torch.manual_seed(0)
    ds = [LowRankDelta(LowRank(r=4, dropout=p, init=False), d_in, o).train() for o in outs[:n]]
    cache, sib = DropoutCache(), SiblingProjections()
    for d in ds:
        if p > 0:
            d.dropout.cache = cache
        d.siblings = sib
    return ds, sib


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_add_scaled_equals_the_formula_with_the_same_mask(p):
    (d,), _ = _deltas(p, n=1)
    x = torch.randn(2, 5, 12, requires_grad=True)
    h = torch.randn(2, 5, 12, requires_grad=True)
    s = 2.5
    torch.manual_seed(7)
    out = d.add_scaled(h, x, s)
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, x, d.A, d.B), g_out)

    keep, c = _keep(x.shape, p, 7) if p > 0 else (torch.ones(x.shape, dtype=torch.bool), 1.0)
    A, B = d.A.detach().clone().requires_grad_(), d.B.detach().clone().requires_grad_()
    x2, h2 = x.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    ref = h2 + s * ((x2 * keep * c) @ A.t() @ B.t())
    want = torch.autograd.grad(ref, (h2, x2, A, B), g_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


def test_siblings_share_one_mask_and_one_projection_and_equal_the_formula():
    ds, sib = _deltas(0.3)
    x0 = torch.randn(2, 5, 12)
    hs = [torch.randn(2, 5, d.B.shape[0]) for d in ds]
    s = 0.5
    for step in range(2):  # step 0 learns the group, step 1 projects it in one matmul
        sib.new_pass()
        x = x0.clone().requires_grad_()  # a new input tensor each pass, as in a model's forward
        torch.manual_seed(3)
        outs = [d.add_scaled(h, x, s) for d, h in zip(ds, hs)]
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
        got = torch.autograd.grad(loss, [x] + [d.A for d in ds] + [d.B for d in ds])
        if step == 1:
            assert len(sib._groups) == 3

        keep, c = _keep(x.shape, 0.3, 3)  # one draw for all three
        x2 = x.detach().clone().requires_grad_()
        As = [d.A.detach().clone().requires_grad_() for d in ds]
        Bs = [d.B.detach().clone().requires_grad_() for d in ds]
        refs = [h + s * ((x2 * keep * c) @ A.t() @ B.t()) for h, A, B in zip(hs, As, Bs)]
        ref_loss = sum((o * (i + 1)).sum() for i, o in enumerate(refs))
        want = torch.autograd.grad(ref_loss, [x2] + As + Bs)
        for o, r in zip(outs, refs):
            torch.testing.assert_close(o, r, rtol=0, atol=1e-5)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_training_on_the_fast_path_equals_the_plain_path(monkeypatch, dropout):
    """Whole model, standard call: loss and every LoRA gradient equal to the plain formula's path (1e-5)."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    b = batch_for("llama")
    torch.manual_seed(0)
    fast = get_peft_model(tiny_llama(), LoraConfig(**cfg)).train()
    with monkeypatch.context() as m:
        m.setattr(LowRankDelta, "add_scaled", None)  # the site then computes h + s·delta(x), delta(x) = B·A·dropout(x)
        torch.manual_seed(0)
        plain = get_peft_model(tiny_llama(), LoraConfig(**cfg)).train()
    assert _sites(fast) and all(s._fused for s in _sites(fast)) and not any(s._fused for s in _sites(plain))
    for step in range(2):  # step 1 runs with the learned sibling groups
        res = []
        for peft in (fast, plain):
            torch.manual_seed(10 + step)
            loss = peft(**b).loss
            loss.backward()
            res.append((loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}))
            peft.zero_grad(set_to_none=True)
        (lf, gf), (lp, gp) = res
        torch.testing.assert_close(lf, lp, rtol=0, atol=1e-5)
        assert gf.keys() == gp.keys() and len(gf) == 2 * 7 * 2
        for k in gf:
            torch.testing.assert_close(gf[k], gp[k], rtol=0, atol=1e-5, msg=k)


def _sites(peft):
    from unipeft.positions.weight import LinearDeltaSite

    return [s for h in peft._handles.values() for s in h.sites if isinstance(s, LinearDeltaSite)]


def test_the_sum_is_written_into_the_hosts_fresh_output_and_equals_the_out_of_place_one(monkeypatch):
    """Each LoRA site adds into the linear's own output (no copy of it); the loss equals the out-of-place addmm's
    bitwise and the gradients to rounding; a host whose output some earlier hook has seen is left alone (that hook's tensor unchanged)."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
    b = batch_for("llama")
    flags = []
    orig = LowRankDelta.add_scaled

    def spy(self, h, x, s, *, in_place=False):
        flags.append(in_place)
        return orig(self, h, x, s, in_place=in_place)

    monkeypatch.setattr(LowRankDelta, "add_scaled", spy)
    base = tiny_llama()
    seen = []  # a user's hook on q_proj of layer 0, registered before injection: it sees W x alone
    q0 = base.model.layers[0].self_attn.q_proj
    q0.register_forward_hook(lambda m, a, o: seen.append((o, o.detach().clone())))
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(**cfg)).train()
    res = []
    for in_place in (True, False):
        # a global forward hook sees every output before the sites: then nothing is written in place
        g = None if in_place else torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        flags.clear()
        torch.manual_seed(3)
        loss = peft(**b).loss
        loss.backward()
        if g is not None:
            g.remove()
        res.append((loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}))
        peft.zero_grad(set_to_none=True)
        assert flags.count(True) == (2 * 7 - 1 if in_place else 0)  # all sites but the hooked q_proj
        out, copy = seen[-1]
        assert torch.equal(out, copy)  # what the earlier hook holds was not written into
    (l1, g1), (l2, g2) = res
    assert torch.equal(l1, l2)  # the forward is bit-identical
    for k in g1:  # backward sums x's gradient parts in another order (the graph's node order): rounding only
        torch.testing.assert_close(g1[k], g2[k], rtol=0, atol=1e-6, msg=k)


def test_addmm_into_equals_addmm_values_and_gradients():
    """Fn.addmm_into (the in-place LoRA add as one autograd node) against torch.addmm out of place, fp64."""
    from unipeft import functional as Fn
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    z = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 5, 6, dtype=torch.float64)
    outs = []
    for fused in (True, False):
        h = torch.nn.functional.linear(x, W)
        y = Fn.addmm_into(h, z, B, 0.7) if fused else torch.addmm(h.reshape(-1, 6), z, B.t(), alpha=0.7).view(h.shape)
        grads = torch.autograd.grad((y * gy).sum(), (x, W, z, B))
        outs.append((y.detach(), grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z, B: Fn.addmm_into(torch.zeros(10, 6, dtype=torch.float64), z, B, 0.7),
                                    (z, B))


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def test_the_in_place_add_leaves_no_view_rebase_in_the_graph():
    """Writing into a view of the host's output made autograd rebase the view (CopySlices + AsStridedBackward0:
    two extra passes over each site's output gradient in backward, a measured CPU regression); the fused node
    writes into the output itself."""
    torch.manual_seed(0)
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                   target_modules="all-linear")).train()
    loss = peft(**batch_for("llama")).loss
    names = _graph_nodes(loss)
    assert not {"CopySlices", "AsStridedBackward0"} & names, names
    assert "_AddmmIntoBackward" in names


def test_an_input_reused_across_passes_gets_fresh_projections():
    """The same x tensor in two passes (an input kept across calls): a sibling that skipped the first pass must not be
    served the projection made then, with A's since updated; and the readers of x must not pile up per call."""
    ds, sib = _deltas(0.0, n=2)
    x = torch.randn(2, 5, 12)
    hs = [torch.zeros(2, 5, d.B.shape[0]) for d in ds]
    with torch.no_grad():
        for d, h in zip(ds, hs):  # pass 0 learns the group (q, k)
            d.add_scaled(h, x, 1.0)
        sib.new_pass()
        ds[0].add_scaled(hs[0], x, 1.0)  # pass 1: q projects for both; k does not come
        ds[1].A.mul_(2.0)  # an optimizer step
        sib.new_pass()
        got = ds[1].add_scaled(hs[1], x, 1.0)  # pass 2: k first
        torch.testing.assert_close(got, x @ ds[1].A.T @ ds[1].B.T)
        for _ in range(50):  # repeated calls on one x without new passes
            ds[0].add_scaled(hs[0], x, 1.0)
    assert all(len(entry[1]) <= len(ds) for entry in sib._entries.values())

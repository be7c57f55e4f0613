"""torch.compile for every method: compiled loss and gradients equal eager, and no graph break in the adapter path.

`fullgraph=True` makes any graph break an error (public API, stronger than counting breaks), and
`torch.compiler.reset()` before each compile keeps dynamo's recompile limit from silently falling back to eager.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, tiny_llama
from matrix import config

from unipeft import LoraConfig, get_peft_model

QKV = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
           init_lora_weights=False)


def _model(method, **kw):
    torch.manual_seed(0)
    cfg = LoraConfig(**QKV, **kw) if method == "lora_qkv" else config(method, "llama", random=True)
    return get_peft_model(tiny_llama(), cfg)


def _loss_and_grads(fn, peft, batch):
    loss = fn(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_close(a, b):
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and ga
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=1e-5, msg=k)
    assert any(g.abs().max() > 0 for g in ga.values())


@pytest.mark.parametrize("method,fullgraph", [("lora_qkv", True), ("ia3", True), ("houlsby", True),
                                              ("prefix", True), ("prefix_proj", True), ("prompt_tuning", False)])
def test_compiled_training_step_equals_eager(method, fullgraph):
    # prompt tuning: its input hook branches on the data (template slots, cache length), so it compiles in pieces
    peft = _model(method)
    peft.train()
    b = batch_for("llama")
    eager = [_loss_and_grads(peft, peft, b) for _ in range(2)]  # LoRA: step 2 runs with learned sibling groups
    torch.compiler.reset()
    compiled = torch.compile(peft, fullgraph=fullgraph)
    for step in range(2):
        _assert_close(_loss_and_grads(compiled, peft, b), eager[step])


def test_compiled_lora_learns_no_sibling_groups_when_compiled_first():
    # the crash of issue 14 item 6: the first forward ever ran inside the compiled graph (weak references)
    peft = _model("lora_qkv")
    peft.train()
    b = batch_for("llama")
    torch.compiler.reset()
    compiled = _loss_and_grads(torch.compile(peft, fullgraph=True), peft, b)
    _assert_close(compiled, _loss_and_grads(peft, peft, b))
    sib = peft.get_base_model().model.layers[0].self_attn.q_proj.lora.default.siblings
    assert len(sib._groups) == 0 and len(sib) == 0  # the compiled pass left no eager bookkeeping behind


def test_compiled_lora_dropout_drops_and_equals_eager_in_eval():
    peft = _model("lora_qkv", lora_dropout=0.3)
    b = batch_for("llama")
    torch.compiler.reset()
    compiled = torch.compile(peft, fullgraph=True)
    peft.eval()
    _assert_close(_loss_and_grads(compiled, peft, b), _loss_and_grads(peft, peft, b))
    peft.train()  # random masks: compiled and eager draw from different generators, so only the effect is checked
    torch.manual_seed(1)
    l1, g1 = _loss_and_grads(compiled, peft, b)
    l2, _ = _loss_and_grads(compiled, peft, b)
    peft.eval()
    l0, _ = _loss_and_grads(compiled, peft, b)
    assert torch.isfinite(l1) and l1 != l0 and l1 != l2  # masks are drawn, and drawn anew each step
    assert all(torch.isfinite(g).all() for g in g1.values())


def test_sibling_groups_wait_for_the_backward_of_the_forward_that_found_them():
    """Two forwards before one backward (gradient accumulation), with gradient checkpointing: the recompute of
    the first forward must project as that forward did, so groups found there take effect only afterwards."""
    b = batch_for("llama")
    ref, ckpt = _model("lora_qkv", lora_dropout=0.1), _model("lora_qkv", lora_dropout=0.1)
    for m in ref.modules():
        if getattr(m, "siblings", None) is not None:
            m.siblings.enabled = False
    ckpt.gradient_checkpointing_enable()
    sib = ckpt.get_base_model().model.layers[0].self_attn.q_proj.lora.default.siblings
    out = []
    for peft in (ref, ckpt):
        peft.train()
        torch.manual_seed(3)
        loss = peft(**b).loss + peft(**b).loss
        if peft is ckpt:
            assert len(sib._groups) == 0  # found in the first forward, not yet in effect in the second
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}))
    (la, ga), (lb, gb) = out
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=1e-6, msg=k)
    ckpt(**b)  # the next forward: the groups (q, k, v per layer) take effect
    assert len(sib._groups) == 3 * ckpt.config.num_hidden_layers

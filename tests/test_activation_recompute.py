"""Backward recomputes act(g) from g instead of keeping it (training/recompute.py): exact, and it frees memory."""

from __future__ import annotations

import pytest
import torch
from conftest import batch_for, tiny_bert, tiny_decoder, tiny_gpt2, tiny_llama

from unipeft import LoraConfig, get_peft_model
from unipeft.training import recompute as R
from unipeft.training.recompute import ActivationRecompute


def _step(peft, b, seed):
    torch.manual_seed(seed)
    out = peft(**b)
    loss = out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _off(peft):
    """The same model with the recompute hooks removed (the plain path: every saved tensor kept)."""
    for h in peft._handles.values():
        for e in [e for e in h.extras if isinstance(e, ActivationRecompute)]:
            e.remove()
            h.extras.remove(e)
    return peft


def _count_recomputed(monkeypatch):
    calls = []
    orig = R._Recomputed.get

    def get(self):
        calls.append(type(self.act).__name__)
        return orig(self)
    monkeypatch.setattr(R._Recomputed, "get", get)
    return calls


@pytest.mark.parametrize("make,fam,dropout", [(tiny_llama, "llama", 0.1), (lambda: tiny_decoder("gemma"), "llama", 0.1),
                                              (tiny_gpt2, "gpt2", 0.0), (tiny_bert, "bert", 0.0)])
def test_values_and_gradients_equal_the_plain_path_bitwise(monkeypatch, make, fam, dropout):
    """Llama (SiLU, gated), Gemma (GELU-tanh, gated), GPT-2 (NewGELU), BERT (GELU): loss and every gradient are
    bit-identical to the path that keeps act(g), and backward did recompute (one act per layer). Gated FFNs save
    act(g) for the product; GPT-2/BERT save it only for the next linear's LoRA A when its dropout is 0."""
    cfg = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    b = batch_for(fam)
    torch.manual_seed(0)
    on = get_peft_model(make(), LoraConfig(**cfg)).train()
    torch.manual_seed(0)
    off = _off(get_peft_model(make(), LoraConfig(**cfg)).train())
    calls = _count_recomputed(monkeypatch)
    for step in range(2):
        lo, go = _step(on, b, 10 + step)
        n = len(calls)
        lf, gf = _step(off, b, 10 + step)
        assert len(calls) == n  # the plain path recomputes nothing
        assert torch.equal(lo, lf)
        assert go.keys() == gf.keys() and go
        for k in go:
            assert torch.equal(go[k], gf[k]), k
    assert len(calls) == 2 * 2  # 2 layers, 2 steps


def test_the_activation_output_is_not_kept_until_backward():
    """After the forward, no tensor holding act(g) is alive on the Llama MLP path (it is recomputed)."""
    import weakref

    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    peft = get_peft_model(tiny_llama(), LoraConfig(**cfg)).train()
    outs = []
    acts = [m for m in peft.modules() if type(m).__name__ == "SiLUActivation"]
    assert len(acts) == 2
    hooks = [a.register_forward_hook(lambda m, a, o: outs.append(weakref.ref(o))) for a in acts]
    loss = peft(**batch_for("llama")).loss
    assert len(outs) == 2 and all(r() is None for r in outs)  # freed: only g and u wait for backward
    loss.backward()
    for h in hooks:
        h.remove()
    _off(peft)
    outs.clear()
    hooks = [a.register_forward_hook(lambda m, a, o: outs.append(weakref.ref(o))) for a in acts]
    loss = peft(**batch_for("llama")).loss
    assert all(r() is not None for r in outs)  # the plain path keeps it (the test can fail)
    loss.backward()


def test_in_place_change_of_the_activation_input_is_an_error():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = torch.nn.SiLU()

        def forward(self, g, u):
            return self.act(g) * u

    holder = Gated().train()
    rec = ActivationRecompute(holder)
    g, u = torch.randn(5, requires_grad=True) * 1.0, torch.randn(5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # an outer context stays outer
        y = holder(g, u).sum()
    ref = torch.autograd.grad(y, (u,), retain_graph=True)[0]  # unpacks the recomputed silu(g)
    torch.testing.assert_close(ref, torch.nn.functional.silu(g.detach()), rtol=0, atol=0)
    with torch.no_grad():
        g.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    rec.remove()


def test_off_in_eval_no_grad_with_checkpointing_and_an_exception_closes_the_window():
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    rec = peft.base_model.model._unipeft_activation_recompute
    b = batch_for("llama")
    peft.eval()
    peft(**b)
    assert rec._window is None
    peft.train()
    mlp = peft.base_model.model.model.layers[0].mlp
    h = mlp.up_proj.register_forward_hook(lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        peft(**b)
    h.remove()
    assert rec._window is None  # always_call closed it
    opened = []
    h = mlp.register_forward_pre_hook(lambda *a: opened.append(rec._window))
    peft(**b).loss.backward()
    peft.gradient_checkpointing_enable()
    loss = peft(**b).loss
    h.remove()
    assert opened[0] is not None and opened[-1] is None
    loss.backward()


def test_learned_or_unknown_activations_are_left_alone():
    class Learned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.nn.functional.silu(x) * self.alpha

    assert not R._is_pure_activation(Learned())
    assert not R._is_pure_activation(torch.nn.Softmax(-1)) and not R._is_pure_activation(torch.nn.Dropout())
    assert R._is_pure_activation(torch.nn.SiLU()) and R._is_pure_activation(torch.nn.GELU("tanh"))


def test_removed_with_the_adapter():
    model = tiny_llama()
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert model._unipeft_activation_recompute is not None
    base = peft.unload()
    assert getattr(base, "_unipeft_activation_recompute", None) is None
    assert not base._forward_pre_hooks and not base._forward_hooks and not base.model.layers[0].mlp.act_fn._forward_hooks


def test_in_place_change_of_any_saved_tensor_is_still_an_error():
    """Saved-tensor hooks switch autograd's own in-place check off; the window checks versions itself."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = torch.nn.SiLU()

        def forward(self, x):
            h = x * 2
            return h, self.act(h).tanh().sum() + (h * h).sum()

    block = Block().train()
    ActivationRecompute(block)
    x = torch.randn(5, requires_grad=True)
    h, y = block(x)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_a_dropped_graph_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    model = tiny_llama()
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).train()
    refs = []
    h = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: refs.append(weakref.ref(o)))
    gc.disable()
    try:
        out = peft(**batch_for("llama"))
        del out
        assert refs and refs[0]() is None  # no cycle keeps the forward's activations
    finally:
        gc.enable()
        h.remove()


def test_a_parameter_is_saved_as_itself():
    """A sharding engine (DeepSpeed ZeRO-3) swaps a parameter's .data after forward and back before backward: the
    window must save the parameter itself, not a detached alias of the data it had during forward."""
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4, bias=False).requires_grad_(False)
            self.act = torch.nn.SiLU()

        def forward(self, x):
            return self.act(self.lin(x)) * x

    def grad(window: bool):
        torch.manual_seed(0)
        m = Gated().train()
        rec = ActivationRecompute(m) if window else None
        x = torch.randn(3, 4, requires_grad=True)
        full = m.lin.weight.data
        y = m(x).sum()
        m.lin.weight.data = torch.empty(0)  # partitioned between forward and backward
        m.lin.weight.data = full * 2  # gathered again (other values here, to see which ones backward reads)
        y.backward()
        return x.grad, rec

    (with_window, rec), (plain, _) = grad(True), grad(False)
    assert rec is not None
    torch.testing.assert_close(with_window, plain, rtol=0, atol=0)


def test_an_activation_output_changed_in_place_before_it_is_saved_is_kept():
    """a = act(g); a.mul_(u) (a gated product written into a); down(a) saves the product, not act(g): recomputing
    act(g) there would give a wrong gradient without any error. The product equals a only at act's version."""
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down, self.act = (torch.nn.Linear(4, 8), torch.nn.Linear(4, 8),
                                                       torch.nn.Linear(8, 4), torch.nn.SiLU())

        def forward(self, x):
            a = self.act(self.gate(x))
            a.mul_(self.up(x))
            return self.down(a)

    torch.manual_seed(0)
    m, x = Gated().train(), torch.randn(3, 4)

    def grads():
        m.zero_grad(set_to_none=True)
        m(x).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    want = grads()
    hooks = ActivationRecompute(m)
    try:
        got = grads()
    finally:
        hooks.remove()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=lambda s, n=n: f"{n}: {s}")


def test_a_training_forward_reads_no_deprecated_checkpointing_flag():
    """The window checks transformers' checkpointing flag at every training forward: through its current name
    (`is_gradient_checkpointing` warns at each read in transformers 5 and is gone in v6, where reading it with a
    default would turn the check off). Warnings are errors here, the FutureWarning included."""
    import warnings

    from unipeft import compat

    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    peft.train()
    base = peft.base_model.model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft(**batch_for("llama")).loss.backward()
        assert compat.activation_checkpointing(base) is False
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert compat.activation_checkpointing(base) is True
    assert compat.activation_checkpointing(torch.nn.Linear(2, 2)) is False

"""unipeft.kernels.apply_liger's decisions, with a stand-in for liger-kernel (not installed here; it needs CUDA):
which function is called with what, that the model's forward and our chunked loss stay, and the refusals."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama

import unipeft
from unipeft.cli.errors import CliError
from unipeft.cli.fast_path import apply_liger_or_explain
from unipeft.kernels import apply_liger, liger_available
from unipeft.kernels.liger import _LigerLinearCE, liger_linear_cross_entropy


def _fake_liger(monkeypatch, fn_name="apply_liger_kernel_to_llama", honour_flags=True, params=None):
    """Install a fake `liger_kernel.transformers` whose function records its arguments and, as liger does for an
    instance, rebinds `forward` of the decoder's RMSNorm modules (to an equal computation that counts calls)."""
    calls, norm_calls = [], []

    def apply(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True,
              model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, fused_linear_cross_entropy=fused_linear_cross_entropy,
                          rms_norm=rms_norm, swiglu=swiglu, model=model))
        if fused_linear_cross_entropy or not honour_flags:
            model.forward = types.MethodType(lambda self, *a, **k: None, model)
        base = getattr(model, model.base_model_prefix, model)
        for m in base.modules():
            if type(m).__name__.endswith("RMSNorm"):
                orig = m.forward

                def fwd(x, __orig=orig):
                    norm_calls.append(1)
                    return __orig(x)
                m.forward = fwd

    if params is not None:  # a release whose function lacks some arguments
        exec_ns = {}
        exec(f"def apply({', '.join(params)}): pass", exec_ns)
        apply = exec_ns["apply"]  # noqa: F811
    pkg = types.ModuleType("liger_kernel")
    pkg.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None, is_package=True)
    sub = types.ModuleType("liger_kernel.transformers")
    sub.__spec__ = importlib.machinery.ModuleSpec("liger_kernel.transformers", None)
    setattr(sub, fn_name, apply)
    pkg.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    return calls, norm_calls


def _lora(model):
    cfg = unipeft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    return unipeft.get_peft_model(model, cfg)


def test_applied_to_the_instance_with_our_loss_kept(monkeypatch):
    calls, norm_calls = _fake_liger(monkeypatch)
    assert liger_available()
    ids = torch.randint(3, VOCAB, (2, 9))
    ref = _lora(tiny_llama()).train()
    peft = _lora(tiny_llama()).train()
    want = ref(input_ids=ids, labels=ids).loss
    forward = peft.get_base_model().forward
    assert apply_liger(peft) is peft
    (call,) = calls
    assert call["model"] is peft.get_base_model()  # the transformers model, not our wrapper
    assert call["cross_entropy"] is False and call["fused_linear_cross_entropy"] is False
    assert call["rope"] and call["rms_norm"] and call["swiglu"]
    assert peft.get_base_model().forward == forward
    out = peft(input_ids=ids, labels=ids)
    assert norm_calls  # liger's (here: stand-in) norms ran
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)  # LoRA hooks and our loss still in the path
    with pytest.raises(AttributeError, match="logits"):
        out.logits  # noqa: B018 -- training mode: the chunked loss computed no logits, so it is ours that ran


def test_a_release_that_replaces_the_forward_anyway_is_refused(monkeypatch):
    _fake_liger(monkeypatch, honour_flags=False)
    with pytest.raises(RuntimeError, match="replaced the model's forward"):
        apply_liger(tiny_llama())
    _fake_liger(monkeypatch, honour_flags=False)
    with pytest.raises(CliError, match="replaced the model's forward"):
        apply_liger_or_explain(tiny_llama(), "auto", "cuda")


def test_refusals(monkeypatch):
    _fake_liger(monkeypatch)
    with pytest.raises(ValueError, match="no kernels for model type 'gpt2'"):
        apply_liger(tiny_gpt2())
    _fake_liger(monkeypatch, params=["rope=True", "rms_norm=True", "swiglu=True", "cross_entropy=False", "model=None"])
    with pytest.raises(ValueError, match="takes no fused_linear_cross_entropy"):
        apply_liger(tiny_llama())
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        apply_liger(tiny_llama())


def test_cli_words(monkeypatch):
    calls, _ = _fake_liger(monkeypatch)
    assert apply_liger_or_explain(tiny_llama(), "auto", "cuda") == \
        "liger-kernel (rms_norm, rope, swiglu, fused_linear_cross_entropy)"
    assert len(calls) == 1
    assert apply_liger_or_explain(tiny_llama(), "off", "cuda") == "liger off (--liger off)"
    assert apply_liger_or_explain(tiny_gpt2(), "auto", "cuda").startswith("liger off (liger-kernel has no kernels")
    with pytest.raises(CliError, match="--liger on: liger-kernel has no kernels"):
        apply_liger_or_explain(tiny_gpt2(), "on", "cuda")
    assert len(calls) == 1


def _reference_kernel(calls):
    """A stand-in for liger's fused loss: F.cross_entropy summed over the rows it is given, / n; records its inputs."""
    def kernel(h, weight, bias, y, n, ignore_index):
        calls.append(dict(h=h.detach().clone(), y=y.clone(), n=n, ignore_index=ignore_index))
        logits = torch.nn.functional.linear(h, weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum") / n
    return kernel


@pytest.mark.parametrize("num_items", [None, 7])
def test_the_loss_kernel_gets_shifted_targets_and_the_divisor(monkeypatch, num_items):
    """apply_liger makes the model's chunked loss call the fused kernel: with HF's shifted targets (prompt rows ignored),
    ignored rows zeroed, and HF's divisor (valid targets, or num_items_in_batch); its value and gradients are the
    model's own loss's."""
    _fake_liger(monkeypatch)
    ids = torch.randint(3, VOCAB, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100
    peft = _lora(tiny_llama()).train()
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    want = peft(input_ids=ids, labels=labels, skip_logits=False, **kw).loss  # HF's loss on full logits
    want.backward()
    want_g = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad()
    apply_liger(peft)
    calls = []
    peft.get_base_model()._unipeft_loss_kernel = _reference_kernel(calls)
    got = peft(input_ids=ids, labels=labels, **kw).loss
    got.backward()
    (call,) = calls
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1).reshape(-1)
    assert torch.equal(call["y"], shifted) and call["ignore_index"] == -100
    assert float(call["n"]) == (num_items or int((shifted != -100).sum()))
    assert call["h"][shifted == -100].abs().max() == 0  # ignored rows reach the kernel as zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for n, p in peft.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want_g[n], rtol=1e-4, atol=1e-7)


def test_a_kernel_that_does_not_serve_leaves_the_torch_path():
    peft = _lora(tiny_llama()).train()
    ids = torch.randint(3, VOCAB, (2, 9))
    want = peft(input_ids=ids, labels=ids).loss
    seen = []
    peft.get_base_model()._unipeft_loss_kernel = lambda *a: seen.append(1)  # returns None: does not serve
    torch.testing.assert_close(peft(input_ids=ids, labels=ids).loss, want, rtol=0, atol=0)
    assert seen == [1]


def test_liger_loss_serves_only_cuda_rows_in_the_heads_dtype(monkeypatch):
    # liger-kernel is absent (None in sys.modules makes any import of it fail): None must come before the import
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    h, w, y = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
    assert liger_linear_cross_entropy(h, w, None, y, 4.0, -100) is None


def _fake_liger_loss(monkeypatch):
    """A stand-in for liger's functional fused loss with its autograd contract: ∂loss/∂h computed in forward and, in
    backward, scaled in place by the incoming gradient (liger's element_mul_kernel on its saved tensor)."""
    class FLCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, W, y, bias, ignore_index, reduction):
            with torch.enable_grad():
                hd = h.detach().requires_grad_()
                z = torch.nn.functional.linear(hd, W, bias).float()
                loss = torch.nn.functional.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction)
                (gh,) = torch.autograd.grad(loss, hd)
            ctx.save_for_backward(gh)
            return loss.detach()

        @staticmethod
        def backward(ctx, g):
            (gh,) = ctx.saved_tensors
            if not torch.equal(g, torch.tensor(1.0)):
                gh.mul_(g)  # in place, as liger does
            return gh, None, None, None, None, None

    mod = types.ModuleType("liger_kernel.transformers.functional")
    mod.liger_fused_linear_cross_entropy = lambda h, W, y, bias=None, ignore_index=-100, reduction="mean": \
        FLCE.apply(h, W, y, bias, ignore_index, reduction)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", mod)


def test_liger_loss_node_scales_out_of_place(monkeypatch):
    """Our node around liger's loss: sum / n with the gradient of the formula, the same on a second backward."""
    _fake_liger(monkeypatch)
    _fake_liger_loss(monkeypatch)
    torch.manual_seed(0)
    h = torch.randn(12, 8, requires_grad=True)
    W = torch.randn(20, 8)
    y = torch.randint(0, 20, (12,))
    y[:3] = -100
    want = torch.nn.functional.cross_entropy(h @ W.T, y, ignore_index=-100, reduction="sum") / 7.0
    (want_g,) = torch.autograd.grad(want * 3.0, h)
    got = _LigerLinearCE.apply(h, W, None, y, 7.0, -100)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got * 3.0, h, retain_graph=True)[0]
    g2 = torch.autograd.grad(got * 3.0, h)[0]
    torch.testing.assert_close(g1, want_g)
    torch.testing.assert_close(g2, want_g)  # liger's in-place scaling would make this 9x


def test_liger_loss_serves_a_frozen_cuda_head_in_the_rows_dtype():
    from unipeft.kernels.liger import liger_loss_serves

    W, b = torch.randn(16, 8), torch.randn(16)
    assert liger_loss_serves("cuda", torch.float32, W, None) and liger_loss_serves("cuda", torch.float32, W, b)
    assert not liger_loss_serves("cpu", torch.float32, W, None)
    assert not liger_loss_serves("cuda", torch.bfloat16, W, None)  # rows and head in different dtypes
    assert not liger_loss_serves("cuda", torch.float32, W.requires_grad_(), None)  # a trainable head: our fp32 path
    assert not liger_loss_serves("cuda", torch.float32, W.detach(), b.requires_grad_())


def test_apply_liger_without_the_loss_turns_the_kernel_off(monkeypatch):
    _fake_liger(monkeypatch)
    model = tiny_llama()
    apply_liger(model)
    assert model._unipeft_loss_kernel is liger_linear_cross_entropy
    apply_liger(model, fused_linear_cross_entropy=False)
    assert "_unipeft_loss_kernel" not in model.__dict__

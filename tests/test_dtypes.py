"""Half-precision and quantized bases: trainable parameters are fp32 by default (HF PEFT's autocast_adapter_dtype),
compute in the activation dtype, move under a 1e-5-lr step, and merge in fp32."""

from __future__ import annotations

import bitsandbytes  # noqa: F401  (a dev dependency: the NF4 rows must fail, not skip, without it)
import pytest
import torch
from conftest import BUILDERS, batch_for
from matrix import CORE, PROMPT, cases, config

from unipeft import AdapterConfig, LoraConfig, get_peft_model

HALF = (torch.bfloat16, torch.float16)


def _trainable(peft):
    return {n: p for n, p in peft.named_parameters() if p.requires_grad}


def _one_small_step(peft, arch):
    """One AdamW step at lr 1e-5; returns the parameters before it. Adam's first step moves each parameter by
    ≈ lr = 1e-5 — below half the bf16 spacing of values near 1 (2⁻⁸), so a bf16 parameter would round back."""
    params = _trainable(peft)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.0)
    peft.train()
    loss = peft(**batch_for(arch)).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    return params, before


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("method,arch", cases(CORE + PROMPT, ("llama",)) + cases(("lora", "houlsby"), ("bert",)))
def test_trainable_parameters_are_fp32_on_a_half_base_and_a_tiny_step_moves_them(method, arch, dtype):
    model = BUILDERS[arch]().to(dtype)
    frozen = {n: p.dtype for n, p in model.named_parameters()}
    peft = get_peft_model(model, config(method, arch, random=True))
    params, before = _one_small_step(peft, arch)
    assert params and all(p.dtype == torch.float32 for p in params.values()), {n: p.dtype for n, p in params.items()}
    assert all(p.grad is not None for p in params.values())
    # every adapter parameter that got a gradient moved (heads included); frozen weights kept their dtype
    moved = [n for n, p in params.items() if p.grad.abs().max() > 0 and not torch.equal(p, before[n])]
    assert moved and len(moved) == sum(1 for p in params.values() if p.grad.abs().max() > 0)
    assert all(p.dtype == frozen[n] for n, p in model.named_parameters() if not p.requires_grad and n in frozen)


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_autocast_adapter_dtype_false_keeps_the_base_dtype_and_then_the_tiny_step_rounds_away(method):
    model = BUILDERS["llama"]().to(torch.bfloat16)
    peft = get_peft_model(model, config(method, "llama", random=True), autocast_adapter_dtype=False)
    params, before = _one_small_step(peft, "llama")
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    # the reason for the default: most bf16 entries do not move at lr 1e-5
    unchanged = sum(int((p == before[n]).sum()) for n, p in params.items())
    assert unchanged > 0.5 * sum(p.numel() for p in params.values())


def test_half_base_activations_stay_half_with_fp32_adapters():
    model = BUILDERS["llama"]().to(torch.bfloat16)
    peft = get_peft_model(model, config("lora", "llama", random=True))
    seen = []
    peft.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    out = peft(**batch_for("llama"))
    assert seen == [torch.bfloat16] and out.logits.dtype == torch.bfloat16


def test_task_head_copy_is_fp32_on_a_bf16_base_and_returns_bf16():
    model = BUILDERS["bert"]().to(torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    head = peft.get_base_model().classifier
    assert head.weight.dtype == torch.float32 and head.weight.requires_grad
    out = peft(**batch_for("bert"))
    assert out.logits.dtype == torch.bfloat16
    with peft.disable_adapter():
        assert peft.get_base_model().classifier.weight.dtype == torch.bfloat16  # the original is untouched


def _nf4_llama():
    from unipeft.quant import quantize_model

    return quantize_model(BUILDERS["llama"](), "nf4", compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["lora", "houlsby", "ia3", "prefix"])
def test_trainable_parameters_are_fp32_on_an_nf4_base_one_rule_for_every_delta(method):
    # Houlsby used to get a bf16 attention adapter (on the NF4 o_proj) and an fp32 FFN one
    peft = get_peft_model(_nf4_llama(), config(method, "llama", random=True))
    params, before = _one_small_step(peft, "llama")
    assert all(p.dtype == torch.float32 for p in params.values()), {n: p.dtype for n, p in params.items()}
    assert all(not torch.equal(p, before[n]) for n, p in params.items() if p.grad.abs().max() > 0)


def test_nf4_base_with_autocast_off_keeps_the_compute_dtype():
    peft = get_peft_model(_nf4_llama(), AdapterConfig.houlsby(task_type="CAUSAL_LM", bottleneck_size=8),
                          autocast_adapter_dtype=False)
    assert {p.dtype for p in _trainable(peft).values()} == {torch.bfloat16}


def test_bf16_merge_accumulates_in_fp32():
    model = BUILDERS["llama"]().to(torch.bfloat16)
    peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"],
                                            init_lora_weights=False))
    q = peft.get_base_model().model.layers[0].self_attn.q_proj
    W = q.weight.detach().float().clone()
    A = next(p for n, p in q.named_parameters() if n.endswith("lora_A.default.weight")).detach().double()
    B = next(p for n, p in q.named_parameters() if n.endswith("lora_B.default.weight")).detach().double()
    peft.merge_adapter()
    expected = (W.double() + (8 / 4) * (B @ A)).to(torch.bfloat16)  # W + (α/r)·B·A by the paper's formula
    # fp32 accumulation: the same as rounding the exact sum once (a few ulps at most, never a bf16-sum error)
    diff = (q.weight.float() - expected.float()).abs()
    assert diff.max() <= 2 ** -7 * expected.float().abs().max() and (diff == 0).float().mean() > 0.95

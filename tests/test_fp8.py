"""The FP8 frozen base (unipeft.quant, scheme "fp8"): the e4m3 linear computes exactly the product of its quantized
operands (rowwise scales on the right axes), trains adapters on a quantized model, exports through dequantization,
and refuses what it cannot compute. On the CPU torch emulates the FP8 GEMM; the GPU kernels are checked against the
same reference in benchmarks/gpu_selfcheck.py (check_fp8)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from conftest import batch_for, tiny_llama
from unipeft import LoraConfig, get_peft_model
from unipeft.kbit import loaded_in_kbit
from unipeft.quant import dequantize_model, dequantize_weight, is_quantized, quantize_model, quantized_linear
from unipeft.quant.fp8 import E4M3, Float8Linear, quantize_rows_reference


def _dq(q, s):
    return q.float() * s


def test_quantize_rows_maps_each_rows_absmax_to_448_and_back_within_e4m3_precision():
    t = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-3, 3e-3, -4e-3, 2e-3]])
    q, s = quantize_rows_reference(t)
    assert q.dtype == E4M3 and s.shape == (3, 1)
    assert q.float().abs().amax(1).tolist() == [448.0, 0.0, 448.0]
    assert torch.equal(q[1].float(), torch.zeros(4))  # an all-zero row quantizes to zeros, not NaN
    torch.testing.assert_close(_dq(q, s), t, rtol=2 ** -4, atol=0)  # e4m3: 3 mantissa bits


def test_forward_and_input_gradient_are_the_products_of_the_quantized_operands():
    torch.manual_seed(0)
    W = torch.randn(48, 32) * torch.logspace(-2, 1, 32)  # columns of very different size: scale axes matter
    lin = quantized_linear(W, None, "fp8", torch.float32)
    assert isinstance(lin, Float8Linear) and lin.weight.dtype == torch.uint8 and not lin.weight.requires_grad
    x = (torch.randn(2, 5, 32) * torch.logspace(-1, 1, 5)[:, None]).requires_grad_()
    g = torch.randn(2, 5, 48) * torch.logspace(1, -2, 5)[:, None]
    y = lin(x)
    (dx,) = torch.autograd.grad(y, x, g)
    # the weight copies: per output channel for x·Wᵀ, per input channel for g·W
    qw, sw = quantize_rows_reference(W)
    qwt, swt = quantize_rows_reference(W.t().contiguous())
    qx, sx = quantize_rows_reference(x.detach().reshape(10, 32))
    qg, sg = quantize_rows_reference(g.reshape(10, 48))
    torch.testing.assert_close(y.reshape(10, 48), _dq(qx, sx) @ _dq(qw, sw).T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.reshape(10, 32), _dq(qg, sg) @ _dq(qwt, swt).T, rtol=1e-5, atol=1e-6)
    # and both are the float products to FP8 precision (each operand rounded to 3 mantissa bits)
    for got, ref in ((y, x.detach() @ W.T), (dx, g @ W)):
        assert (got - ref).norm() < 0.06 * ref.norm()
    torch.testing.assert_close(dequantize_weight(lin), _dq(qw, sw), rtol=0, atol=0)


def test_a_trainable_bias_gets_its_gradient_and_the_output_keeps_the_compute_dtype():
    torch.manual_seed(0)
    W, b = torch.randn(32, 16), torch.randn(32)
    lin = quantized_linear(W, b, "fp8", torch.bfloat16)
    lin.bias.requires_grad_(True)
    x = torch.randn(4, 16, requires_grad=True)  # fp32 input: computed in the compute dtype
    y = lin(x)
    assert y.dtype == torch.bfloat16
    g = torch.randn(4, 32, dtype=torch.bfloat16)
    y.backward(g)
    torch.testing.assert_close(lin.bias.grad.float(), g.float().sum(0), rtol=1e-2, atol=1e-2)
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_lora_trains_on_an_fp8_base_and_exports_through_dequantization():
    b = batch_for("llama")
    model = quantize_model(tiny_llama(), "fp8", compute_dtype=torch.float32)
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 14  # 7 linears x 2 layers; lm_head kept
    assert loaded_in_kbit(model) and type(model.lm_head) is nn.Linear
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    trainable = [p for p in peft.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = {n: t.clone() for n, t in peft.state_dict().items() if "lora_" not in n}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    peft.train()
    losses = []
    for _ in range(6):
        loss = peft(**b).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for n, t in peft.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), n  # the FP8 weights and their scales are untouched
    peft.eval()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        fp8 = peft(**inputs).logits
        dequantize_model(peft, torch.float32)
        assert not any(is_quantized(m) for m in peft.modules())
        dq = peft(**inputs).logits  # the same weights, activations no longer rounded to FP8
    assert (fp8 - dq).norm() < 0.1 * dq.norm()


def test_an_fp8_model_is_close_to_the_float_model():
    b = {k: v for k, v in batch_for("llama").items() if k != "labels"}
    with torch.no_grad():
        ref = tiny_llama()(**b).logits
        out = quantize_model(tiny_llama(), "fp8", compute_dtype=torch.float32)(**b).logits
    assert (out - ref).norm() < 0.05 * ref.norm()  # measured 0.026 on this random 32-wide model


def test_a_linear_fp8_cannot_take_stays_in_full_precision_with_a_warning(caplog):
    model = tiny_llama(intermediate_size=40)  # gate/up (40×32) and down (32×40): 40 is not a multiple of 16
    with caplog.at_level(logging.WARNING, logger="unipeft.quant.build"):
        quantize_model(model, "fp8", compute_dtype=torch.float32)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, Float8Linear)
    assert "mlp.down_proj stays in torch.float32: FP8 GEMMs need both sides divisible by 16" in caplog.text
    with pytest.raises(ValueError, match="divisible by 16"):
        quantized_linear(torch.randn(40, 32), None, "fp8", torch.float32)


def test_a_gpu_without_fp8_gemms_is_refused_with_the_alternatives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="NVIDIA A100 has none; use --quantize int8 or nf4, or a bf16 base"):
        Float8Linear(torch.randn(32, 32), None, torch.bfloat16, device="cuda")


def test_linears_reading_one_input_quantize_it_once_until_it_changes(monkeypatch):
    from unipeft.quant import fp8

    calls = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda t: calls.append(t.shape) or real(t))
    torch.manual_seed(0)
    q, k = (quantized_linear(torch.randn(32, 16), None, "fp8", torch.float32) for _ in range(2))
    x = torch.randn(3, 16)
    yq, yk = q(x), k(x)  # q_proj and k_proj on one hidden state
    assert len(calls) == 1
    x.mul_(2)  # changed in place: quantized again, and the result follows
    torch.testing.assert_close(k(x), 2 * yk, rtol=1e-6, atol=1e-6)
    assert len(calls) == 2
    k(x.clone())  # another tensor with the same values: its own quantization
    assert len(calls) == 3


def test_the_output_is_no_view_so_a_lora_adds_into_it_in_place():
    lin = quantized_linear(torch.randn(32, 16), None, "fp8", torch.float32)
    y = lin(torch.randn(2, 3, 16, requires_grad=True))
    assert y.shape == (2, 3, 32) and y._base is None and y.is_contiguous()


def test_inference_mode_runs_and_matches_no_grad():
    lin = quantized_linear(torch.randn(32, 16), None, "fp8", torch.float32)
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = lin(x)
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor: no version counter, so never taken from the cache
        torch.testing.assert_close(lin(xi), ref, rtol=0, atol=0)
        torch.testing.assert_close(lin(xi), ref, rtol=0, atol=0)


def test_conversions_keep_the_scales_fp32_and_the_output():
    torch.manual_seed(0)
    W = torch.randn(32, 16) * torch.logspace(-6, 0, 32)[:, None]  # tiny channels: an fp16 scale would underflow
    lin = quantized_linear(W, None, "fp8", torch.float32)
    x = torch.randn(3, 16)
    ref = lin(x).detach()
    for convert in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        convert(lin)
        assert lin.weight_scale.dtype == lin.weight_t_scale.dtype == torch.float32
        assert lin.weight.dtype == lin.weight_t.dtype == torch.uint8
        torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)


def test_a_second_derivative_is_refused_not_silently_dropped():
    lin = quantized_linear(torch.randn(32, 16), None, "fp8", torch.float32)
    x = torch.randn(3, 16, requires_grad=True)
    (dx,) = torch.autograd.grad(lin(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.sum().backward()


def test_the_cached_input_follows_a_swapped_storage_and_dies_with_its_tensor(monkeypatch):
    import gc

    from unipeft.quant import fp8

    lin = quantized_linear(torch.randn(32, 16), None, "fp8", torch.float32)
    x = torch.randn(3, 16)
    y = lin(x)
    x.data = 2 * x.data  # new storage under the same object, version counter unchanged
    torch.testing.assert_close(lin(x), 2 * y, rtol=1e-6, atol=1e-6)
    del x
    gc.collect()
    assert not fp8._last.entry  # the quantized copy went with its tensor


def test_gradients_reach_the_fp8_gemm_row_major(monkeypatch):
    from unipeft.quant import fp8

    seen = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda t: seen.append(t.is_contiguous()) or real(t))
    lin = quantized_linear(torch.randn(32, 16), None, "fp8", torch.float32)
    x = torch.randn(4, 16, requires_grad=True)
    torch.autograd.grad(lin(x), x, torch.randn(32, 4).t())  # a column-major upstream gradient
    assert seen == [True, True]


def test_a_float_weight_is_refused_by_load_state_dict():
    lin = quantized_linear(torch.randn(32, 16), None, "fp8", torch.float32)
    sd = {k: v.clone() for k, v in lin.state_dict().items()}
    sd["weight"] = torch.randn(32, 16)
    with pytest.raises(ValueError, match="weight is torch.float32, not this FP8 linear's uint8 storage"):
        lin.load_state_dict(sd)


def test_cuda_needs_bf16_compute(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match="computes in bf16 on CUDA .* use --precision bf16"):
        Float8Linear(torch.randn(32, 32), None, torch.float16, device="cuda")


def test_streaming_and_fsdp2_refuse_an_fp8_base():
    from transformers import LlamaConfig

    from unipeft.distributed.fsdp2 import check_quantized_for_fsdp2
    from unipeft.quant import load_quantized, random_source

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="stream=True streams NF4 layers .* not fp8"):
        load_quantized(cfg, "fp8", source=random_source(), stream=True)
    with pytest.raises(ValueError, match="is an FP8 linear: .* use DDP"):
        check_quantized_for_fsdp2(quantize_model(tiny_llama(), "fp8", compute_dtype=torch.float32))


def test_a_replaced_cache_entry_lets_its_quantized_copy_go_at_once():
    import gc
    import weakref

    from unipeft.quant import fp8

    lin = quantized_linear(torch.randn(32, 16), None, "fp8", torch.float32)
    x1 = torch.randn(3, 16)
    lin(x1)
    xq1 = weakref.ref(fp8._last.entry[2])
    gc.disable()  # only reference counting: the old entry must not wait for a collection of its cycle
    try:
        lin(torch.randn(3, 16))
        assert xq1() is None
    finally:
        gc.enable()

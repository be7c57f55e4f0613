"""Lean training: shared dropout, sibling projections, chunked LM loss, gradient checkpointing (+ offload),
quantized frozen bases (NF4 / int8) with adapters on top, and leaving them by dequantize → merge → export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, batch_for, tiny_llama

from unipeft import IA3Config, LoraConfig, get_peft_model
from unipeft.deltas.dropout import SharedDropout, set_shared_dropout
from unipeft.losses import causal_lm_loss, chunked_lm_loss

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def _lora(dropout=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(), LoraConfig(lora_dropout=dropout, **LORA), **kw)


def _grads(peft, batch, seed=5, loss_fn=None):
    torch.manual_seed(seed)
    loss = loss_fn(peft, batch) if loss_fn else peft(**batch).loss
    loss.backward()
    g = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    peft.zero_grad(set_to_none=True)
    return loss.detach(), g


def _assert_same(a, b, atol=0.0):
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and ga
    torch.testing.assert_close(la, lb, rtol=0, atol=atol)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=atol, msg=k)


# ------------------------------------------------------------------------------------------ dropout


def _count_draws(monkeypatch):
    import unipeft.deltas.dropout as D

    calls, real = [], D.dropout
    monkeypatch.setattr(D, "dropout", lambda x, p: calls.append(tuple(x.shape)) or real(x, p))
    return calls


def test_shared_dropout_draws_once_per_input_and_frees_its_cache(monkeypatch):
    calls = _count_draws(monkeypatch)
    peft = _lora(dropout=0.3).train()
    peft(**batch_for("llama")).loss.backward()
    # per layer: one draw for q,k,v (same x), o, one for gate,up (same x), down — not one per delta (7)
    assert len(calls) == 4 * peft.config.num_hidden_layers
    caches = {id(m.cache): m.cache for m in peft.modules() if isinstance(m, SharedDropout)}
    assert len(caches) == 1 and all(len(c) == 0 for c in caches.values())  # nothing outlives the step
    calls.clear()
    set_shared_dropout(peft, False)  # HF PEFT's behaviour: one draw per delta
    peft(**batch_for("llama")).loss.backward()
    assert len(calls) == 7 * peft.config.num_hidden_layers


def test_shared_dropout_equals_per_delta_dropout_in_eval_and_trains():
    b = batch_for("llama")
    shared, per_delta = _lora(dropout=0.3).eval(), _lora(dropout=0.3).eval()
    set_shared_dropout(per_delta, False)
    with torch.no_grad():
        out = shared(**b).logits
        assert not torch.allclose(out, tiny_llama()(**{k: v for k, v in b.items() if k != "labels"}).logits, atol=1e-4)
        torch.testing.assert_close(out, per_delta(**b).logits, rtol=0, atol=0)
    shared.train()
    opt = torch.optim.AdamW([p for p in shared.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = shared(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    shared.eval()
    with torch.no_grad():  # eval is deterministic (no dropout) and differs from the untrained model
        torch.testing.assert_close(shared(**b).logits, shared(**b).logits, rtol=0, atol=0)


def test_cpu_dropout_rate_scale_and_gradient():
    from unipeft.deltas.dropout import dropout

    torch.manual_seed(0)
    x = torch.randn(500, 400, requires_grad=True)
    y = dropout(x, 0.1)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.005
    torch.testing.assert_close(y[kept], x[kept] / (1 - round(0.1 * 65536) / 65536))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - round(0.1 * 65536) / 65536))


# ------------------------------------------------------------------------------------- siblings


def test_sibling_projections_equal_separate_ones_and_are_learned():
    b = batch_for("llama")
    fused, separate = _lora(dropout=0.2), _lora(dropout=0.2)
    for m in separate.modules():
        if getattr(m, "siblings", None) is not None:
            m.siblings.enabled = False
    for peft in (fused, separate):
        peft.train()
    for step in range(2):  # step 0 learns the groups (q,k,v and gate,up per layer), step 1 uses them
        _assert_same(_grads(fused, b, seed=step), _grads(separate, b, seed=step), atol=1e-6)
    sib = next(m.siblings for m in fused.modules() if getattr(m, "siblings", None) is not None)
    assert len(sib._groups) == 5 * fused.config.num_hidden_layers and len(sib) == 0


# ------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients(offload, dropout):
    b = batch_for("llama")
    plain, ckpt = _lora(dropout), _lora(dropout)
    ckpt.gradient_checkpointing_enable(offload_activations=offload)
    assert ckpt.get_base_model().is_gradient_checkpointing
    for peft in (plain, ckpt):
        peft.train()
    for step in range(2):  # step 1 runs with learned sibling groups
        _assert_same(_grads(plain, b, seed=step), _grads(ckpt, b, seed=step), atol=1e-6)


def test_offload_routes_checkpointed_inputs_through_save_on_cpu(monkeypatch):
    import unipeft.checkpointing as C

    used = []
    real = torch.autograd.graph.save_on_cpu

    def spy(*a, **k):
        used.append(k)
        return real(*a, **k)

    monkeypatch.setattr(C.torch.autograd.graph, "save_on_cpu", spy)
    peft = _lora()
    peft.gradient_checkpointing_enable(offload_activations=True)
    peft.train()
    peft(**batch_for("llama")).loss.backward()
    assert len(used) == peft.config.num_hidden_layers


# ------------------------------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_lm_loss_equals_the_full_loss_and_its_gradients(dtype, chunk):
    torch.manual_seed(0)
    B, T, d, V = 3, 9, 16, 40
    h = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    W = torch.randn(V, d, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100
    labels[2, 7] = -100
    full = F.cross_entropy(F.linear(h, W, bias)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    g_full = torch.autograd.grad(full, (h, W, bias))
    loss = chunked_lm_loss(h, W, labels, bias=bias, chunk=chunk)
    g = torch.autograd.grad(loss, (h, W, bias))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss, full, rtol=0, atol=tol)
    for a, e in zip(g, g_full):
        torch.testing.assert_close(a, e, rtol=0, atol=tol)
    # HF's gradient-accumulation divisor
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(chunked_lm_loss(h, W, labels, chunk=chunk, num_items_in_batch=2 * n),
                               chunked_lm_loss(h, W, labels, chunk=chunk) / 2, rtol=0, atol=tol)


def test_causal_lm_loss_equals_the_models_loss_for_lora_and_full_models():
    b = batch_for("llama")
    for model in (_lora(), tiny_llama().train()):  # full model: the tied head/embeddings get gradients too
        ref = _grads(model, b)
        ours = _grads(model, b, loss_fn=lambda m, x: causal_lm_loss(m, **x, chunk=4))
        _assert_same(ref, ours, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(_lora(), **b), _lora()(**b).loss, rtol=0, atol=1e-6)


def test_causal_lm_loss_falls_back_when_the_head_is_adapted():
    torch.manual_seed(0)
    peft = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    b = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(peft, **b), peft(**b).loss)


# ------------------------------------------------------------------------------------ quantized bases

bnb = pytest.importorskip("bitsandbytes")
from unipeft.quant import (dequantize_model, is_quantized, load_quantized, merge_and_export,  # noqa: E402
                           quantize_model, random_source)


def _inputs(b):
    return {k: v for k, v in b.items() if k != "labels"}


@pytest.mark.parametrize("scheme,tol", [("nf4", 1e-5), ("int8", 2e-2)])
def test_lora_on_a_quantized_base_matches_the_dequantized_base_and_trains(scheme, tol):
    b = batch_for("llama")
    model = quantize_model(tiny_llama(), scheme, compute_dtype=torch.float32)
    assert sum(is_quantized(m) for m in model.modules()) == 14  # 7 linears x 2 layers; lm_head kept
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(**LORA))
    assert all(p.dtype == torch.float32 for p in peft.parameters() if p.requires_grad)  # compute dtype
    base_bytes = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}
    peft.train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = peft(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for n, p in peft.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), base_bytes[n]), n  # the frozen quantized base is untouched
    peft.eval()
    with torch.no_grad():
        quantized = peft(**_inputs(b)).logits
        dequantize_model(peft, torch.float32)
        assert not any(is_quantized(m) for m in peft.modules())
        dequantized = peft(**_inputs(b)).logits
    torch.testing.assert_close(quantized, dequantized, rtol=0, atol=tol * dequantized.abs().max().item())


def test_quantized_model_is_close_to_the_float_model():
    b = _inputs(batch_for("llama"))
    with torch.no_grad():
        ref = tiny_llama()(**b).logits
        for scheme, tol in (("nf4", 0.25), ("int8", 0.02)):  # measured: 0.16 and 0.007 (random 32-wide model)
            out = quantize_model(tiny_llama(), scheme, compute_dtype=torch.float32)(**b).logits
            assert (out - ref).norm() < tol * ref.norm(), scheme


def test_other_methods_train_on_a_quantized_base():
    torch.manual_seed(0)
    peft = get_peft_model(quantize_model(tiny_llama(), "nf4", compute_dtype=torch.float32), IA3Config(init_ia3_weights=False))
    peft.train()
    peft(**batch_for("llama")).loss.backward()
    assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)


def test_merging_a_quantized_base_dequantizes_and_reports_its_error():
    b = batch_for("llama")
    torch.manual_seed(1)
    peft = get_peft_model(quantize_model(tiny_llama(), "nf4", compute_dtype=torch.float32), LoraConfig(**LORA))
    with pytest.raises(ValueError, match="dequantize"):
        peft.merge_adapter()  # merging into 4-bit integers would be lossy: refused
    merged, report = merge_and_export(peft, _inputs(b), dtype=torch.bfloat16)
    assert not any(is_quantized(m) for m in merged.modules())
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert report["max_abs_err_fp32"] < 1e-4 * report["max_abs_logit"] + 1e-6
    assert report["max_abs_err_fp32"] <= report["max_abs_err_export"] < 0.1 * report["max_abs_logit"]


def test_load_quantized_from_safetensors_equals_quantizing_the_loaded_model(tmp_path):
    b = _inputs(batch_for("llama"))
    tiny_llama().save_pretrained(tmp_path)
    built = load_quantized(tmp_path, "nf4", compute_dtype=torch.float32)
    assert all(p.device.type == "cpu" for p in built.parameters())
    assert built.lm_head.weight is built.model.embed_tokens.weight or not built.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(built(**b).logits,
                                   quantize_model(tiny_llama(), "nf4", compute_dtype=torch.float32)(**b).logits)


def test_load_quantized_from_a_config_builds_random_weights_of_the_right_shapes():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = load_quantized(cfg, "nf4", source=random_source(), compute_dtype=torch.bfloat16)
    assert sum(is_quantized(m) for m in model.modules()) == 14
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.device.type == "meta" for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(**LORA))
    assert all(p.dtype == torch.bfloat16 for p in peft.parameters() if p.requires_grad)
    peft.train()
    ids = torch.randint(0, VOCAB, (2, 8))
    causal_lm_loss(peft, ids).backward()
    assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_trains_lora_on_a_quantized_base_with_offloaded_checkpointing(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from unipeft.models import embedded_path

    try:
        tok = AutoTokenizer.from_pretrained(str(embedded_path()))
    except Exception as e:  # pragma: no cover
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"the {c} fox jumps"}) + "\n"
                                              for c in ["red", "brown", "quick"] * 4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "unipeft.cli", "train", "--model", tmp_path / "m", "--task", "causal-lm",
                        "--train", tmp_path / "t.jsonl", "--output", tmp_path / "run", "--batch-size", "4",
                        "--max-steps", "2", "--quantize", "nf4", "--gradient-checkpointing", "--offload-activations"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nf4 base" in p.stdout and "gradient checkpointing" in p.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

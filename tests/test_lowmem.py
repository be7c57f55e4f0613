"""Lean training: shared dropout, sibling projections, chunked LM loss, gradient checkpointing (+ offload),
quantized frozen bases (NF4 / int8) with adapters on top, and leaving them by dequantize → merge → export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, batch_for, tiny_llama

from unipeft import IA3Config, LoraConfig, get_peft_model
from unipeft.deltas.dropout import SharedDropout, set_shared_dropout
from unipeft.training.losses import causal_lm_loss, chunked_lm_loss

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

    calls, real = [], D.masked  # every draw (dropout() too) goes through masked()
    monkeypatch.setattr(D, "masked", lambda x, p: calls.append(tuple(x.shape)) or real(x, p))
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


@pytest.mark.parametrize("fused_host", [False, True], ids=["hooks", "inside_gemms"])
@pytest.mark.parametrize("arch,targets,dropout", [
    ("t5", None, 0.0), ("t5", ["k", "v"], 0.0), ("t5", None, 0.1), ("bert", None, 0.1)],
    ids=["t5_q_v", "t5_k_v", "t5_dropout", "bert_dropout"])
def test_gradient_checkpointing_where_deltas_read_a_tensor_from_outside_the_region(monkeypatch, fused_host, arch,
                                                                                  targets, dropout):
    """What deltas share by input tensor (a dropout draw, a sibling projection, linears computed in one node) must
    be computed again in a checkpoint recompute exactly as in the forward, or torch's checkpoint raises
    CheckpointError. T5's decoder layers all read the encoder output (a share made in one layer's region and taken in
    another's: groups and draws stay inside one parent module); BERT's q, k, v read the checkpointed layer's own input,
    the same tensor in the recompute (a delta reading it again draws again). Gradients equal the run without
    checkpointing, over steps where the groups are learned and then in effect."""
    from conftest import tiny_bert, tiny_t5

    from unipeft.positions import weight
    monkeypatch.setattr(weight, "FUSED_HOST_DEVICES", frozenset({"cpu"} if fused_host else ()))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    b = dict(input_ids=ids, labels=torch.randint(3, VOCAB, (2, 5), generator=g) if arch == "t5" else
             torch.tensor([0, 1]))

    def peft():
        torch.manual_seed(0)
        model, task = (tiny_t5(), "SEQ_2_SEQ_LM") if arch == "t5" else (tiny_bert(), "SEQ_CLS")
        return get_peft_model(model.double(), LoraConfig(task_type=task, r=4, lora_alpha=8, lora_dropout=dropout,
                                                         init_lora_weights=False, target_modules=targets)).train()
    plain, ckpt = peft(), peft()
    ckpt.gradient_checkpointing_enable()
    for step in range(3):  # groups are learned in step 0 and in effect from step 1
        _assert_same(_grads(plain, b, seed=step), _grads(ckpt, b, seed=step), atol=1e-12)


def test_offload_routes_checkpointed_inputs_through_save_on_cpu(monkeypatch):
    import unipeft.training.checkpointing as C

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_lm_loss_with_a_frozen_head_equals_the_full_loss_and_its_input_gradient(dtype, chunk):
    """A frozen head (LoRA's case) takes the other branch: (e·W)/s − W[y] instead of (softmax − onehot)·W.
    Expected: cross_entropy on the full logits in fp64 from the same (rounded) values."""
    torch.manual_seed(0)
    B, T, d, V = 3, 9, 16, 40
    h = torch.randn(B, T, d).to(dtype).requires_grad_()
    W = torch.randn(V, d).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100
    labels[2, 7] = -100
    h64 = h.detach().double().requires_grad_()
    full = F.cross_entropy(F.linear(h64, W.double())[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    (g_full,) = torch.autograd.grad(full, h64)
    loss = chunked_lm_loss(h, W, labels, chunk=chunk)
    (g,) = torch.autograd.grad(loss, h)
    assert g.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(loss.double(), full, rtol=tol, atol=0)  # relative: fp32's eps at a loss of ~10
    torch.testing.assert_close(g.double(), g_full, rtol=0, atol=tol * g_full.abs().max().item())


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


# ----------------------------------------------------------------------------------------- host embeddings


def _inputs(b):
    return {k: v for k, v in b.items() if k != "labels"}


def _untied_llama():
    return tiny_llama(tie_word_embeddings=False)


def test_host_embedding_looks_up_like_the_table_and_keeps_its_state_dict_key():
    from unipeft import HostEmbedding, embeddings_on_host

    b = _inputs(batch_for("llama"))
    ref = _untied_llama()
    model = embeddings_on_host(_untied_llama())
    emb = model.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and not list(emb.parameters())  # a frozen buffer, not a parameter
    assert "model.embed_tokens.weight" in model.state_dict()
    torch.testing.assert_close(model.state_dict()["model.embed_tokens.weight"], ref.model.embed_tokens.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, ref(**b).logits, rtol=0, atol=0)
    model.to(torch.bfloat16)  # follows the model's dtype for lookups; the host table keeps its own
    assert emb.weight.dtype == torch.float32 and emb(b["input_ids"]).dtype == torch.bfloat16
    assert emb.weight.device.type == "cpu" and emb.compute_device.type == "cpu"
    want = get_peft_model(_untied_llama(), LoraConfig(**LORA)).get_nb_trainable_parameters()
    assert get_peft_model(model, LoraConfig(**LORA)).get_nb_trainable_parameters() == want  # the table still counts


def test_host_embedding_follows_the_model_to_another_device():
    from unipeft import embeddings_on_host

    emb = embeddings_on_host(_untied_llama()).get_input_embeddings()
    table = emb.weight
    # a device move is a function of tensors: probe it with the meta device, no accelerator needed
    emb._apply(lambda t: t.to("meta"))
    assert emb.compute_device.type == "meta" and emb.weight is table  # lookups go there, the table stays
    assert emb(torch.tensor([[3, 4]])).device.type == "meta"


@pytest.mark.parametrize("config", [LoraConfig(**LORA), IA3Config(init_ia3_weights=False)], ids=["lora", "ia3"])
def test_adapters_train_the_same_with_the_embedding_table_on_the_host(config):
    from unipeft import embeddings_on_host

    b = batch_for("llama")
    torch.manual_seed(1)
    ref = get_peft_model(_untied_llama(), config)
    torch.manual_seed(1)
    host = get_peft_model(embeddings_on_host(_untied_llama()), config)
    for p in (ref, host):
        p.train()
        p.gradient_checkpointing_enable()
    _assert_same(_grads(ref, b), _grads(host, b))


def test_prompt_tuning_reads_its_init_from_the_host_table():
    from unipeft import PromptTuningConfig, embeddings_on_host

    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB")
    torch.manual_seed(2)
    ref = get_peft_model(_untied_llama(), cfg)
    torch.manual_seed(2)
    host = get_peft_model(embeddings_on_host(_untied_llama()), cfg)
    b = batch_for("llama")
    _assert_same(_grads(ref, b), _grads(host, b))


def test_host_embeddings_refuse_a_table_tied_to_the_head():
    from unipeft import embeddings_on_host

    with pytest.raises(ValueError, match="tied to the output head"):
        embeddings_on_host(tiny_llama(tie_word_embeddings=True))


# ------------------------------------------------------------------------------------ quantized bases

import bitsandbytes as bnb  # noqa: E402,F401  (a dev dependency: missing must fail, not skip the file)
from unipeft.quant import (dequantize_model, is_quantized, load_quantized, merge_and_export,  # noqa: E402
                           quantize_model, random_source, safetensors_source)


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


def _other_methods():
    from unipeft import AdapterConfig, MAMConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    task = dict(task_type="CAUSAL_LM")
    return {"ia3": IA3Config(init_ia3_weights=False, **task),
            "houlsby": AdapterConfig.houlsby(bottleneck_size=8, init="random", **task),
            "pfeiffer": AdapterConfig.pfeiffer(bottleneck_size=8, init="random", **task),
            "scaled_parallel": AdapterConfig.scaled_parallel(bottleneck_size=8, init="random", **task),
            "prefix": PrefixTuningConfig(num_virtual_tokens=4, **task),
            "prompt": PromptTuningConfig(num_virtual_tokens=4, **task),
            "p_tuning": PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, **task),
            "mam": MAMConfig(num_virtual_tokens=4, encoder_hidden_size=16, bottleneck_size=8, **task)}


@pytest.mark.parametrize("name", list(_other_methods()))
def test_other_methods_train_on_a_quantized_base(name):
    torch.manual_seed(0)
    peft = get_peft_model(quantize_model(tiny_llama(), "nf4", compute_dtype=torch.float32), _other_methods()[name])
    peft.train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    b = batch_for("llama")
    losses = []
    for _ in range(5):
        loss = peft(**b).loss
        loss.backward()
        assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


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
    assert all(p.dtype == torch.float32 for p in peft.parameters() if p.requires_grad)  # fp32 over NF4
    peft.train()
    ids = torch.randint(0, VOCAB, (2, 8))
    causal_lm_loss(peft, ids).backward()
    assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_parameter_counts_on_a_quantized_base_count_weights_not_bytes(scheme):
    want = get_peft_model(tiny_llama(), LoraConfig(**LORA)).get_nb_trainable_parameters()
    got = get_peft_model(quantize_model(tiny_llama(), scheme), LoraConfig(**LORA)).get_nb_trainable_parameters()
    assert got == want


def test_task_heads_stay_in_full_precision_and_train_on_a_quantized_base():
    from conftest import tiny_bert

    model = quantize_model(tiny_bert(), "nf4", compute_dtype=torch.float32)
    assert type(model.classifier) is torch.nn.Linear and is_quantized(model.bert.pooler.dense)
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    peft.train()
    peft(**batch_for("bert")).loss.backward()
    head = [p for n, p in peft.named_parameters() if "classifier" in n and p.requires_grad]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


def test_a_bare_base_checkpoint_loads_quantized_under_a_new_task_head(tmp_path, caplog):
    from conftest import tiny_bert
    from transformers import AutoConfig, BertForSequenceClassification

    full = tiny_bert()
    full.bert.save_pretrained(tmp_path)  # keys without the `bert.` prefix, no classifier
    cfg = AutoConfig.from_pretrained(tmp_path, num_labels=3)
    with caplog.at_level("WARNING", logger="unipeft.quant.build"):
        built = load_quantized(cfg, "nf4", source=safetensors_source(tmp_path), compute_dtype=torch.float32,
                               model_class=BertForSequenceClassification, fill=random_source(std=0.02))
    assert "classifier.weight" in caplog.text and "classifier.bias" in caplog.text and "pooler" not in caplog.text
    assert built.classifier.weight.shape == (3, 32) and built.classifier.bias.abs().sum() == 0
    b = _inputs(batch_for("bert"))
    with torch.no_grad():
        want = quantize_model(full, "nf4", compute_dtype=torch.float32).bert(**b).last_hidden_state
        torch.testing.assert_close(built.bert(**b).last_hidden_state, want, rtol=0, atol=0)


def test_load_quantized_never_fills_a_missing_quantized_linear(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    read = safetensors_source(tmp_path)
    gap = "model.layers.1.mlp.up_proj.weight"

    def source(name, shape, dtype):
        return None if name == gap else read(name, shape, dtype)

    cfg = tiny_llama().config
    with pytest.raises(KeyError, match=gap):
        load_quantized(cfg, "nf4", source=source, fill=random_source(), compute_dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- CLI


def _cli_train(tmp_path, name: str, *flags, tied: bool = True):
    """`unipeft train` on a tiny Llama with SmolLM2's tokenizer, 2 steps, in a subprocess."""
    import json
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from unipeft.cli.embedded import embedded_path

    try:
        tok = AutoTokenizer.from_pretrained(str(embedded_path()))
    except Exception as e:  # pragma: no cover
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")
    torch.manual_seed(0)
    m = tmp_path / f"model-{name}"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(m)
    tok.save_pretrained(m)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"the {c} fox jumps"}) + "\n" for c in ["red", "brown", "quick"] * 4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "unipeft.cli", "train", "--model", m, "--task", "causal-lm",
                           "--train", data, "--output", tmp_path / name, "--batch-size", "4", "--max-steps", "2",
                           *flags], capture_output=True, text=True, env=env, timeout=300)


def test_cli_trains_lora_on_a_quantized_base_with_offloaded_checkpointing(tmp_path):
    p = _cli_train(tmp_path, "run", "--quantize", "nf4", "--gradient-checkpointing", "--offload-activations",
                   "--optimizer", "paged_adamw_8bit")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nf4 base (built layer by layer)" in p.stdout and "gradient checkpointing" in p.stdout and "paged_adamw_8bit" in p.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_host_embeddings_train_and_refuse_tied_tables_clearly(tmp_path):
    ok = _cli_train(tmp_path, "untied", "--host-embeddings", "--gradient-checkpointing", tied=False)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "embeddings on host" in ok.stdout
    assert (tmp_path / "untied" / "adapter" / "adapter_model.safetensors").is_file()
    tied = _cli_train(tmp_path, "tied", "--host-embeddings", tied=True)
    assert tied.returncode == 2 and "tied to the output head" in tied.stderr and "drop --host-embeddings" in tied.stderr
    assert not (tmp_path / "tied").exists()  # refused before the output folder is made


# ------------------------------------------------------------------------------- streamed quantized layers


def _streamed_pair(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    plain = load_quantized(tmp_path, "nf4", compute_dtype=torch.float32)
    streamed = load_quantized(tmp_path, "nf4", compute_dtype=torch.float32, stream=True)
    return plain, streamed


def test_streamed_layers_compute_the_same_and_load_one_layer_at_a_time(tmp_path):
    plain, streamed = _streamed_pair(tmp_path)
    stream = streamed._unipeft_stream
    assert len(stream.host) == 2  # the two decoder layers, found as ModuleList elements
    b = _inputs(batch_for("llama"))
    with torch.no_grad():
        torch.testing.assert_close(streamed(**b).logits, plain(**b).logits, rtol=0, atol=0)
    assert stream.loads == 2 and stream.resident is streamed.model.layers[1]
    streamed.to("cpu")  # a device move leaves parked weights where they are (a test of the override, on CPU)
    assert all(host.data_ptr() == getattr(obj, attr).data_ptr()
               for obj, attr, host in stream.host[id(streamed.model.layers[0])])


def test_streamed_layers_train_lora_with_the_same_gradients(tmp_path):
    plain, streamed = _streamed_pair(tmp_path)
    b = batch_for("llama")
    peft = {}
    for name, model in (("plain", plain), ("streamed", streamed)):
        torch.manual_seed(1)
        peft[name] = get_peft_model(model, LoraConfig(**LORA))
        peft[name].train()
    peft["plain"].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    peft["streamed"].gradient_checkpointing_enable()  # a streamed model checkpoints reentrantly by itself
    fn = streamed.model.layers[0]._gradient_checkpointing_func
    assert fn.keywords["use_reentrant"] is True
    loads = streamed._unipeft_stream.loads
    _assert_same(_grads(peft["plain"], b), _grads(peft["streamed"], b), atol=1e-6)
    # forward: layer 0 then 1; backward recomputes 1 (still loaded) then loads 0 again
    assert streamed._unipeft_stream.loads - loads == 3


def test_streamed_layers_refuse_a_training_forward_without_checkpointing(tmp_path):
    _, streamed = _streamed_pair(tmp_path)
    peft = get_peft_model(streamed, LoraConfig(**LORA))
    peft.train()
    with pytest.raises(RuntimeError, match="gradient_checkpointing_enable"):
        peft(**batch_for("llama"))

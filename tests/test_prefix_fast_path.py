"""Prefix attention on SDPA's fused path (issue 16): with no padding mask a causal layer gets torch's
causal_lower_right(T, P+S) instead of a dense [visible | mask] tensor. The explicit dense-mask path is the
reference: logits and gradients (prefix tables, MLP parameters) must be equal, and a spy on the attention call
proves which path ran. Also: the MLP reparameterization is computed once per forward pass for all layers."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import BUILDERS, VOCAB, batch_for
from matrix import config
from torch.nn.attention.bias import CausalBias
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from unipeft import get_peft_model
from unipeft.positions.attention_kv import prefix_mask_path

METHODS = ("prefix", "prefix_proj", "p_tuning_v2", "mam")
DECODERS = ("llama", "gpt2")  # llama: RoPE + GQA (4 heads, 2 KV heads)
P = 4  # num_virtual_tokens of these methods in tests/matrix.py


@contextlib.contextmanager
def spy_sdpa():
    """Record the attention_mask every call of transformers' sdpa attention function receives (the seam calls it)."""
    orig, masks = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return orig(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa", spy)
    try:
        yield masks
    finally:
        AttentionInterface.register("sdpa", orig)


def dense(m) -> bool:
    return isinstance(m, torch.Tensor) and not isinstance(m, CausalBias)


def run(peft, batch, path):
    """Logits and the gradients of every trainable parameter, on `path`, with the masks the attention saw."""
    peft.zero_grad()
    with prefix_mask_path(path), spy_sdpa() as masks:
        out = peft(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads, masks


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    assert a[1].keys() == b[1].keys() and a[1]
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=0, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("arch", (*DECODERS, "bert"))
@pytest.mark.parametrize("method", METHODS)
def test_fast_path_equals_explicit_mask_and_is_taken(method, arch):
    peft = get_peft_model(BUILDERS[arch](), config(method, arch, random=True))
    batch = batch_for(arch)  # attention_mask all ones: transformers passes mask None, the fast path serves
    explicit, fast = run(peft, batch, "explicit"), run(peft, batch, "fast")
    assert_same(fast, explicit)
    assert len(fast[2]) == len(explicit[2]) == 2  # one call per layer of the tiny models
    if arch in DECODERS:  # the reference really was a dense mask, the fast path a CausalBias over P + S keys
        T = batch["input_ids"].shape[1]
        assert all(dense(m) and m.shape[-2:] == (T, P + T) for m in explicit[2])
        assert all(isinstance(m, CausalBias) and (m.seq_len_q, m.seq_len_kv) == (T, P + T) for m in fast[2])
    else:  # bidirectional: no mask needed on either path
        assert all(m is None for m in fast[2] + explicit[2])


def test_t5_relative_bias_keeps_the_explicit_path_and_agrees():
    peft = get_peft_model(BUILDERS["t5"](), config("prefix", "t5", random=True))
    batch = batch_for("t5")
    assert_same(run(peft, batch, "fast"), run(peft, batch, "explicit"))


@pytest.mark.parametrize("method", ("prefix", "prefix_proj"))
def test_padded_batch_falls_back_to_the_dense_mask(method):
    peft = get_peft_model(BUILDERS["llama"](), config(method, "llama", random=True))
    batch = batch_for("llama")
    batch["attention_mask"][0, -3:] = 0
    batch["labels"][0, -3:] = -100
    explicit, fast = run(peft, batch, "explicit"), run(peft, batch, "fast")
    assert_same(fast, explicit)
    B, T = batch["input_ids"].shape
    assert fast[2] and all(dense(m) and m.shape == (B, 1, T, P + T) for m in fast[2])
    # the padded row equals the row alone (fast path, no padding)
    alone = {k: v[:1, :-3] for k, v in batch.items()}
    with torch.no_grad(), spy_sdpa() as masks:
        a, b = peft(**batch).logits[0, :T - 3], peft(**alone).logits[0]
    assert isinstance(masks[-1], CausalBias)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ("prefix", "prefix_proj"))
def test_cached_chunk_with_fewer_queries_than_keys(method):
    """q_len < kv_len (a chunk after a KV cache): transformers passes a dense causal mask there (it skips the mask
    only for q_len == kv_len or 1), so both paths extend it; both equal the full forward's last positions."""
    peft = get_peft_model(BUILDERS["llama"](), config(method, "llama", random=True))
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    outs = {}
    with torch.no_grad():
        full = peft(input_ids=ids).logits
        for path in ("explicit", "fast"):
            with prefix_mask_path(path), spy_sdpa() as masks:
                past = peft(input_ids=ids[:, :5], use_cache=True).past_key_values
                outs[path] = peft(input_ids=ids[:, 5:], past_key_values=past, use_cache=True).logits
            assert dense(masks[-1]) and masks[-1].shape[-2:] == (3, P + 8)
            assert isinstance(masks[0], CausalBias) if path == "fast" else dense(masks[0])  # the 5-token prefill
    torch.testing.assert_close(outs["fast"], outs["explicit"], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs["fast"], full[:, 5:], rtol=0, atol=1e-5)


def test_generate_agrees_with_the_explicit_path():
    peft = get_peft_model(BUILDERS["llama"](), config("prefix_proj", "llama", random=True))
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with prefix_mask_path("explicit"):
        ref = peft.generate(input_ids=ids, **kw)
    out = peft.generate(input_ids=ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=0, atol=1e-5)


def test_prefix_mask_path_refuses_unknown_names():
    with pytest.raises(ValueError, match="'fast', 'explicit'"), prefix_mask_path("dense"):
        pass


# The MLP reparameterization: once per forward pass -------------------------------------------------------------
def _delta(peft):
    return next(m for n, m in peft.named_modules() if type(m).__name__ == "PrefixDelta")


def _count_mlp_calls(delta):
    calls = []
    return calls, delta.transform[0].register_forward_hook(lambda *a: calls.append(1))


MLP_METHODS = {"prefix_proj": {}, "mam": {}, "multi_head_parallel": {},
               "p_tuning_v2": {"reparameterization": True, "encoder_hidden_size": 16}}


@pytest.mark.parametrize("method", sorted(MLP_METHODS))
def test_mlp_reparameterization_runs_once_per_forward(method):
    peft = get_peft_model(BUILDERS["llama"](), config(method, "llama", random=True, **MLP_METHODS[method]))
    delta, batch = _delta(peft), batch_for("llama")
    assert delta.L == 2
    calls, hook = _count_mlp_calls(delta)
    cached = run(peft, batch, "fast")
    assert len(calls) == 1  # not once per layer (L = 2)
    run(peft, batch, "fast")
    assert len(calls) == 2  # invalidated at every forward
    copy.deepcopy(peft)  # the pass table (part of a graph) is not copied
    # reference: each layer computes its own slice (no pass begins)
    begin = type(delta).begin_pass
    type(delta).begin_pass = lambda self, cache: begin(self, cache=False)
    try:
        calls.clear()
        per_layer = run(peft, batch, "fast")
    finally:
        type(delta).begin_pass = begin
        hook.remove()
    assert len(calls) == 2
    assert_same(cached, per_layer)


def test_pass_table_is_not_reused_after_the_parameters_change():
    peft = get_peft_model(BUILDERS["llama"](), config("prefix_proj", "llama", random=True))
    delta = _delta(peft)
    out = peft(**batch_for("llama"))  # with autograd: the table stays until backward (for a checkpoint recompute)
    with torch.no_grad():
        old = delta(1, 1, torch.float32)
        assert delta._pass.entry is not None
        delta.embedding.add_(1.0)  # as an optimizer step would, outside any forward
        new = delta(1, 1, torch.float32)
        delta._pass.entry = None
        fresh = delta(1, 1, torch.float32)  # outside a pass: computed per site
    assert not torch.allclose(old[0], new[0])
    torch.testing.assert_close(new[0], fresh[0], rtol=0, atol=0)
    torch.testing.assert_close(new[1], fresh[1], rtol=0, atol=0)
    del out


@pytest.mark.parametrize("reentrant", (True, False))
def test_mlp_pass_table_under_gradient_checkpointing(reentrant):
    """Checkpointed layers recompute in backward, after the pass: the gradients must equal the plain forward's, through
    transformers' flag (no pass table) and through torch's non-reentrant checkpoint around each layer (the
    recompute slices the pass table)."""
    peft = get_peft_model(BUILDERS["llama"](), config("prefix_proj", "llama", random=True))
    batch = {**batch_for("llama"), "skip_logits": False}  # training mode computes the loss in chunks otherwise
    peft.train()
    plain = run(peft, batch, "fast")
    peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        peft.enable_input_require_grads()
    checkpointed = run(peft, batch, "fast")
    assert_same(checkpointed, plain)


def test_mlp_pass_table_under_a_non_reentrant_checkpoint_wrapper():
    """Activation checkpointing applied outside transformers (as FSDP's checkpoint_wrapper does): the pass table,
    made before any layer, is sliced by the forward and by the recompute alike."""
    from torch.utils.checkpoint import checkpoint

    peft = get_peft_model(BUILDERS["llama"](), config("prefix_proj", "llama", random=True))
    batch = {**batch_for("llama"), "skip_logits": False, "use_cache": False}  # a recompute must not grow a cache
    peft.train()
    plain = run(peft, batch, "fast")
    calls, hook = _count_mlp_calls(_delta(peft))
    layers = [m for n, m in peft.named_modules() if type(m).__name__ == "LlamaDecoderLayer"]
    saved = [layer.forward for layer in layers]
    for layer, fwd in zip(layers, saved):
        layer.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    try:
        wrapped = run(peft, batch, "fast")
    finally:
        for layer, fwd in zip(layers, saved):
            layer.forward = fwd
        hook.remove()
    assert len(calls) == 1
    assert_same(wrapped, plain)


def _backbone_direct(peft, batch):
    """The decoder stack called without the model root (as generate() calls an encoder): no pass begins."""
    with torch.no_grad():
        return peft.base_model.model.model(input_ids=batch["input_ids"]).last_hidden_state


def test_pass_table_is_not_reused_after_a_step_that_bumps_no_version():
    """DeepSpeed ZeRO-3's optimizer step writes the parameters' partitions, not the parameters, so their version
    counters do not move (checked with deepspeed 0.19.8, one CPU process: value changed, _version unchanged); the
    same holds for any update through `.data`. A backbone-direct call after such a step must not slice the last
    pass's table: the table is dropped once backward has passed through it."""
    peft = get_peft_model(BUILDERS["llama"](), config("prefix_proj", "llama", random=True))
    delta, batch = _delta(peft), {**batch_for("llama"), "skip_logits": False}
    peft.train()
    peft(**batch).loss.backward()
    with torch.no_grad():
        for p in (delta.embedding, *delta.transform.parameters()):
            p.data.add_(0.5)  # as ZeRO-3's step: the value changes, p._version does not
    got = _backbone_direct(peft, batch)
    delta._pass.entry = None
    want = _backbone_direct(peft, batch)  # per site, from the current parameters
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_no_grad_pass_table_ends_with_its_forward():
    """A forward without autograd has no recompute to serve: its table is gone when the forward returns, so a
    later change that bumps no version (ZeRO-3, `.data`) cannot meet it."""
    peft = get_peft_model(BUILDERS["llama"](), config("prefix_proj", "llama", random=True))
    delta, batch = _delta(peft), batch_for("llama")
    peft.eval()
    with torch.no_grad():
        peft(**batch)
        assert delta._pass.entry is None
        delta.embedding.data.add_(0.5)
    got = _backbone_direct(peft, batch)
    delta._pass.entry = None
    torch.testing.assert_close(got, _backbone_direct(peft, batch), rtol=0, atol=1e-6)


def test_pass_table_is_dropped_when_its_forward_raises():
    peft = get_peft_model(BUILDERS["llama"](), config("prefix_proj", "llama", random=True))
    delta = _delta(peft)
    with torch.no_grad(), pytest.raises(Exception):
        peft(input_ids=torch.full((1, 3), 10 ** 6))  # out of the vocabulary: the embedding raises after the table
    assert delta._pass.entry is None

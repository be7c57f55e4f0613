"""Every preset against its paper (issue 14 item 5): each test writes the method's formula out by hand, applied
to a plain copy of the base model through torch hooks on the model's own modules (no unipeft code computes the
expected value; the adapter's parameters are read from it as inputs), in fp64 on tiny models, 1e-6.

    multi-head PA   head_i += ReLU(q_i P_k^(i)ᵀ/√d) P_v^(i) before o_proj        He et al. 2022 §3.3
    Houlsby         h += Δ(h) after the attention output projection and after the FFN, before Add & Norm;
                    layer norms train too                                           Houlsby et al. 2019 §2.1
    Pfeiffer        FFN only: N(z + Δ(N z)), z = x + f(x)                           Pfeiffer et al. 2021 §3
    (scaled) PA     FFN: f(x) + s·Δ(x), s = 1 / 4                                   He et al. 2022 §3.3, §4.4
    prefix tuning   K, V ← [P_k; K], [P_v; V], P = MLP(E) (tanh)                     Li & Liang 2021 §4.3
    P-tuning v1     inputs ← [MLP(biLSTM(E)); x]                                     Liu et al. 2021 §3.2
    P-tuning v2     flat P_k, P_v at every layer                                     Liu et al. 2022 §3
    IA3             l_k ⊙ K, l_v ⊙ V, W_2 (l_ff ⊙ γ(W_1 x))                           Liu et al. 2022 §3.3
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import BUILDERS, TASKS, assert_padding_invariant

import unipeft
from unipeft import AdapterConfig, MultiHeadParallelConfig, get_peft_model

ATOL = dict(rtol=0, atol=1e-6)
VOCAB_LOW = 3


def fp64(arch, **kw):
    return BUILDERS[arch](**kw).double()


def right_padded(seed=0, B=3, T=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB_LOW, 100, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    mask[2, -3:] = 0
    return ids, mask


def sites(peft):
    return peft.handle.sites


def rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


def kv_block(table, layer, P, H, d):
    """Layer `layer`'s prefix keys and values, each (H_kv, P, d), from a table in HF PEFT's column layout
    (block l of width 2·H_kv·d = [keys | values], head-major)."""
    block = table[:, layer * 2 * H * d:(layer + 1) * 2 * H * d].reshape(P, 2, H, d)
    return block[:, 0].transpose(0, 1), block[:, 1].transpose(0, 1)


def mlp_table(delta):
    """Li & Liang's reparameterization written out: P = W_2 tanh(W_1 E + b_1) + b_2."""
    l1, l2 = delta.transform[0], delta.transform[2]
    return torch.tanh(delta.embedding @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias


# ------------------------------------------------------------------ multi-head parallel adapter

def _mh_pa_reference(ref, arch, table, P, s=1.0):
    """Hooks on a plain model: capture each attention's input; add Δhead before its output projection."""
    cfg = ref.config
    H = cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", None) or H
    d = cfg.hidden_size // H
    if arch == "llama":
        attns = [(layer.self_attn, layer.self_attn, layer.self_attn.o_proj) for layer in ref.model.layers]
    else:
        attns = [(layer.attention.self, layer.attention.self, layer.attention.output.dense)
                 for layer in ref.bert.encoder.layer]
    for i, (attn, qmod, out_proj) in enumerate(attns):
        seen = {}

        def grab(m, args, kwargs, seen=seen):
            seen["x"] = args[0] if args else kwargs["hidden_states"]
            seen["rope"] = kwargs.get("position_embeddings")

        def add(m, args, seen=seen, i=i, qmod=qmod):
            x = seen["x"]
            B, T = x.shape[:2]
            q = (qmod.q_proj if arch == "llama" else qmod.query)(x).view(B, T, H, d).transpose(1, 2)
            if seen["rope"] is not None:  # Llama: q is rotated before it meets any key
                cos, sin = seen["rope"]
                q = q * cos[:, None] + rotate_half(q) * sin[:, None]
            pk, pv = kv_block(table, i, P, H_kv, d)
            pk, pv = pk.repeat_interleave(H // H_kv, 0), pv.repeat_interleave(H // H_kv, 0)  # head i: group i//g
            delta = torch.relu(q @ pk.transpose(-1, -2) / math.sqrt(d)) @ pv  # (B, H, T, d)
            return (args[0] + s * delta.transpose(1, 2).reshape(B, T, H * d),)

        attn.register_forward_pre_hook(grab, with_kwargs=True)
        out_proj.register_forward_pre_hook(add)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,projection", [("llama", True), ("llama", False), ("bert", True)])
def test_mh_pa_is_relu_prefix_attention_added_per_head_before_the_output_projection(arch, projection, impl):
    base = fp64(arch, attn_implementation=impl)
    ref = copy.deepcopy(base)
    P, s = 5, 2.0
    peft = get_peft_model(base, MultiHeadParallelConfig(task_type=TASKS[arch], bottleneck_size=P, init="random",
                                                        prefix_projection=projection, encoder_hidden_size=16,
                                                        scaling=s))
    delta = sites(peft)[0].delta
    with torch.no_grad():
        table = mlp_table(delta) if projection else delta.table.clone()
        if arch == "bert":  # the trained head copy
            ref.classifier.load_state_dict(peft.base_model.model.classifier.modules_to_save["default"].state_dict())
    _mh_pa_reference(ref, arch, table, P, s)
    ids, mask = right_padded()
    with torch.no_grad():
        got = peft(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
        untouched = copy.deepcopy(peft)
        with untouched.disable_adapter():
            off = untouched(input_ids=ids, attention_mask=mask).logits
    assert (got - off).abs().max() > 1e-3  # the term is not vacuous
    torch.testing.assert_close(got, want, **ATOL)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,side", [("llama", "right"), ("llama", "left"), ("bert", "right")])
def test_mh_pa_padding_does_not_change_a_row(arch, side, impl):
    """The ReLU term of a query reads that query and the prefix only; prefix rows are never masked. (fp32: the
    base model itself gives NaN rows for left padding in fp64 eager attention, finfo.min overflowing.)"""
    peft = get_peft_model(BUILDERS[arch](attn_implementation=impl),
                          MultiHeadParallelConfig(task_type=TASKS[arch], bottleneck_size=4, init="random"))
    assert_padding_invariant(peft, arch, side)


def test_mh_pa_starts_as_the_base_and_trains_its_keys_after_its_values():
    base = fp64("llama")
    ref = copy.deepcopy(base)
    peft = get_peft_model(base, MultiHeadParallelConfig(bottleneck_size=4))
    ids, mask = right_padded()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    peft(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_mh_pa_is_the_prefix_point_with_relu_and_add():
    model = fp64("llama")
    cfg = MultiHeadParallelConfig(bottleneck_size=4)
    arch = unipeft.arch.find_arch(model)
    (ins,) = cfg.resolved(model, arch).insertions(model, arch)
    assert ins.describe() == "Prefix(relu) @ AtAttentionKV · parallel · add"
    assert type(ins.position).__name__ == "AtAttentionKV" and not ins.position.position_shift


@pytest.mark.parametrize("normalization,compose,shift,match", [
    ("relu", "gate", False, "label only"), ("softmax", "multiply", False, "label only"),
    ("relu", "add", True, "position_shift")])
def test_prefix_points_that_mean_nothing_are_refused(normalization, compose, shift, match):
    from unipeft import AtAttentionKV, Compose, Form, Insertion, Prefix, inject

    model = fp64("llama")
    ins = Insertion(delta=Prefix(length=3, normalization=normalization), position=AtAttentionKV(position_shift=shift),
                    form=Form.PARALLEL, compose=Compose(compose), name="p")
    with pytest.raises(ValueError, match=match):
        inject(model, (ins,))


def test_prefix_with_softmax_added_is_the_prefix_normalized_alone():
    """(softmax, add): head_i += softmax(q_i P_kᵀ/√d) P_v — He et al.'s ungated prefix, written out."""
    from unipeft import AtAttentionKV, Compose, Form, Insertion, Prefix, inject

    base = fp64("llama")
    ref = copy.deepcopy(base)
    P = 3
    handle = inject(base, (Insertion(delta=Prefix(length=P), position=AtAttentionKV(), form=Form.PARALLEL,
                                     compose=Compose.ADD, name="p"),))
    table = handle.sites[0].delta.table.detach()
    H, H_kv, d = 4, 2, 8
    for i, layer in enumerate(ref.model.layers):
        seen = {}
        layer.self_attn.register_forward_pre_hook(lambda m, a, kw, seen=seen: seen.update(kw), with_kwargs=True)

        def add(m, args, seen=seen, i=i, attn=layer.self_attn):
            x = seen["hidden_states"]
            B, T = x.shape[:2]
            q = attn.q_proj(x).view(B, T, H, d).transpose(1, 2)
            cos, sin = seen["position_embeddings"]
            q = q * cos[:, None] + rotate_half(q) * sin[:, None]
            pk, pv = (t.repeat_interleave(H // H_kv, 0) for t in kv_block(table, i, P, H_kv, d))
            w = torch.softmax(q @ pk.transpose(-1, -2) / math.sqrt(d), -1)
            return (args[0] + (w @ pv).transpose(1, 2).reshape(B, T, H * d),)

        layer.self_attn.o_proj.register_forward_pre_hook(add)
    ids, mask = right_padded()
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids, attention_mask=mask).logits,
                                   ref(input_ids=ids, attention_mask=mask).logits, **ATOL)


def test_the_old_block_diagonal_option_is_refused_by_name():
    with pytest.raises(ValueError, match="MultiHeadParallelConfig"):
        AdapterConfig(bottleneck_size=8, heads=4)


# ------------------------------------------------------------------ bottleneck adapters

def _bottleneck(delta, act):
    """Δ(x) = W_up f(W_down x + b_down) + b_up, from the adapter's weights."""
    down, up = delta.down[0], delta.up[0]
    db, ub = delta.down_bias[0], delta.up_bias
    return lambda x: act(x @ down.T + db) @ up.T + ub


LAYOUT = {  # (attention output projection, FFN input module, FFN output module) per block, as in each paper
    "bert": lambda b: (b.attention.output.dense, b.intermediate, b.output.dense),
    "llama": lambda b: (b.self_attn.o_proj, b.mlp, b.mlp),
}


def _blocks(model, arch):
    return model.bert.encoder.layer if arch == "bert" else model.model.layers


def _build(arch, cfg):
    base = fp64(arch)
    ref = copy.deepcopy(base)
    peft = get_peft_model(base, cfg)
    if arch == "bert":
        with torch.no_grad():
            ref.classifier.load_state_dict(peft.base_model.model.classifier.modules_to_save["default"].state_dict())
    return peft, ref


def _compare(peft, ref):
    ids, mask = right_padded()
    with torch.no_grad():
        got, want = peft(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, **ATOL)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_houlsby_adapts_after_the_attention_projection_and_after_the_ffn_before_add_and_norm(arch):
    peft, ref = _build(arch, AdapterConfig.houlsby(task_type=TASKS[arch], bottleneck_size=6, init="random"))
    attn_sites = [s for s in sites(peft) if s.host_name.endswith(("attention.output.dense", "o_proj"))]
    ffn_sites = [s for s in sites(peft) if s not in attn_sites]
    assert len(attn_sites) == len(ffn_sites) == 2
    with torch.no_grad():  # the layer norms train (a copy each): move them so the check can fail
        for c in peft.handle.copies:
            if "Norm" in type(c.original).__name__:
                for p, q in zip(c.copy.parameters(), ref.get_submodule(c.name).parameters()):
                    p.add_(0.1 * torch.randn_like(p))
                    q.copy_(p)
    for blk, sa, sf in zip(_blocks(ref, arch), attn_sites, ffn_sites):
        attn_out, _, ffn_out = LAYOUT[arch](blk)
        fa, ff = _bottleneck(sa.delta, torch.nn.functional.silu), _bottleneck(sf.delta, torch.nn.functional.silu)
        attn_out.register_forward_hook(lambda m, a, h, f=fa: h + f(h))  # then dropout, Add & Norm (BERT)
        ffn_out.register_forward_hook(lambda m, a, h, f=ff: h + f(h))
    _compare(peft, ref)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_houlsby_trains_the_layer_norms_and_unload_restores_them(arch, tmp_path):
    base = fp64(arch)
    ref = copy.deepcopy(base)
    peft = get_peft_model(base, AdapterConfig.houlsby(task_type=TASKS[arch], bottleneck_size=6))
    norms = {n for n, m in ref.named_modules() if "Norm" in type(m).__name__ and ".layer" in n}
    trained = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert len(norms) == 4  # two per block
    for n in norms:
        assert f"base_model.model.{n}.modules_to_save.default.weight" in trained, n
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if p.requires_grad and ("Norm" in n or "layernorm" in n):
                p.add_(0.1)
    peft.save_pretrained(tmp_path)
    loaded = unipeft.PeftModel.from_pretrained(fp64(arch), tmp_path)
    ids, mask = right_padded()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   peft(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    model = peft.unload()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert not AdapterConfig.pfeiffer().train_layer_norms  # AdapterFusion's adapter trains the adapter only


def test_pfeiffer_is_ffn_only_reading_the_add_and_norm_output():
    """BERT (post-norm): the FFN's Add & Norm N(z) becomes N(z + Δ(N z)); no adapter at attention."""
    peft, ref = _build("bert", AdapterConfig.pfeiffer(task_type="SEQ_CLS", bottleneck_size=6, init="random"))
    assert [s.host_name.split(".", 4)[-1] for s in sites(peft)] == ["output.dense"] * 2  # the FFN's, per block
    for blk, site in zip(_blocks(ref, "bert"), sites(peft)):
        f, norm = _bottleneck(site.delta, torch.relu), blk.output.LayerNorm
        norm.register_forward_pre_hook(lambda m, a, f=f: (a[0] + f(m.forward(a[0])),))
    _compare(peft, ref)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("preset,s", [("parallel", 1.0), ("scaled_parallel", 4.0)])
def test_parallel_adapters_read_the_ffn_input_and_add_s_times_delta_to_its_output(arch, preset, s):
    peft, ref = _build(arch, getattr(AdapterConfig, preset)(task_type=TASKS[arch], bottleneck_size=6, init="random"))
    assert len(sites(peft)) == 2
    for blk, site in zip(_blocks(ref, arch), sites(peft)):
        _, ffn_in, ffn_out = LAYOUT[arch](blk)
        f, seen = _bottleneck(site.delta, torch.relu), {}
        ffn_in.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(x=a[0]))
        ffn_out.register_forward_hook(lambda m, a, h, f=f, seen=seen: h + s * f(seen["x"]))
    _compare(peft, ref)


# ------------------------------------------------------------------ prefix family

def _cache(table, L, P, H, d, B):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(L):
        pk, pv = kv_block(table, i, P, H, d)
        cache.update(pk[None].expand(B, -1, -1, -1), pv[None].expand(B, -1, -1, -1), i)
    return cache


def test_prefix_tuning_mlp_reparameterization_is_a_kv_cache_of_mlp_outputs():
    """Li & Liang: P = MLP(E) (tanh), prepended to every layer's keys and values; HF PEFT's positions (the prefix
    occupies 0..P-1 as cached tokens, never rotated). Reference: the model's own cache fed the hand-made MLP output."""
    base = fp64("llama")
    ref = copy.deepcopy(base)
    P = 4
    peft = get_peft_model(base, unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                           prefix_projection=True, encoder_hidden_size=16))
    delta = sites(peft)[0].delta
    ids, mask = right_padded()
    with torch.no_grad():
        cache = _cache(mlp_table(delta), 2, P, 2, 8, ids.shape[0])
        want = ref(input_ids=ids, attention_mask=torch.cat([torch.ones(3, P, dtype=mask.dtype), mask], 1),
                   past_key_values=cache).logits
        got = peft(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, **ATOL)


def test_p_tuning_v2_is_a_flat_prefix_at_every_layer_with_real_tokens_at_their_own_positions():
    base = fp64("llama")
    ref = copy.deepcopy(base)
    P = 3
    peft = get_peft_model(base, unipeft.PTuningV2Config(task_type="CAUSAL_LM", num_virtual_tokens=P))
    assert len(sites(peft)) == 2 and not hasattr(sites(peft)[0].delta, "transform")
    ids, mask = right_padded()
    with torch.no_grad():
        cache = _cache(sites(peft)[0].delta.table, 2, P, 2, 8, ids.shape[0])
        want = ref(input_ids=ids, attention_mask=torch.cat([torch.ones(3, P, dtype=mask.dtype), mask], 1),
                   past_key_values=cache, position_ids=torch.arange(ids.shape[1])[None]).logits
        got = peft(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, **ATOL)


def test_p_tuning_v1_prompts_are_an_mlp_over_a_bidirectional_lstm():
    """Liu et al. 2021: h_i = MLP([→h_i ; ←h_i]) over the P prompt embeddings (bi-LSTM, ReLU MLP), prepended."""
    base = fp64("llama")
    ref = copy.deepcopy(base)
    P = 4
    peft = get_peft_model(base, unipeft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                            encoder_reparameterization_type="LSTM",
                                                            encoder_hidden_size=8))
    delta = sites(peft)[0].delta
    lstm, (l1, _, l2) = delta.lstm, delta.mlp
    assert lstm.bidirectional and lstm.hidden_size == 8
    ids, mask = right_padded()
    with torch.no_grad():
        # the bi-LSTM by hand: two layers, each the forward and the reversed pass concatenated
        x = delta.embedding
        for layer in range(lstm.num_layers):
            outs = []
            for sfx, rev in (("", False), ("_reverse", True)):
                w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}{sfx}"), getattr(lstm, f"weight_hh_l{layer}{sfx}")
                b = getattr(lstm, f"bias_ih_l{layer}{sfx}") + getattr(lstm, f"bias_hh_l{layer}{sfx}")
                h = c = torch.zeros(8, dtype=x.dtype)
                seq = []
                for t in (reversed(range(P)) if rev else range(P)):
                    i, f, g, o = (x[t] @ w_ih.T + h @ w_hh.T + b).chunk(4)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    seq.append(h)
                outs.append(torch.stack(seq[::-1] if rev else seq))
            x = torch.cat(outs, -1)
        prompts = torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias  # (P, d)
        emb = ref.get_input_embeddings()(ids)
        embeds = torch.cat([prompts[None].expand(ids.shape[0], -1, -1), emb], 1)
        want = ref(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(3, P, dtype=mask.dtype), mask], 1)).logits
        got = peft(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, **ATOL)


# ------------------------------------------------------------------ IA3

# The paper's IA3: l_k, l_v and l_ff on the FFN's inner activation. Llama's default targets are exactly these. On
# BERT-family models HF PEFT's default feed-forward name "output.dense" also matches attention.output.dense (a
# suffix match), so its default (and ours, a drop-in) scales the attention context too: a 4th vector per layer.
# The paper's three are the explicit regexes below; the default's extra site is checked as what it is.
PAPER_IA3 = {"llama": {},
             "bert": dict(target_modules=r".*\.(key|value)|.*layer\.\d+\.output\.dense",
                          feedforward_modules=r".*layer\.\d+\.output\.dense")}


@pytest.mark.parametrize("arch,paper", [("llama", True), ("bert", True), ("bert", False)])
def test_ia3_scales_keys_values_and_the_ffn_inner_activation(arch, paper):
    opts = PAPER_IA3[arch] if paper else {}
    peft, ref = _build(arch, unipeft.IA3Config(task_type=TASKS[arch], init_ia3_weights=False, **opts))
    by_host = {s.host_name: s.delta.l.flatten() for s in sites(peft)}
    ffn = {"llama": "mlp.down_proj", "bert": "output.dense"}[arch]
    hit = 0
    for name, m in ref.named_modules():
        if name not in by_host:
            continue
        hit += 1
        if name.endswith(ffn):  # the FFN's second linear reads l_ff ⊙ γ(W_1 x) (BERT default: also attention's)
            m.register_forward_pre_hook(lambda mod, a, l=by_host[name]: (a[0] * l,))
        else:  # keys and values
            assert name.endswith(("k_proj", "v_proj", "key", "value")), name
            m.register_forward_hook(lambda mod, a, out, l=by_host[name]: out * l)
    assert hit == (6 if paper else 8)
    assert paper or sum("attention.output.dense" in n for n in by_host) == 2
    _compare(peft, ref)

"""LoRA as LoRA users use it, with HF PEFT as the oracle: DoRA, PiSSA/OLoRA/Gaussian inits, rank/alpha
patterns, layers_pattern, and LoraConfig's strictness about HF fields we do not implement.

Parity checks reuse test_hf_parity's round trips: every trainable tensor is perturbed off its init, the adapted
logits must differ from the base's, HF must load our file (and write back the same tensors under the same keys)
and we must load HF's, with logits equal to 1e-5, merged too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of
from test_hf_parity import close, hf_to_ours, ours_to_hf, perturb, saved

import unipeft

hf = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
              pytest.mark.filterwarnings("ignore:Careful, disabling adapter layers:UserWarning"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
              pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning")]

ARCHS = ["llama", "gpt2", "bert"]


# ---------------------------------------------------------------- DoRA

@pytest.mark.parametrize("arch", ARCHS)
def test_dora_ours_loads_in_hf(arch, tmp_path):
    ours_to_hf(arch, "LORA", tmp_path, use_dora=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_hf_loads_in_ours(arch, tmp_path):
    hf_to_ours(arch, "LORA", tmp_path, use_dora=True)


def _grads(model, arch) -> dict[str, torch.Tensor]:
    """Gradients of the adapter tensors by their HF file key (`lora_A.default.weight` -> `lora_A.weight`)."""
    model.train()
    model.zero_grad()
    b = batch_for(arch)
    model(**b).loss.backward()
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None and "lora" in n:
            out[n] = p.grad.detach().clone()
    model.eval()
    return out


def test_dora_gradients_match_hf(tmp_path):
    """The norm is a constant for autograd in both (DoRA §4.3): gradients of A, B and m agree."""
    theirs = hf.get_peft_model(BUILDERS["llama"](), hf.LoraConfig(r=4, lora_alpha=12, use_dora=True,
                                                                  init_lora_weights=False,
                                                                  target_modules=["q_proj", "v_proj"]))
    perturb(theirs, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path, is_trainable=True)
    g_hf, g_ours = _grads(theirs, "llama"), _grads(ours, "llama")
    host = "model.layers.1.self_attn.v_proj"
    pairs = {k: k for k in ("lora_A.default.weight", "lora_B.default.weight",
                            "lora_magnitude_vector.default.weight")}  # HF's module layout on both sides
    for hk, ok in pairs.items():
        a = g_hf[f"base_model.model.{host}.{hk}"]
        b = dict(ours.named_parameters())[f"base_model.model.{host}.{ok}"].grad
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=hk)


def test_dora_magnitude_starts_at_the_norm_and_merge_roundtrips():
    model = BUILDERS["gpt2"]()
    W = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (in, out)
    peft = unipeft.get_peft_model(model, unipeft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                            target_modules=["c_attn"]))
    delta = model.transformer.h[0].attn.c_attn.lora.default
    torch.testing.assert_close(delta.m.detach(), torch.linalg.norm(W.t(), dim=1), atol=1e-6, rtol=0)
    perturb(peft, seed=4)
    y = logits_of(peft, batch_for("gpt2"))
    peft.merge_adapter()
    close(logits_of(peft, batch_for("gpt2")), y, atol=1e-4)
    peft.unmerge_adapter()
    close(model.transformer.h[0].attn.c_attn.weight.detach(), W, atol=1e-5)  # W/g − s·BA: fp32 rounding
    close(logits_of(peft, batch_for("gpt2")), y)


def test_dora_on_a_quantized_layer_is_refused():
    class Int8Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 4, 4
            self.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    model = torch.nn.Sequential(Int8Linear())
    with pytest.raises(ValueError, match="DoRA on a quantized layer"):
        unipeft.get_peft_model(model, unipeft.LoraConfig(use_dora=True, target_modules=["0"]))


# ---------------------------------------------------------------- PiSSA / OLoRA / Gaussian

def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _adapter_and_base(init, arch, targets, **kw):
    """(our PeftModel, HF PeftModel) made with the same init on identical fresh bases."""
    args = dict(r=4, lora_alpha=12, init_lora_weights=init, target_modules=targets, **kw)
    ours = unipeft.get_peft_model(BUILDERS[arch](), unipeft.LoraConfig(**args))
    theirs = hf.get_peft_model(BUILDERS[arch](), hf.LoraConfig(**args))
    return ours, theirs


@pytest.mark.parametrize("init,arch,targets,kw", [
    ("pissa", "llama", ["q_proj", "v_proj", "down_proj"], {}),
    ("olora", "llama", ["q_proj", "v_proj", "down_proj"], {}),
    ("pissa", "gpt2", ["c_attn", "c_proj"], dict(fan_in_fan_out=True)),  # Conv1D: factors of the (out, in) view
    ("pissa", "bert", ["query", "value"], {}),
    ("pissa", "llama", ["q_proj", "v_proj"], dict(use_rslora=True)),
    ("pissa", "llama", ["q_proj", "v_proj"], dict(use_dora=True)),
])
def test_base_changing_inits_match_hf(init, arch, targets, kw, tmp_path):
    """Same residual base and the same factors as HF PEFT (1e-5); the file round-trips both ways."""
    original = _weights(BUILDERS[arch]())
    ours, theirs = _adapter_and_base(init, arch, targets, **kw)
    ours_w = _weights(ours.get_base_model())
    hf_w = {n.replace(".base_layer", ""): p for n, p in _weights(theirs.get_base_model()).items()}
    changed = 0
    for n, w in original.items():
        if n in ours_w:  # base weights: HF's residual, to 1e-5
            close(ours_w[n], hf_w[n])
            changed += not torch.equal(ours_w[n], w)
    assert changed == len(ours.handle.sites), "every adapted weight holds a residual"
    a, b = ours.adapter_state_dict(), {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    for k, v in a.items():
        hk = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        hk = hk.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
        close(v, b[hk])
    y0 = logits_of(BUILDERS[arch](), batch_for(arch))
    close(logits_of(ours, batch_for(arch)), y0)  # residual + s·BA is the base again

    # trained, saved normally (init_lora_weights stays in the config): loading on the ORIGINAL base re-runs the
    # init, as HF PEFT does, so both libraries rebuild the residual and give the trained outputs
    perturb(ours, seed=5)
    y = logits_of(ours, batch_for(arch))
    assert (y - y0).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    close(logits_of(hf.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours"), batch_for(arch)), y)
    close(logits_of(unipeft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours"), batch_for(arch)), y)
    perturb(theirs, seed=6)
    theirs.save_pretrained(tmp_path / "hf")
    close(logits_of(unipeft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "hf"), batch_for(arch)),
          logits_of(theirs, batch_for(arch)))

    # unload gives back the original base bit-exactly; merge_and_unload keeps residual + trained delta
    merged = unipeft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours").merge_and_unload()
    close(logits_of(merged, batch_for(arch)), y, atol=1e-4)
    restored = _weights(ours.unload())
    for n, w in original.items():
        assert torch.equal(restored[n], w), n


def test_pissa_niter_reconstructs_the_weight():
    """Randomized SVD (seed-dependent, and HF draws other random numbers before it, so not compared to HF tensor
    by tensor): residual + s·BA = W, s·BA has rank r near the top singular values, a fixed seed repeats."""
    W = BUILDERS["llama"]().model.layers[0].self_attn.q_proj.weight.detach().clone()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = BUILDERS["llama"]()
        torch.manual_seed(7)
        unipeft.get_peft_model(model, unipeft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa_niter_4",
                                                         target_modules=["q_proj"]))
        q = model.model.layers[0].self_attn.q_proj
        runs.append((q.weight.detach().clone(), q.lora.default.A.detach().clone(), q.lora.default.B.detach().clone()))
    (Wr, A, B), (Wr2, A2, B2) = runs
    close(Wr + 2.0 * B @ A, W)
    assert torch.equal(A, A2) and torch.equal(Wr, Wr2)
    sv, top = torch.linalg.svdvals(2.0 * B @ A), torch.linalg.svdvals(W)[:4]
    assert (sv[4:] < 1e-5).all()  # rank r
    torch.testing.assert_close(sv[:4], top, rtol=0.1, atol=0)  # randomized, flat spectrum: near the top singular values


def test_gaussian_init():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 8))
    unipeft.get_peft_model(model, unipeft.LoraConfig(r=4, init_lora_weights="gaussian", target_modules=["0"]))
    A, B = model[0].lora.default.A.detach(), model[0].lora.default.B.detach()
    assert torch.equal(B, torch.zeros_like(B))
    assert abs(A.std().item() - 1 / 4) < 0.01 and abs(A.mean().item()) < 0.015  # HF: A ~ N(0, 1/r)


def test_olora_on_conv1d_is_refused_and_nothing_changes():
    model = BUILDERS["gpt2"]()
    before = _weights(model)
    with pytest.raises(ValueError, match="OLoRA on such layers is not supported"):
        unipeft.get_peft_model(model, unipeft.LoraConfig(init_lora_weights="olora", target_modules=["c_attn"]))
    after = _weights(model)
    assert sorted(after) == sorted(before) and all(torch.equal(after[n], before[n]) for n in before)


def test_failed_injection_restores_residual_bases():
    """A PiSSA insertion that fails on a later module leaves no residual in the earlier ones."""
    model = BUILDERS["llama"]()
    before = _weights(model)
    with pytest.raises(ValueError, match="r <= min"):  # q_proj 32x32 fine, k_proj 16 outputs < r=20
        unipeft.get_peft_model(model, unipeft.LoraConfig(r=20, init_lora_weights="pissa",
                                                         target_modules=["q_proj", "k_proj"]))
    after = _weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert not any("lora" in n for n in after)


# ---------------------------------------------------------------- rank / alpha patterns, layers_pattern

PATTERNS = [
    pytest.param("llama", dict(rank_pattern={"q_proj": 2, r"model.layers.1.self_attn.v_proj": 6},
                               alpha_pattern={"v_proj": 3}), id="llama-suffix-and-full-name"),
    pytest.param("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"],
                               rank_pattern={r"layers\.0\.self_attn\.(q|v)_proj": 3, "up_proj": 5},
                               alpha_pattern={r".*\.1\..*": 20}), id="llama-regex"),
    pytest.param("gpt2", dict(rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"c_attn": 5}), id="gpt2"),
    pytest.param("bert", dict(rank_pattern={"value": 6}, use_dora=True), id="bert-dora"),
    pytest.param("llama", dict(rank_pattern={"q_proj": 2}, use_rslora=True), id="llama-rslora"),
    pytest.param("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                               layers_pattern="layers"), id="llama-layers_pattern"),
    pytest.param("gpt2", dict(layers_to_transform=0, layers_pattern=["h"]), id="gpt2-layers_pattern"),
    pytest.param("bert", dict(layers_to_transform=[1], layers_pattern="layer"), id="bert-layers_pattern"),
]


@pytest.mark.parametrize("arch,kw", PATTERNS)
def test_patterns_match_hf(arch, kw, tmp_path):
    ours_to_hf(arch, "LORA", tmp_path / "a", **kw)
    hf_to_ours(arch, "LORA", tmp_path / "b", **kw)
    # the same modules with the same shapes as HF PEFT
    from test_hf_parity import configs
    ours_cfg, hf_cfg = configs("LORA", arch, **kw)
    a = unipeft.get_peft_model(BUILDERS[arch](), ours_cfg).adapter_state_dict()
    b = hf.get_peft_model(BUILDERS[arch](), hf_cfg).state_dict()
    b = {k.replace(".default", ""): v for k, v in b.items() if "lora_" in k}
    b = {k.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v for k, v in b.items()}
    assert {k: tuple(v.shape) for k, v in a.items() if "lora_" in k} == {k: tuple(v.shape) for k, v in b.items()}


def test_rank_pattern_sets_shapes_and_scale():
    model = BUILDERS["llama"]()
    unipeft.get_peft_model(model, unipeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     rank_pattern={"q_proj": 2}, alpha_pattern={"layers.1.v_proj": 1}))
    # HF's rule: the key matches a dotted suffix as a regex; "layers.1.v_proj" is not a suffix of a path
    # with "self_attn" in between, so v_proj of layer 1 keeps lora_alpha
    l0, l1 = model.model.layers
    assert l0.self_attn.q_proj.lora.default.A.shape == (2, 32) and l0.self_attn.v_proj.lora.default.A.shape == (4, 32)
    peft_sites = {s.host_name: s.s for s in unipeft.get_peft_model(
        BUILDERS["llama"](), unipeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 2})).handle.sites}
    assert peft_sites["model.layers.0.self_attn.q_proj"] == 8 / 2 and peft_sites["model.layers.1.self_attn.v_proj"] == 2 / 4


def test_layers_pattern_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="layers_pattern.*selects no module"):
        unipeft.get_peft_model(BUILDERS["llama"](), unipeft.LoraConfig(target_modules=["q_proj"],
                                                                       layers_to_transform=[0], layers_pattern="h"))


# ---------------------------------------------------------------- config strictness

def test_every_hf_lora_field_is_accepted_at_its_default():
    """HF's LoraConfig().to_dict() (what its adapter_config.json holds) builds ours, and ours writes back every
    field HF writes, so either library reads the other's file."""
    d = hf.LoraConfig().to_dict()
    ours = unipeft.LoraConfig.from_dict({k: (v.value if hasattr(v, "value") else v) for k, v in d.items()})
    skip = {"peft_type", "auto_mapping", "peft_version"}  # the base PeftConfig's bookkeeping
    missing = sorted(set(d) - set(ours.to_dict()) - skip)
    assert not missing, f"LoraConfig lacks HF fields {missing}"
    for k, v in ours.to_dict().items():
        if k in d and k != "peft_type":
            assert v == d[k] or (v == [] and d[k] is None) or (isinstance(d[k], set) and set(v) == d[k]), k
    for k in ("use_dora", "layers_pattern", "rank_pattern", "alpha_pattern", "lora_bias", "layer_replication",
              "target_parameters", "megatron_config", "trainable_token_indices", "runtime_config"):
        unipeft.LoraConfig(**{k: getattr(hf.LoraConfig(), k) if k != "runtime_config" else None})


@pytest.mark.parametrize("field,value", [
    ("lora_bias", True), ("layer_replication", [[0, 1], [0, 2]]), ("target_parameters", ["mlp.experts.down_proj"]),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("use_qalora", True), ("alora_invocation_tokens", [5]), ("ensure_weight_tying", True),
    ("eva_config", {"rho": 2.0}), ("loftq_config", {"loftq_bits": 4}),
])
def test_non_default_unimplemented_field_is_refused_by_name(field, value, tmp_path):
    with pytest.raises(ValueError, match=rf"{field}=.*not implemented.*leave {field} at its default"):
        unipeft.LoraConfig(**{field: value})
    # and in a file written by HF PEFT
    peft = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.LoraConfig(r=2))
    peft.save_pretrained(tmp_path)
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=rf"{field}="):
        unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)


@pytest.mark.parametrize("init,alternative", [("eva", "pissa"), ("loftq", "unipeft.quant"), ("corda", "pissa"),
                                              ("orthogonal", "olora"), ("pissa_niter_x", "pissa_niter_<n>")])
def test_unimplemented_inits_are_refused_with_an_alternative(init, alternative):
    with pytest.raises(ValueError, match=rf"init_lora_weights.*{alternative}"):
        unipeft.LoraConfig(init_lora_weights=init)


@pytest.mark.parametrize("kw,msg", [
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform cannot be used"),
    (dict(target_modules=".*q_proj", layers_pattern="layers"), "layers_pattern cannot be used"),
    (dict(layers_pattern="layers"), "set layers_to_transform too"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern.*positive integer"),
])
def test_inconsistent_layer_and_pattern_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        unipeft.LoraConfig(**kw)


# ---------------------------------------------------------------- LoRA on embeddings and convs

class ConvNet(torch.nn.Module):
    """Conv1d (k=3, padded) -> Conv2d (3x2 kernel, stride 2) -> Conv2d 1x1 -> linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv1d(3, 6, 3, padding=1)
        self.c2 = torch.nn.Conv2d(6, 8, (3, 2), stride=2)
        self.c3 = torch.nn.Conv2d(8, 4, 1)
        self.head = torch.nn.Linear(4 * 3 * 2, 5)

    def forward(self, x):
        h = self.c1(x).unsqueeze(-1).expand(-1, -1, -1, 4)
        return self.head(self.c3(torch.relu(self.c2(h))).flatten(1))


CONV_X = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))


def _roundtrip(make, run, targets, tmp_path, hf_extra=(), **kw):
    """ours -> HF and HF -> ours for `targets`: same outputs (1e-5), merged too; HF's file has the same keys
    as ours (plus `hf_extra`, HF's copies of base weights)."""
    args = dict(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False, **kw)
    y0 = run(make())
    ours = unipeft.get_peft_model(make(), unipeft.LoraConfig(**args))
    perturb(ours, seed=1)
    y = run(ours)
    assert (y - y0).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    theirs = hf.PeftModel.from_pretrained(make(), tmp_path / "ours")
    close(run(theirs), y)
    theirs.save_pretrained(tmp_path / "resaved")
    a, b = saved(tmp_path / "ours"), saved(tmp_path / "resaved")
    assert sorted(set(b) - set(hf_extra)) == sorted(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    close(run(ours.merge_and_unload()), run(theirs.merge_and_unload()))

    theirs = hf.get_peft_model(make(), hf.LoraConfig(**args))
    perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "hf")
    ours = unipeft.PeftModel.from_pretrained(make(), tmp_path / "hf")
    close(run(ours), run(theirs))
    with ours.disable_adapter():
        close(run(ours), y0, atol=0)
    close(run(ours.merge_and_unload()), run(theirs.merge_and_unload()))


@pytest.mark.parametrize("dora", [False, True])
def test_conv_lora_matches_hf(dora, tmp_path):
    _roundtrip(ConvNet, lambda m: m(CONV_X).detach(), ["c1", "c2", "c3", "head"], tmp_path, use_dora=dora)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("arch,emb", [("llama", "embed_tokens"), ("gpt2", "wte"), ("bert", "word_embeddings")])
def test_embedding_lora_matches_hf(arch, emb, dora, tmp_path):
    other = {"llama": "q_proj", "gpt2": "c_attn", "bert": "query"}[arch]
    prefix = {"llama": "model.", "gpt2": "transformer.", "bert": "bert.embeddings."}[arch]
    _roundtrip(BUILDERS[arch], lambda m: logits_of(m, batch_for(arch)).detach(), [emb, other], tmp_path,
               hf_extra=[f"base_model.model.{prefix}{emb}.base_layer.weight"], use_dora=dora)


def test_embedding_lora_orientation_and_init():
    model = BUILDERS["llama"]()
    unipeft.get_peft_model(model, unipeft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    d = model.model.embed_tokens.lora.default
    assert d.A.shape == (4, 96) and d.B.shape == (32, 4)  # HF: lora_embedding_A (r, vocab), _B (dim, r)
    assert torch.equal(d.A, torch.zeros_like(d.A)) and d.B.abs().sum() > 0  # A = 0, B ~ N(0, 1)


def test_embedding_file_with_a_different_base_copy_is_refused(tmp_path):
    theirs = hf.get_peft_model(BUILDERS["llama"](), hf.LoraConfig(r=2, target_modules=["embed_tokens"]))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embed_tokens.base_layer.weight.*differs"):
        unipeft.PeftModel.from_pretrained(BUILDERS["llama"](seed=1), tmp_path)


@pytest.mark.parametrize("kw,match", [
    (dict(target_modules=["embed_tokens"], use_dora=True, init_lora_weights="olora"), "an embedding takes"),
    (dict(target_modules=["embed_tokens"], init_lora_weights="pissa"), "an embedding takes"),
])
def test_embedding_variants_not_supported_are_refused(kw, match):
    model = BUILDERS["llama"]()
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        unipeft.get_peft_model(model, unipeft.LoraConfig(**kw))
    assert all(torch.equal(p, before[n]) for n, p in _weights(model).items())


def test_ia3_on_a_conv_is_refused():
    with pytest.raises(ValueError, match="Conv2d layers cannot take a ScalingDelta"):
        unipeft.get_peft_model(ConvNet(), unipeft.IA3Config(target_modules=["c2"], feedforward_modules=[]))


def test_all_linear_leaves_embeddings_and_convs_alone():
    peft = unipeft.get_peft_model(ConvNet(), unipeft.LoraConfig(target_modules="all-linear"))
    assert [s.host_name for s in peft.handle.sites] == ["head"]


# ---------------------------------------------------------------- trainable token rows

def _batch_with(arch, ids=(3, 5, 5)):
    b = batch_for(arch)
    b["input_ids"][0, :len(ids)] = torch.tensor(ids)
    return b


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj"]), ("gpt2", ["c_attn"])])  # gpt2: tied wte/lm_head
def test_trainable_tokens_match_hf(arch, targets, tmp_path):
    args = dict(r=2, target_modules=targets, trainable_token_indices=[3, 5])
    b = _batch_with(arch)
    y0 = logits_of(BUILDERS[arch](), b)
    ours = unipeft.get_peft_model(BUILDERS[arch](), unipeft.LoraConfig(**args))  # LoRA B = 0: only the rows act
    perturb(ours, seed=1)
    y = logits_of(ours, b)
    assert (y - y0).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    emb = "model.embed_tokens" if arch == "llama" else "transformer.wte"
    assert f"base_model.model.{emb}.token_adapter.trainable_tokens_delta" in saved(tmp_path / "ours")
    theirs = hf.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "ours")
    close(logits_of(theirs, b), y)
    close(logits_of(ours.merge_and_unload(), b), logits_of(theirs.merge_and_unload(), b))

    theirs = hf.get_peft_model(BUILDERS[arch](), hf.LoraConfig(**args))
    perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "hf")
    ours = unipeft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "hf")
    close(logits_of(ours, b), logits_of(theirs, b))
    with ours.disable_adapter():
        close(logits_of(ours, b), y0, atol=0)
    close(logits_of(ours.merge_and_unload(), b), logits_of(theirs.merge_and_unload(), b))


def test_trainable_tokens_semantics():
    """Chosen ids read the trained rows, the others the frozen table; on a tied head the chosen tokens' logits
    use the trained rows; only the rows get gradients; unload restores the table bit-exactly."""
    model = BUILDERS["gpt2"]()
    W = model.transformer.wte.weight.detach().clone()
    peft = unipeft.get_peft_model(model, unipeft.LoraConfig(target_modules=["c_attn"], trainable_token_indices=[3, 5]))
    rows = model.transformer.wte.token_adapter.default.rows
    torch.testing.assert_close(rows.detach(), W[[3, 5]], atol=0, rtol=0)  # HF's init: a copy of the rows
    with torch.no_grad():
        rows.add_(1.0)
    ids = torch.tensor([[3, 4, 5]])
    e = model.transformer.wte(ids)
    close(e[0], torch.stack([W[3] + 1, W[4], W[5] + 1]))
    hidden = torch.randn(1, 2, 32)
    logits = model.lm_head(hidden)
    close(logits[..., [3, 5]], hidden @ (W[[3, 5]] + 1).t())
    close(logits[..., 4], hidden @ W[4])
    peft.train()
    model(**_batch_with("gpt2")).loss.backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert model.transformer.wte.weight.grad is None
    assert torch.equal(peft.unload().transformer.wte.weight, W)


@pytest.mark.parametrize("kw,match", [
    (dict(target_modules=["q_proj"], trainable_token_indices=[3, 500]), "outside the vocabulary of 96"),
    (dict(target_modules=["q_proj"], trainable_token_indices={"q_proj": [3]}), "not exactly one nn.Embedding"),
    (dict(target_modules=["embed_tokens"], trainable_token_indices=[3]), "already holds a delta"),
])
def test_trainable_tokens_bad_input(kw, match):
    model = BUILDERS["llama"]()
    with pytest.raises(ValueError, match=match):
        unipeft.get_peft_model(model, unipeft.LoraConfig(**kw))
    assert not any("lora" in n or "token_adapter" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("init,kw", [("pissa", {}), ("olora", {}), ("pissa", dict(use_rslora=True)),
                                     ("pissa", dict(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4}))])
def test_pissa_converted_to_lora_runs_on_the_original_base(init, kw, tmp_path):
    """HF's path_initial_model_for_weight_conversion: the trained PiSSA/OLoRA adapter saved as a rank-2r LoRA
    that, on the unchanged base, gives the trained model's outputs, here and in HF PEFT; the same conversion
    done by HF PEFT gives the same file."""
    args = dict(r=4, lora_alpha=12, init_lora_weights=init, target_modules=["q_proj", "v_proj"], **kw)
    b = batch_for("llama")
    ours = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.LoraConfig(**args))
    ours.save_pretrained(tmp_path / "init")
    perturb(ours, seed=7)
    y = logits_of(ours, b)
    ours.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    import json
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] is True
    close(logits_of(unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "lora"), b), y)
    close(logits_of(hf.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "lora"), b), y)

    theirs = hf.get_peft_model(BUILDERS["llama"](), hf.LoraConfig(**args))
    theirs.save_pretrained(tmp_path / "hf_init")
    hf_params = dict(theirs.named_parameters())
    with torch.no_grad():  # HF's adapter gets our trained tensors (its initial ones equal ours: PiSSA/QR are exact)
        for n, q in ours.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:  # the same module layout as HF's
                hf_params[n].copy_(q)
    theirs.save_pretrained(tmp_path / "hf_lora", path_initial_model_for_weight_conversion=str(tmp_path / "hf_init"))
    a, h = saved(tmp_path / "lora"), saved(tmp_path / "hf_lora")
    assert sorted(a) == sorted(h)
    for k in a:
        close(a[k], h[k])
    hcfg = json.loads((tmp_path / "hf_lora" / "adapter_config.json").read_text())
    assert (hcfg["r"], hcfg["lora_alpha"], hcfg["rank_pattern"], hcfg["alpha_pattern"]) == \
        (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"])


def test_conversion_needs_a_base_changing_init(tmp_path):
    peft = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.LoraConfig(r=2))
    peft.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="converts a PiSSA or OLoRA adapter"):
        peft.save_pretrained(tmp_path / "x", path_initial_model_for_weight_conversion=tmp_path / "init")


def test_dora_with_dropout_in_training_follows_hf_formula(monkeypatch):
    """Training with dropout (HF feeds the dropped x to both W·x and B·A·x; the masks of two libraries cannot be
    compared, so the hand-written formula is the oracle): h' = Wx + b + (g − 1)·W·x_d + g·s·B·A·x_d, with ONE draw
    x_d for both terms."""
    import unipeft.deltas.dropout as D

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    peft = unipeft.get_peft_model(model, unipeft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, use_dora=True,
                                                            init_lora_weights=False, target_modules=["0"]))
    d = model[0].lora.default
    with torch.no_grad():
        d.m.mul_(1.3)
    peft.train()
    draws, real = [], D.masked
    monkeypatch.setattr(D, "masked", lambda x, p: draws.append(real(x, p)) or draws[-1])
    x = torch.randn(3, 8)
    out = model(x)
    assert len(draws) == 1  # one mask for the base term and the low-rank term
    y, c = draws[0]
    xd = y * c
    assert not torch.equal(xd, x)
    W, b, s = model[0].weight, model[0].bias, 2.0
    g = d.m / torch.linalg.norm(W + s * d.B @ d.A, dim=1)
    close(out, x @ W.t() + b + (g - 1) * (xd @ W.t()) + g * s * (xd @ d.A.t() @ d.B.t()))


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct

@pytest.mark.real
@pytest.mark.parametrize("kw", [dict(use_dora=True, init_lora_weights=False), dict(init_lora_weights="pissa"),
                                dict(init_lora_weights="olora", use_dora=True)], ids=["dora", "pissa", "olora-dora"])
def test_smollm2_variants_parity(kw, tmp_path):
    import copy

    from test_hf_parity import REAL_ATOL
    from unipeft.cli.embedded import load_embedded

    try:
        base_model, tok = load_embedded()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    batch = dict(tok("The capital of France is", return_tensors="pt"))

    def run(m):
        with torch.no_grad():
            return m.eval()(**batch).logits

    args = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], **kw)
    ours = unipeft.get_peft_model(copy.deepcopy(base_model), unipeft.LoraConfig(**args))
    perturb(ours, seed=1)
    y = run(ours)
    assert (y - run(base_model)).abs().max() > 1e-2
    ours.save_pretrained(tmp_path / "ours")
    theirs = hf.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "ours")  # re-inits on the original
    close(run(theirs), y, atol=REAL_ATOL)
    close(run(ours.merge_and_unload()), run(theirs.merge_and_unload()), atol=REAL_ATOL)

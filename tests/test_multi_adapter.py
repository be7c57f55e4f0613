"""Several adapters on one model: HF PEFT's module layout, head copies in the module tree, and the multi-adapter
API (add/load/set/delete, weighted LoRA combinations, multi-adapter folders), with HF PEFT as the oracle."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of
from matrix import CORE, MERGEABLE, PROMPT, config

import unipeft

hf = pytest.importorskip("peft")

pytestmark = [pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")]

EVERY = CORE + PROMPT


def peft_of(method: str, arch: str, seed: int = 0, **kw):
    return unipeft.get_peft_model(BUILDERS[arch](), config(method, arch, random=True, **kw))


@torch.no_grad()
def perturb(model, seed: int) -> None:
    """Every trainable tensor off its initial value, so no equality below can hold vacuously."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda np: np[0]):
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# -- 1. module layout -----------------------------------------------------------------------------------------
def test_state_dict_keys_follow_hf_layout():
    peft = peft_of("lora", "bert")
    keys = set(peft.state_dict())
    q = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert {f"{q}.lora_A.default.weight", f"{q}.lora_B.default.weight", f"{q}.weight", f"{q}.bias"} <= keys
    assert {"base_model.model.classifier.original_module.weight",
            "base_model.model.classifier.modules_to_save.default.weight"} <= keys
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".modules_to_save.default." in n for n in trainable)
    # the file keeps HF PEFT's names (no adapter segment, the head under its own name)
    assert f"{q}.lora_A.weight" in peft.adapter_state_dict()
    assert "base_model.model.classifier.weight" in peft.adapter_state_dict()

    ia3 = peft_of("ia3", "llama")
    assert "base_model.model.model.layers.0.self_attn.k_proj.ia3_l.default" in ia3.state_dict()
    houlsby = peft_of("houlsby", "llama")
    assert any(k.endswith("self_attn.o_proj.adapter.default.down") for k in houlsby.state_dict())
    prefix = peft_of("prefix", "llama")
    assert "base_model.model.prefix.default.table" in prefix.state_dict()


def test_base_weights_keep_their_names():
    ref = BUILDERS["llama"]()
    peft = peft_of("lora", "llama")
    base = set(peft.get_base_model().state_dict())
    assert set(ref.state_dict()) <= base
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in base - set(ref.state_dict()))


# -- 2. head copies inside the module tree (issue 14 item 3) --------------------------------------------------
@pytest.mark.parametrize("method", EVERY)
def test_inject_then_move_every_method(method):
    b = batch_for("bert")
    ref = BUILDERS["bert"]().double()
    peft = peft_of(method, "bert").double()
    with torch.no_grad():
        out = logits_of(peft, b)
        assert out.dtype == torch.float64
        with peft.disable_adapter():  # crashed (float32 head) when the original lived outside the module tree
            off = logits_of(peft, b)
        torch.testing.assert_close(off, logits_of(ref, b), rtol=0, atol=1e-10)
        assert not torch.allclose(out, off, atol=1e-4), "adapter has no effect: test would be vacuous"
    if method in MERGEABLE:
        merged = unipeft.get_peft_model(BUILDERS["bert"](), config(method, "bert", random=True)).double()
        with torch.no_grad():
            out2 = logits_of(merged, b)
            plain = merged.merge_and_unload()
            assert all(p.dtype == torch.float64 for p in plain.parameters())
            torch.testing.assert_close(logits_of(plain, b), out2, rtol=0, atol=1e-6)  # merge math is fp32
    model = peft.unload()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert type(model.classifier) is type(ref.classifier)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, b), logits_of(ref, b), rtol=0, atol=0)


# -- 3. the multi-adapter API ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", EVERY)
def test_every_method_as_a_second_adapter(method, arch, tmp_path):
    b = batch_for(arch)
    alone = peft_of(method, arch, seed=1)
    perturb(alone, 1)
    alone.eval()
    alone.save_pretrained(tmp_path / "x")
    with torch.no_grad():
        want = logits_of(alone, b)
        base = logits_of(BUILDERS[arch](), b)
    peft = peft_of("lora", arch)
    perturb(peft, 2)
    with torch.no_grad():
        first = logits_of(peft, b)
        peft.load_adapter(tmp_path / "x", adapter_name="x")
        assert peft.active_adapters == ["default"] and set(peft.peft_config) == {"default", "x"}
        torch.testing.assert_close(logits_of(peft, b), first, rtol=0, atol=0)  # loading does not activate
        peft.set_adapter("x")
        torch.testing.assert_close(logits_of(peft, b), want, rtol=0, atol=1e-6)
        with peft.disable_adapter():
            torch.testing.assert_close(logits_of(peft, b), base, rtol=0, atol=0)
        peft.set_adapter("default")
        torch.testing.assert_close(logits_of(peft, b), first, rtol=0, atol=0)  # switching back is exact
        peft.set_adapter("x")
        torch.testing.assert_close(logits_of(peft, b), want, rtol=0, atol=1e-6)
        peft.delete_adapter("default")
        torch.testing.assert_close(logits_of(peft, b), want, rtol=0, atol=1e-6)
    model = peft.unload()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, b), base, rtol=0, atol=0)


@pytest.mark.parametrize("first,second", [("prefix", "prefix_proj"), ("prompt_tuning", "p_tuning_mlp"),
                                          ("prefix", "prompt_tuning"), ("mam", "prefix")])
def test_two_prompt_family_adapters(first, second):
    """Two prefixes share the attention seam; deleting the first leaves the second working."""
    b = batch_for("llama")
    solo = {m: peft_of(m, "llama") for m in (first, second)}
    with torch.no_grad():
        want = {m: logits_of(p, b) for m, p in solo.items()}
    peft = peft_of(first, "llama")
    peft.add_adapter("two", config(second, "llama"))
    with torch.no_grad():
        peft.load_adapter_weights(solo[second].adapter_state_dict(), adapter_name="two")
        torch.testing.assert_close(logits_of(peft, b), want[first], rtol=0, atol=1e-6)
        peft.set_adapter("two")
        torch.testing.assert_close(logits_of(peft, b), want[second], rtol=0, atol=1e-6)
        peft.set_adapter("default")
        peft.delete_adapter("default")
        assert peft.active_adapter == "two"
        torch.testing.assert_close(logits_of(peft, b), want[second], rtol=0, atol=1e-6)


def test_set_adapter_moves_trainability_and_add_adapter_keeps_it():
    peft = peft_of("lora", "llama")
    mine = {id(p) for p in peft.handle.adapter_parameters().values()}
    peft.add_adapter("b", config("ia3", "llama"))
    assert {id(p) for p in peft.parameters() if p.requires_grad} == mine  # the new adapter is frozen, inactive
    peft.set_adapter("b")
    theirs = {id(p) for p in peft.handle.adapter_parameters().values()}
    assert {id(p) for p in peft.parameters() if p.requires_grad} == theirs and theirs.isdisjoint(mine)
    peft.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in peft.parameters())


def test_delete_frees_the_parameters():
    peft = peft_of("lora", "bert")
    peft.add_adapter("b", config("houlsby", "bert"))
    refs = [weakref.ref(p) for p in peft._handles["b"].adapter_parameters().values()]
    assert refs and any(".b." in n for n, _ in peft.named_parameters())
    n_before = sum(1 for _ in peft.parameters())
    peft.delete_adapter("b")
    gc.collect()
    assert all(r() is None for r in refs)
    assert not any(".b." in n or n.endswith(".b") for n, _ in peft.named_parameters())
    assert sum(1 for _ in peft.parameters()) == n_before - len(refs)
    assert list(peft.peft_config) == ["default"]
    with pytest.raises(ValueError, match="only adapter"):
        peft.delete_adapter("default")
    with pytest.raises(ValueError, match="does not exist"):
        peft.delete_adapter("b")


def test_bad_adapter_names_and_shared_biases_are_refused():
    peft = peft_of("lora", "llama")
    with pytest.raises(ValueError, match="already exists"):
        peft.add_adapter("default", config("ia3", "llama"))
    with pytest.raises(ValueError, match="without '.'"):
        peft.add_adapter("a.b", config("ia3", "llama"))
    with pytest.raises(ValueError, match="biases"):
        peft.add_adapter("c", config("lora", "llama", bias="all"))
    with pytest.raises(ValueError, match="not found"):
        peft.set_adapter("nope")
    assert list(peft.peft_config) == ["default"]
    names = [n for n, _ in peft.named_parameters()]
    assert not any(".c." in n for n in names)


def test_transformers_peft_mixin_names_never_reach_the_base_model():
    from transformers.integrations import PeftAdapterMixin

    peft = peft_of("lora", "llama")
    for name in (n for n in vars(PeftAdapterMixin) if not n.startswith("_")):
        if hasattr(type(peft), name):  # ours
            attr = getattr(peft, name)
            assert getattr(attr, "__self__", peft) is peft, name
        else:
            with pytest.raises(AttributeError, match="unipeft's PeftModel has no"):
                getattr(peft, name)


# -- multi-adapter folders, both libraries ------------------------------------------------------------------
LORA = dict(task_type="CAUSAL_LM", lora_alpha=12, init_lora_weights=False)


def two_loras():
    peft = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **LORA))
    peft.add_adapter("other", unipeft.LoraConfig(r=2, target_modules=["v_proj", "o_proj", "down_proj"], **LORA))
    perturb(peft, 3)
    peft.set_adapter("other")
    perturb(peft, 4)
    peft.set_adapter("default")
    return peft


def test_hf_peft_loads_our_multi_adapter_folder(tmp_path):
    b = batch_for("llama")
    peft = two_loras()
    with torch.no_grad():
        ours = {}
        for name in ("default", "other"):
            peft.set_adapter(name)
            ours[name] = logits_of(peft, b)
    assert not torch.allclose(ours["default"], ours["other"], atol=1e-3)
    peft.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md", "other"}
    assert {p.name for p in (tmp_path / "other").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    theirs = hf.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    back = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    back.load_adapter(tmp_path, adapter_name="other", subfolder="other")
    with torch.no_grad():
        for name in ("default", "other"):
            theirs.set_adapter(name)
            back.set_adapter(name)
            torch.testing.assert_close(logits_of(theirs, b), ours[name], rtol=0, atol=1e-5)
            torch.testing.assert_close(logits_of(back, b), ours[name], rtol=0, atol=0)

    peft.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert {p.name for p in (tmp_path / "sel").iterdir()} == {"other", "README.md"}  # HF PEFT also writes its card at the top
    with pytest.raises(ValueError, match="unknown adapter"):
        peft.save_pretrained(tmp_path / "bad", selected_adapters=["nope"])


def _hf_twin(peft, tmp_path):
    peft.save_pretrained(tmp_path)
    theirs = hf.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    theirs.load_adapter(tmp_path / "other", adapter_name="other")
    return theirs


@pytest.mark.parametrize("kind", ["linear", "cat", "svd"])
def test_weighted_adapter_matches_hf_peft(kind, tmp_path):
    b = batch_for("llama")
    peft = two_loras()
    weights = [0.7, -1.3]
    if kind == "linear":  # linear needs equal ranks: a second adapter of rank 4
        peft.delete_adapter("other")
        peft.add_adapter("other", unipeft.LoraConfig(r=4, target_modules=["v_proj", "k_proj"], **LORA))
        peft.set_adapter("other")
        perturb(peft, 5)
        peft.set_adapter("default")
    theirs = _hf_twin(peft, tmp_path)
    peft.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=kind)
    theirs.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=kind)
    assert peft.active_adapter == "default"
    assert not any(p.requires_grad for p in peft._handles["mix"].adapter_parameters().values())
    peft.set_adapter("mix")
    theirs.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(peft, b), logits_of(theirs, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_weighted_adapter_equals_the_merged_weighted_sum(kind):
    """cat (and full-rank svd) give ΔW = Σ wᵢ·sᵢ·BᵢAᵢ: compare with the base model with that sum added by hand."""
    b = batch_for("llama")
    peft = two_loras()
    weights = [0.5, 2.0]
    expected = BUILDERS["llama"]()
    with torch.no_grad():
        for name, w, s in (("default", 0.5, 12 / 4), ("other", 2.0, 12 / 2)):
            for mod_name, mod in expected.named_modules():
                host = peft.get_base_model().get_submodule(mod_name) if mod_name else None
                if host is not None and hasattr(host, "lora_A") and name in host.lora_A._modules:
                    mod.weight += w * s * host.lora_B._modules[name].weight @ host.lora_A._modules[name].weight
        peft.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=kind,
                                  svd_rank=32 if kind == "svd" else None)
        peft.set_adapter("mix")
        assert not torch.allclose(logits_of(expected, b), logits_of(BUILDERS["llama"](), b), atol=1e-3)
        torch.testing.assert_close(logits_of(peft, b), logits_of(expected, b), rtol=0, atol=1e-5)


def test_weighted_linear_follows_its_formula():
    """linear: A = Σ sign·√|w s|·Aᵢ, B = Σ √|w s|·Bᵢ (HF PEFT's definition), checked against a hand computation."""
    peft = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.LoraConfig(r=4, target_modules=["q_proj"], **LORA))
    peft.add_adapter("other", unipeft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                 init_lora_weights=False))
    q = peft.get_base_model().model.layers[0].self_attn.q_proj
    A1, B1 = q.lora_A.default.weight.detach().clone(), q.lora_B.default.weight.detach().clone()
    A2, B2 = q.lora_A.other.weight.detach().clone(), q.lora_B.other.weight.detach().clone()
    peft.add_weighted_adapter(["default", "other"], [2.0, -0.5], "mix", combination_type="linear")
    c1, c2 = 2.0 * 12 / 4, -0.5 * 8 / 4
    A = c1 ** 0.5 * A1 - abs(c2) ** 0.5 * A2
    B = c1 ** 0.5 * B1 + abs(c2) ** 0.5 * B2
    torch.testing.assert_close(q.lora_A.mix.weight, A, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.lora_B.mix.weight, B, rtol=0, atol=1e-6)
    assert peft.peft_config["mix"].r == 4 and peft.peft_config["mix"].lora_alpha == 4


def test_weighted_adapter_refusals():
    peft = two_loras()
    with pytest.raises(ValueError, match="one rank"):
        peft.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="not supported"):
        peft.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="ties")
    with pytest.raises(ValueError, match="do not exist"):
        peft.add_weighted_adapter(["default", "nope"], [1, 1], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="one weight per adapter"):
        peft.add_weighted_adapter(["default", "other"], [1], "mix", combination_type="cat")
    peft.add_adapter("ia3", config("ia3", "llama"))
    with pytest.raises(ValueError, match="LoRA"):
        peft.add_weighted_adapter(["default", "ia3"], [1, 1], "mix", combination_type="cat")
    heads = unipeft.get_peft_model(BUILDERS["bert"](), config("lora", "bert"))
    heads.add_adapter("b", config("lora", "bert"))
    with pytest.raises(ValueError, match="same module"):
        heads.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="cat")
    assert "mix" not in peft.peft_config and "mix" not in heads.peft_config


# -- 4. mixed-adapter batches ---------------------------------------------------------------------------------
def _three_adapters(arch: str):
    """LoRA "a", IA3 "b", a Houlsby adapter "c" on one model (heads too on bert), all non-identity."""
    peft = peft_of("lora", arch)
    peft.add_adapter("b", config("ia3", arch, random=True))
    peft.add_adapter("c", config("houlsby", arch, random=True))
    for name in ("c", "b", "default"):
        peft.set_adapter(name)
        perturb(peft, len(name) + 7)
    return peft.eval()


@pytest.mark.parametrize("arch", ["llama", "bert", "t5", "phi3"])  # phi3: deltas on parts of fused linears
def test_mixed_batch_rows_equal_single_adapter_runs(arch):
    peft = _three_adapters(arch)
    b = batch_for(arch, batch=6)
    names = ["b", "default", "__base__", "c", "default", "b"]
    with torch.no_grad():
        single = {}
        for name in ("default", "b", "c"):
            peft.set_adapter(name)
            single[name] = logits_of(peft, b)
        with peft.disable_adapter():
            single["__base__"] = logits_of(peft, b)
        peft.set_adapter("default")
        assert not torch.allclose(single["b"], single["c"], atol=1e-3)
        kw = {k: v for k, v in b.items() if k != "labels" or arch == "t5"}
        mixed = peft(**kw, adapter_names=names).logits
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], single[name][i], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits_of(peft, b), single["default"], rtol=0, atol=0)  # state restored


def test_mixed_batch_gradients_reach_each_group():
    peft = _three_adapters("llama")
    b = batch_for("llama", batch=4)
    for name in ("b", "c"):
        for p in peft._handles[name].adapter_parameters().values():
            p.requires_grad_(True)
    out = peft(input_ids=b["input_ids"], adapter_names=["b", "__base__", "c", "b"]).logits
    out[[0, 2, 3]].sum().backward()
    for name in ("b", "c"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft._handles[name].adapter_parameters().values())
    assert all(p.grad is None for p in peft._handles["default"].adapter_parameters().values())


def test_mixed_batch_through_generate():
    peft = _three_adapters("llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (4, 5), generator=g)
    names = ["c", "default", "b", "__base__"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = peft.generate(input_ids=ids, adapter_names=names, **kw)
        for i, name in enumerate(names):
            if name == "__base__":
                with peft.disable_adapter():
                    want = peft.generate(input_ids=ids[i:i + 1], **kw)
            else:
                peft.set_adapter(name)
                want = peft.generate(input_ids=ids[i:i + 1], **kw)
            assert torch.equal(mixed[i:i + 1], want), name
        peft.set_adapter("default")
        outs = {tuple(peft.generate(input_ids=ids[:1], adapter_names=[n], **kw)[0, 5:].tolist()) for n in ("b", "c", "default")}
        assert len(outs) > 1, "adapters generate the same tokens: test would be vacuous"


def test_mixed_batch_refusals():
    peft = _three_adapters("llama")
    ids = batch_for("llama", batch=2)["input_ids"]
    with pytest.raises(ValueError, match="one adapter name"):
        peft(input_ids=ids, adapter_names=["b"])
    with pytest.raises(ValueError, match="unknown adapter"):
        peft(input_ids=ids, adapter_names=["b", "zzz"])
    with pytest.raises(ValueError, match="num_beams"):
        peft.generate(input_ids=ids, adapter_names=["b", "c"], num_beams=2, max_new_tokens=2)
    peft.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft(input_ids=ids, adapter_names=["default", "b"])


def test_review_fixes_second_adapter_head_merged_rows_subfolder(tmp_path):
    """all-linear on a second adapter never adapts the first one's head copy or slots; a merged adapter refuses
    mixed batches even when not named; from_pretrained(subfolder=) loads that adapter, not the top one."""
    import torch
    from conftest import BUILDERS

    import unipeft

    model = BUILDERS["bert"]()
    peft = unipeft.get_peft_model(model, unipeft.LoraConfig(task_type="SEQ_CLS", r=2))
    peft.add_adapter("b", unipeft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear"))
    names = [n for n, _ in peft.named_parameters()]
    assert not any(".modules_to_save." in n and "lora_" in n for n in names)
    assert not any(".original_module." in n and "lora_" in n for n in names)
    ids = torch.randint(3, 90, (2, 5))
    peft.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft(input_ids=ids, adapter_names=["__base__", "b"])
    peft.unmerge_adapter()
    m2 = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                         target_modules=["q_proj"]))
    m2.add_adapter("b", unipeft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["v_proj"]))
    m2.save_pretrained(tmp_path)
    loaded = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path, subfolder="b")
    assert any("v_proj.lora_A" in n for n, _ in loaded.named_parameters())
    assert not any("q_proj.lora_A" in n for n, _ in loaded.named_parameters())

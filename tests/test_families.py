"""Family-specific semantics against hand-built references: Phi-3's fused projections, Mixtral's expert
refusals, Gemma-2's soft-capping and sliding window under prefixes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of

import unipeft


def _layers(model):
    return model.get_base_model().model.layers if hasattr(model, "get_base_model") else model.model.layers


# ---------------------------------------------------------------- Phi-3: parts of fused linears

# Tiny Phi-3: 4 query heads and 2 key/value heads of 8 -> qkv_proj rows q 0:32, k 32:48, v 48:64;
# gate_up_proj rows gate 0:64, up 64:128 (intermediate 64).
QKV = {"q_proj": (0, 32), "k_proj": (32, 48), "v_proj": (48, 64)}
GATE_UP = {"gate_proj": (0, 64), "up_proj": (64, 128)}


def test_phi3_lora_on_parts_equals_hand_merged_rows():
    base = BUILDERS["phi3"]()
    ref = copy.deepcopy(base)
    targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
    cfg = unipeft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False)
    peft = unipeft.get_peft_model(base, cfg)
    with torch.no_grad():
        for layer, theirs in zip(_layers(peft), ref.model.layers):
            for fused, rows in (("self_attn.qkv_proj", QKV), ("mlp.gate_up_proj", GATE_UP)):
                host = layer.get_submodule(fused)
                W = theirs.get_submodule(fused).weight
                for part, (a, b) in rows.items():
                    if part in targets:
                        d = host.get_submodule(f"lora_{part}.default")
                        W[a:b] += 3.0 * d.B @ d.A  # alpha / r = 3
        b = batch_for("phi3")
        out, expected, plain = logits_of(peft, b), logits_of(ref, b), logits_of(BUILDERS["phi3"](), b)
    assert not torch.allclose(out, plain, atol=1e-3)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_phi3_ia3_scales_only_k_and_v_rows():
    base = BUILDERS["phi3"]()
    ref = copy.deepcopy(base)
    peft = unipeft.get_peft_model(base, unipeft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    assert tuple(peft.peft_config["default"].target_modules) == ("k_proj", "v_proj", "down_proj")
    with torch.no_grad():
        for layer, theirs in zip(_layers(peft), ref.model.layers):
            W = theirs.self_attn.qkv_proj.weight
            for part in ("k_proj", "v_proj"):
                a, b = QKV[part]
                W[a:b] *= layer.self_attn.qkv_proj.get_submodule(f"ia3_{part}.default").l  # (rows, 1)
            theirs.mlp.down_proj.weight *= layer.mlp.down_proj.ia3.default.l  # (1, in): the FFN input
        b = batch_for("phi3")
        torch.testing.assert_close(logits_of(peft, b), logits_of(ref, b), rtol=0, atol=1e-5)
        merged = peft.merge_and_unload()
        torch.testing.assert_close(logits_of(merged, b), logits_of(ref, b), rtol=0, atol=1e-5)
        for (n, p), (_, q) in zip(merged.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_phi3_default_lora_targets_q_and_v_rows_and_saves_llama_names(tmp_path):
    peft = unipeft.get_peft_model(BUILDERS["phi3"](), unipeft.LoraConfig(task_type="CAUSAL_LM", r=2))
    qkv = _layers(peft)[0].self_attn.qkv_proj
    assert qkv.lora_q_proj.default.B.shape == (32, 2) and qkv.lora_v_proj.default.B.shape == (16, 2)
    assert not hasattr(qkv, "lora_k_proj")
    peft.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight" in keys


def test_phi3_whole_fused_linear_still_targetable():
    peft = unipeft.get_peft_model(BUILDERS["phi3"](), unipeft.LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                          target_modules=["qkv_proj"]))
    assert _layers(peft)[0].self_attn.qkv_proj.lora_B.default.weight.shape == (64, 2)  # HF's layout


def test_phi3_input_scaling_on_a_part_is_refused():
    cfg = unipeft.IA3Config(task_type="CAUSAL_LM", target_modules=["gate_proj", "down_proj"],
                            feedforward_modules=["gate_proj"])
    with pytest.raises(ValueError, match="fused .*gate_up_proj.* output only"):
        unipeft.get_peft_model(BUILDERS["phi3"](), cfg)


# ---------------------------------------------------------------- Mixtral: experts are not linears


def test_mixtral_ia3_default_refuses_expert_ffn():
    with pytest.raises(ValueError, match="experts are fused 3-D parameters"):
        unipeft.get_peft_model(BUILDERS["mixtral"](), unipeft.IA3Config(task_type="CAUSAL_LM"))


@pytest.mark.parametrize("target", ["down_proj", "experts.gate_up_proj"])
def test_mixtral_expert_targets_are_refused_by_name(target):
    cfg = unipeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", target])
    with pytest.raises(ValueError, match="a parameter, .*experts.* not a linear module"):
        unipeft.get_peft_model(BUILDERS["mixtral"](), cfg)


def test_mixtral_attention_and_ffn_sublayer_work():
    cfg = unipeft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj"], feedforward_modules=[])
    peft = unipeft.get_peft_model(BUILDERS["mixtral"](), cfg)
    assert peft.get_nb_trainable_parameters()[0] == 2 * (16 + 16)


# ---------------------------------------------------------------- Gemma-2: soft-capping and sliding window


def _reference_prefix_attention(prefixes, ignore=()):
    """Gemma-2's attention written out with the prefix keys/values concatenated by hand: scores q·kᵀ·scaling,
    soft-capped cap·tanh(s/cap), real keys causal and within the sliding window (i - j < w), prefix keys
    visible to every query. The model's own mask is ignored (no padding in these batches)."""

    def attend(module, query, key, value, attention_mask, **kwargs):
        B, H, T, d = query.shape
        pk, pv = prefixes[module.layer_idx]  # (B, H_kv, P, d)
        P, rep = pk.shape[2], H // key.shape[1]
        k = torch.cat([pk, key], 2).repeat_interleave(rep, 1)
        v = torch.cat([pv, value], 2).repeat_interleave(rep, 1)
        s = query @ k.transpose(-1, -2) * module.scaling
        cap = module.attn_logit_softcapping
        if cap is not None and "softcap" not in ignore:
            s = cap * torch.tanh(s / cap)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        allowed = j <= i
        if module.sliding_window is not None and "window" not in ignore:
            allowed &= (i - j) < module.sliding_window
        allowed = torch.cat([torch.ones(T, P, dtype=torch.bool), allowed], 1)
        s = s.masked_fill(~allowed, float("-inf"))
        return (torch.softmax(s, -1) @ v).transpose(1, 2), None

    return attend


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_gemma2_prefix_honours_softcap_and_sliding_window(method):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    base = BUILDERS["gemma2"]()
    cfg = base.config
    assert cfg.layer_types[0] == "sliding_attention" and cfg.sliding_window == 3 and cfg.attn_logit_softcapping
    ref = copy.deepcopy(base)
    # the reference is the paper's prefix (seen by every query, real tokens at 0..T-1): HF's shifted semantics,
    # prefix_tuning's default, are checked against HF PEFT's own files in test_hf_prefix_file_* below
    opts = {"position_shift": False} if method == "prefix_tuning" else {}
    peft = unipeft.get_peft_model(base, unipeft.methods()[method].factory(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                          **opts))
    b = batch_for("gemma2")  # 7 tokens: the window of 3 cuts
    B = b["input_ids"].shape[0]
    with torch.no_grad():
        out = logits_of(peft, b)
        prefixes = {s.host.layer_idx: s.delta.kv(s.slot, B, torch.float32) for s in peft.handle.sites}
        assert len(prefixes) == cfg.num_hidden_layers
        results = {}
        for ignore in ((), ("softcap",), ("window",)):
            name = "test_ref_prefix_" + "_".join(ignore)
            AttentionInterface.register(name, _reference_prefix_attention(prefixes, ignore))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
            ref.set_attn_implementation(name)
            results[ignore] = logits_of(ref, b)
    torch.testing.assert_close(out, results[()], rtol=0, atol=1e-5)
    # the reference is sensitive to both: without them it differs (the check above is not vacuous)
    assert (out - results[("softcap",)]).abs().max() > 1e-2, (out - results[("softcap",)]).abs().max()
    assert (out - results[("window",)]).abs().max() > 1e-2, (out - results[("window",)]).abs().max()


# ---------------------------------------------------------------- HF PEFT as the oracle on the new families


@pytest.mark.parametrize("arch,targets", [
    ("phi3", ["qkv_proj", "gate_up_proj"]), ("mixtral", ["q_proj", "v_proj"]),
    ("gemma2", ["q_proj", "v_proj", "down_proj"]), ("qwen3", ["k_proj", "o_proj"])])
def test_hf_peft_lora_files_load_with_identical_outputs(arch, targets, tmp_path):
    import peft as hf  # a dev dependency: make test installs it

    b = batch_for(arch)
    theirs = hf.get_peft_model(BUILDERS[arch](), hf.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                                 target_modules=targets, init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = unipeft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path)
    with torch.no_grad():
        y = logits_of(theirs, b)
        assert (y - logits_of(BUILDERS[arch](), b)).abs().max() > 1e-3
        torch.testing.assert_close(logits_of(ours, b), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,kw", [("gemma2", {}), ("mistral", {"sliding_window": 3})])
def test_hf_peft_prefix_files_on_sliding_window_models_load_with_identical_outputs(arch, kw, tmp_path):
    """HF PEFT caches the prefix as tokens at positions 0..P-1, so a sliding window hides it from later queries;
    its files load with position_shift (HF's semantics) and must give its outputs (before: 2.3 apart on Gemma-2)."""
    import peft as hf

    b = batch_for(arch)
    theirs = hf.get_peft_model(BUILDERS[arch](**kw), hf.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    theirs.save_pretrained(tmp_path)
    ours = unipeft.PeftModel.from_pretrained(BUILDERS[arch](**kw), tmp_path)
    assert ours.peft_config["default"].position_shift
    with torch.no_grad():
        y = logits_of(theirs, b)
        torch.testing.assert_close(logits_of(ours, b), y, rtol=0, atol=1e-5)
        full = unipeft.PeftModel.from_pretrained(BUILDERS[arch](**{**kw, "sliding_window": 64}), tmp_path)
        assert (logits_of(full, b) - y).abs().max() > 1e-2  # the window does cut the prefix here

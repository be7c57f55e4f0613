"""Bad input gets a clear error, and nothing is left half-done."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of

from unipeft import AdapterConfig, IA3Config, LoraConfig, PeftModel, get_peft_model


def test_unknown_target_module_suggests_close_names():
    model = BUILDERS["llama"]()
    ref = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"'q_prj' \(did you mean 'q_proj'") as e:
        get_peft_model(model, LoraConfig(target_modules=["q_prj", "v_proj"]))
    assert "linear modules found" in str(e.value)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]  # untouched


def test_regex_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no linear module"):
        get_peft_model(BUILDERS["gpt2"](), LoraConfig(target_modules=r".*\.nope"))


def test_unknown_architecture_lists_modules():
    from torch import nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    with pytest.raises(ValueError, match="no default target modules.*linear modules found"):
        get_peft_model(Odd(), LoraConfig())
    with pytest.raises(ValueError, match="unknown architecture.*Modules of the first block"):
        get_peft_model(Odd(), AdapterConfig.houlsby(bottleneck_size=2))
    peft = get_peft_model(Odd(), LoraConfig(target_modules=["0"]))  # explicit names work anywhere
    assert len(peft.handle.sites) == 2


@pytest.mark.parametrize("make", [
    lambda: LoraConfig(r=0), lambda: LoraConfig(r=-2), lambda: LoraConfig(lora_dropout=1.0),
    lambda: LoraConfig(lora_dropout=-0.1), lambda: LoraConfig(bias="some"), lambda: LoraConfig(init_lora_weights="eva"),
    lambda: AdapterConfig(bottleneck_size=0), lambda: AdapterConfig(reduction_factor=0),
    lambda: AdapterConfig(position="middle"), lambda: AdapterConfig(non_linearity="nope"),
    lambda: AdapterConfig(scaling="big"), lambda: LoraConfig(task_type="CLASSIFY"),
    lambda: IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"]),
])
def test_invalid_values_fail_at_construction(make):
    with pytest.raises(ValueError):
        make()


@pytest.fixture
def saved(tmp_path):
    peft = get_peft_model(BUILDERS["llama"](), LoraConfig(r=4, init_lora_weights=False))
    peft.save_pretrained(tmp_path)
    return tmp_path


def test_shape_mismatch_names_tensor_and_leaves_model_unchanged(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ref = copy.deepcopy(other)
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 32\) but the model expects \(4, 48\)"):
        PeftModel.from_pretrained(other, saved)
    assert [n for n, _ in other.named_modules()] == [n for n, _ in ref.named_modules()]
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ref.state_dict().values()))
    assert not other._forward_hooks and all(not m._forward_hooks for m in other.modules())


def test_adapter_for_another_architecture(saved):
    with pytest.raises(ValueError, match="target module"):
        PeftModel.from_pretrained(BUILDERS["bert"](), saved)


def test_missing_config(saved):
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        PeftModel.from_pretrained(BUILDERS["llama"](), saved)


def test_malformed_config(saved):
    (saved / "adapter_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PeftModel.from_pretrained(BUILDERS["llama"](), saved)
    (saved / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match="no 'peft_type'"):
        PeftModel.from_pretrained(BUILDERS["llama"](), saved)


def test_unknown_peft_type(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    with pytest.raises(ValueError, match="unknown peft_type 'LOHA'"):
        PeftModel.from_pretrained(BUILDERS["llama"](), saved)


def test_unsupported_hf_feature_is_refused(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias=True"):
        PeftModel.from_pretrained(BUILDERS["llama"](), saved)


def test_corrupt_safetensors(saved):
    f = saved / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    model = BUILDERS["llama"]()
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(model, saved)
    assert not any(m._forward_hooks for m in model.modules())


def test_pickle_file_loads_through_the_weights_only_unpickler(saved):
    """HF programs load adapter_model.bin folders; torch's weights-only unpickler builds tensors and never runs
    code, so no opt-in is needed — and a pickle that would run code is refused."""
    from safetensors.torch import load_file

    tensors = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    peft = PeftModel.from_pretrained(BUILDERS["llama"](), saved)
    assert torch.equal(peft.adapter_state_dict()[next(iter(tensors))], next(iter(tensors.values())))
    torch.save({"x": _RunsCode()}, saved / "adapter_model.bin")
    model = BUILDERS["llama"]()
    with pytest.raises(ValueError, match="weights_only=True"):
        PeftModel.from_pretrained(model, saved)
    assert not any(m._forward_hooks for m in model.modules())


class _RunsCode:
    def __reduce__(self):
        return (print, ("pickle ran code",))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "nope")


def test_save_is_atomic_and_leaves_no_temp_files(saved):
    peft = PeftModel.from_pretrained(BUILDERS["llama"](), saved)
    peft.save_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_merging_a_non_mergeable_adapter_is_all_or_nothing():
    model = BUILDERS["llama"]()
    ref = copy.deepcopy(model)
    peft = get_peft_model(model, AdapterConfig.pfeiffer(bottleneck_size=8, init="random"))
    with pytest.raises(ValueError, match="cannot be merged"):
        peft.merge_and_unload()
    b = batch_for("llama")
    with torch.no_grad(), peft.disable_adapter():
        torch.testing.assert_close(logits_of(peft, b), logits_of(ref, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("position,form,compose", [
    ("sublayer", "parallel", "multiply"), ("sublayer", "sequential", "gate"),
    ("linear", "parallel", "gate"), ("linear", "after_add_norm", "add"), ("linear", "sequential", "multiply")])
def test_design_points_that_mean_nothing_are_refused(position, form, compose):
    """Issue 14 item 4: a residual site used to add s·l for compose=multiply, and a linear site treated gate as add."""
    from unipeft import AtLinear, AtSublayer, Compose, Form, Insertion, Scaling, Sublayer, inject

    model = BUILDERS["llama"]()
    pos = AtSublayer(sublayer=Sublayer.FFN) if position == "sublayer" else AtLinear(targets=("q_proj",))
    ins = Insertion(delta=Scaling(), position=pos, form=Form(form), compose=Compose(compose), name="s")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="label only"):
        inject(model, (ins,))
    assert set(model.state_dict()) == set(before)  # nothing left behind

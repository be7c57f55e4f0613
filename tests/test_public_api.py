"""HF PEFT's public names and file behaviour, each checked against HF PEFT itself (the oracle, test-only)."""

from __future__ import annotations

import json

import peft as hf
import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of

import unipeft
from unipeft import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, LoraConfig,
                     PeftConfig, PeftModel, PeftType, PromptTuningInit, get_peft_config, get_peft_model,
                     get_peft_model_state_dict, inject_adapter_in_model, prepare_model_for_kbit_training,
                     set_peft_model_state_dict)
from unipeft.registry import CONFIGS

ATOL = 1e-5


def lora_pair(arch="llama", **kw):
    """The same random LoRA in HF PEFT and here (ours loaded from HF's state dict)."""
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw}
    theirs = hf.get_peft_model(BUILDERS[arch](), hf.LoraConfig(init_lora_weights=False, **kw))
    ours = get_peft_model(BUILDERS[arch](), LoraConfig(**kw))
    return theirs, ours


# -- names -----------------------------------------------------------------------------------------------------
def test_founding_brief_import_line_and_get_peft_config():
    from unipeft import LoraConfig as L, TaskType, get_peft_config as g, get_peft_model as gm  # noqa: F401

    d = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": False, "r": 8, "lora_alpha": 32,
         "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    cfg = get_peft_config(d)
    assert cfg == L(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    assert get_peft_config({**d, "peft_type": PeftType.LORA}) == cfg
    theirs = hf.get_peft_config(d)
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (theirs.r, theirs.lora_alpha, set(theirs.target_modules))
    with pytest.raises(TypeError, match="lora_alhpa"):
        get_peft_config({**d, "lora_alhpa": 16})
    with pytest.raises(ValueError, match="unknown peft_type 'LORAX'"):
        get_peft_config({**d, "peft_type": "LORAX"})
    with pytest.raises(ValueError, match="peft_type"):
        get_peft_config({"r": 8})
    # HF fields unipeft lacks: accepted at their defaults, refused otherwise (the list shrinks as LoRA grows)
    assert get_peft_config({**d, **L.unsupported}) == cfg
    for k, default in L.unsupported.items():
        other = True if default is False else ("x" if default is None else {"x": 1})
        with pytest.raises(ValueError, match=f"sets {k}="):
            get_peft_config({**d, k: other})


def test_peft_type_is_every_registered_method_with_hf_names():
    assert {t.value for t in PeftType} == set(CONFIGS)
    for t in PeftType:
        assert t == t.value and str(t) == t.value
        if t.name in hf.PeftType.__members__:
            assert hf.PeftType[t.name].value == t.value
    assert LoraConfig.peft_type == PeftType.LORA
    assert {m.name: m.value for m in PromptTuningInit} == {m.name: m.value for m in hf.PromptTuningInit}
    cfg = unipeft.PromptTuningConfig(prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB, num_virtual_tokens=4)
    assert cfg.prompt_tuning_init == "SAMPLE_VOCAB"


def test_every_name_is_exported():
    for name in ("get_peft_config", "PeftType", "PromptTuningInit", "get_peft_model_state_dict",
                 "set_peft_model_state_dict", "inject_adapter_in_model", "prepare_model_for_kbit_training",
                 "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForSequenceClassification",
                 "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForTokenClassification",
                 "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction"):
        assert name in unipeft.__all__ and hasattr(unipeft, name)


# -- configs: files both ways, HF's fields accepted -----------------------------------------------------------------
HF_CONFIGS = {
    "LORA": lambda: hf.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]),
    "IA3": lambda: hf.IA3Config(task_type="SEQ_2_SEQ_LM", feedforward_modules=[]),
    "PROMPT_TUNING": lambda: hf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "P_TUNING": lambda: hf.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=5, encoder_hidden_size=16),
    "PREFIX_TUNING": lambda: hf.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
}


@pytest.mark.parametrize("peft_type", sorted(HF_CONFIGS))
def test_hf_written_config_loads(peft_type, tmp_path):
    theirs = HF_CONFIGS[peft_type]()
    theirs.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "peft_version" in written and "auto_mapping" in written  # HF's bookkeeping keys are in the file
    cfg = PeftConfig.from_pretrained(tmp_path)
    assert type(cfg) is CONFIGS[peft_type] and cfg.peft_type == peft_type
    assert cfg.task_type == written["task_type"] and cfg.peft_version == written["peft_version"]
    assert type(cfg).from_pretrained(tmp_path) == cfg
    # and every field HF wrote that we have, at the value HF wrote (lists as tuples)
    for k, v in written.items():
        if k in cfg.__dataclass_fields__ and k != "task_type":
            assert getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v), k


def test_config_from_pretrained_refuses_another_method_and_round_trips_to_hf(tmp_path):
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(tmp_path / "l")
    unipeft.IA3Config(target_modules=["k_proj"]).save_pretrained(tmp_path / "i")
    with pytest.raises(ValueError, match="holds a IA3 adapter, not LORA; load it with IA3Config"):
        LoraConfig.from_pretrained(tmp_path / "i")
    cfg = PeftConfig.from_pretrained(tmp_path / "l", inference_mode=True)
    assert type(cfg) is LoraConfig and cfg.r == 4 and cfg.inference_mode
    with pytest.raises(TypeError, match="unknown arguments"):
        PeftConfig.from_pretrained(tmp_path / "l", rr=3)
    theirs = hf.PeftConfig.from_pretrained(tmp_path / "l")
    assert type(theirs) is hf.LoraConfig and (theirs.r, theirs.lora_alpha) == (4, 8)


def test_configs_accept_hf_fields_at_their_defaults():
    common = dict(revision="main", inference_mode=True, auto_mapping=None, peft_version="0.21.2")
    unipeft.IA3Config(fan_in_fan_out=False, init_ia3_weights=True, **common)
    unipeft.PromptTuningConfig(tokenizer_kwargs=None, **common)
    unipeft.PromptEncoderConfig(encoder_dropout=0.0, encoder_num_layers=2, **common)
    unipeft.PrefixTuningConfig(init_weights=None, prefix_projection=False, **common)
    with pytest.raises(ValueError, match="init_weights='zero' is not supported"):
        unipeft.PrefixTuningConfig(init_weights="zero")


# -- state dicts ---------------------------------------------------------------------------------------------------
def test_peft_model_state_dict_is_hf_file_layout_both_ways():
    theirs, ours = lora_pair()
    sd = hf.get_peft_model_state_dict(theirs)
    assert set(get_peft_model_state_dict(ours)) == set(sd)
    assert set_peft_model_state_dict(ours, sd).unexpected_keys == []
    b = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ours, b), logits_of(theirs, b), rtol=0, atol=ATOL)
    mine = get_peft_model_state_dict(ours)
    assert all(torch.equal(mine[k], sd[k]) for k in sd)
    # with the model's own state_dict, values come from it
    full = {k: v.clone() for k, v in ours.state_dict().items()}
    assert all(torch.equal(v, mine[k]) for k, v in get_peft_model_state_dict(ours, state_dict=full).items())
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        get_peft_model_state_dict(ours, adapter_name="other")
    with pytest.raises(ValueError, match="unexpected"):
        set_peft_model_state_dict(ours, {**sd, "base_model.model.bogus.lora_A.weight": torch.zeros(1)})


def test_inject_adapter_in_model_matches_hf():
    theirs = hf.inject_adapter_in_model(hf.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                                        BUILDERS["llama"]())
    model = BUILDERS["llama"]()
    out = inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), model)
    assert out is model and not isinstance(out, PeftModel)
    sd = hf.get_peft_model_state_dict(theirs)
    assert set(get_peft_model_state_dict(model)) == set(sd)
    set_peft_model_state_dict(model, sd)
    b = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, b), logits_of(theirs, b), rtol=0, atol=ATOL)
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        not p.requires_grad for n, p in model.named_parameters() if "embed" in n)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"]), model)
    with pytest.raises(ValueError, match="use get_peft_model"):
        inject_adapter_in_model(unipeft.PromptTuningConfig(num_virtual_tokens=3), BUILDERS["llama"]())
    with pytest.raises(TypeError, match="has no unipeft adapter"):
        get_peft_model_state_dict(BUILDERS["llama"]())


# -- prepare_model_for_kbit_training ------------------------------------------------------------------------------
@pytest.mark.parametrize("quantized", [False, True])
def test_prepare_model_for_kbit_training_matches_hf(quantized):
    models = [BUILDERS["llama"]().to(torch.bfloat16) for _ in range(2)]
    if quantized:  # transformers' flag for a bitsandbytes 4-bit model; what the function branches on
        for m in models:
            m.is_loaded_in_4bit = True
    ours, theirs = prepare_model_for_kbit_training(models[0]), hf.prepare_model_for_kbit_training(models[1])
    assert ours is models[0]
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert (p.dtype, p.requires_grad) == (q.dtype, q.requires_grad) == (torch.float32, False), n
    assert ours.is_gradient_checkpointing == theirs.is_gradient_checkpointing == quantized
    ids = batch_for("llama")["input_ids"]
    assert ours.get_input_embeddings()(ids).requires_grad == quantized


def test_prepare_model_for_kbit_training_on_an_nf4_model():
    """A base built in NF4 by unipeft.quant: quantized storage untouched, the rest fp32, checkpointing on, and
    a LoRA on it trains."""
    from transformers import LlamaConfig

    from unipeft.quant import is_quantized, load_quantized, random_source

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    model = load_quantized(cfg, "nf4", source=random_source(), compute_dtype=torch.bfloat16)
    quantized = {n: (type(p), p.dtype) for n, p in model.named_parameters() if not p.is_floating_point()}
    assert quantized and any(p.dtype == torch.bfloat16 for p in model.parameters())
    prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    for n, p in model.named_parameters():
        assert not p.requires_grad and (quantized.get(n) == (type(p), p.dtype) if n in quantized else p.dtype == torch.float32), n
    assert sum(is_quantized(m) for m in model.modules()) == 14
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft.train()
    ids = torch.randint(3, 96, (2, 8))
    peft(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in peft.parameters() if p.requires_grad)


# -- AutoPeftModel ---------------------------------------------------------------------------------------------------
def test_auto_peft_model_loads_base_from_config(tmp_path):
    BUILDERS["bert"]().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForSequenceClassification

    peft = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"),
                          LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "ad")
    assert PeftConfig.from_pretrained(tmp_path / "ad").base_model_name_or_path == str(tmp_path / "base")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "ad")
    assert isinstance(loaded, PeftModel) and not loaded.training
    b = batch_for("bert")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, b), logits_of(peft.eval(), b), rtol=0, atol=0)
        theirs = hf.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "ad")
        torch.testing.assert_close(logits_of(theirs, b), logits_of(loaded, b), rtol=0, atol=ATOL)
    assert isinstance(AutoPeftModel.from_pretrained(tmp_path / "ad"), PeftModel)
    with pytest.raises(ValueError, match="AutoPeftModelForSequenceClassification rather than AutoPeftModelForCausalLM"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ad")
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        AutoPeftModel()


def test_auto_peft_model_without_task_uses_auto_mapping(tmp_path):
    BUILDERS["llama"]().save_pretrained(tmp_path / "base")
    from transformers import LlamaForCausalLM

    peft = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "ad")
    written = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    assert written["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    loaded = AutoPeftModel.from_pretrained(tmp_path / "ad")
    assert type(loaded.get_base_model()) is LlamaForCausalLM
    b = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, b), logits_of(peft.eval(), b), rtol=0, atol=0)
        theirs = hf.AutoPeftModel.from_pretrained(tmp_path / "ad")  # HF reads our auto_mapping too
        torch.testing.assert_close(logits_of(theirs, b), logits_of(loaded, b), rtol=0, atol=ATOL)


# -- save_pretrained: .bin, model card; push_to_hub -----------------------------------------------------------------
def test_save_pretrained_pickle_format(tmp_path):
    _, ours = lora_pair()
    ours.save_pretrained(tmp_path / "st")
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin/adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    st, pk = load_file(tmp_path / "st/adapter_model.safetensors"), torch.load(tmp_path / "bin/adapter_model.bin",
                                                                           weights_only=True)
    assert set(st) == set(pk) and all(torch.equal(st[k], pk[k]) for k in st)
    b = batch_for("llama")
    with torch.no_grad():
        ref = logits_of(ours, b)
        torch.testing.assert_close(logits_of(PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "bin"), b), ref,
                                   rtol=0, atol=0)
        theirs = hf.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "bin")
        torch.testing.assert_close(logits_of(theirs, b), ref, rtol=0, atol=ATOL)
    ours.save_pretrained(tmp_path / "bin")  # back to safetensors: the stale .bin goes
    assert not (tmp_path / "bin/adapter_model.bin").exists()


def test_model_card_written_and_users_card_kept(tmp_path):
    from huggingface_hub import ModelCard

    peft = get_peft_model(BUILDERS["llama"](), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                          base_model_name_or_path="HuggingFaceTB/SmolLM2-135M"))
    peft.save_pretrained(tmp_path / "a")
    card = ModelCard.load(tmp_path / "a/README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "AutoModelForCausalLM" in card.text and "LORA" in card.text
    # unipeft's own method: the hub must not offer HF PEFT's loader
    own = get_peft_model(BUILDERS["llama"](), unipeft.AdapterConfig.houlsby(bottleneck_size=4))
    own.save_pretrained(tmp_path / "b")
    assert ModelCard.load(tmp_path / "b/README.md").data.library_name == "unipeft"
    own.save_pretrained(tmp_path / "a")  # our card is rewritten...
    assert ModelCard.load(tmp_path / "a/README.md").data.library_name == "unipeft"
    mine = "# my notes\nkeep me\n"
    (tmp_path / "a/README.md").write_text(mine)
    peft.save_pretrained(tmp_path / "a")  # ...the user's is not
    assert (tmp_path / "a/README.md").read_text() == mine


def test_push_to_hub_uploads_the_adapter_folder_only(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)
        return type("RepoUrl", (), {"repo_id": "me/" + repo_id.split("/")[-1]})()

    def upload_folder(self, *, repo_id, folder_path, **kw):
        from pathlib import Path

        files = {p.name: p.stat().st_size for p in Path(folder_path).iterdir()}
        calls["upload"] = (repo_id, files, kw)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    _, ours = lora_pair()
    assert ours.push_to_hub("my-adapter", private=True, commit_message="first") == "commit-info"
    repo, files, kw = calls["upload"]
    assert repo == "me/my-adapter" and calls["create"][1]["private"] is True and kw["commit_message"] == "first"
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    adapter_bytes = sum(v.numel() * v.element_size() for v in get_peft_model_state_dict(ours).values())
    assert files["adapter_model.safetensors"] < adapter_bytes + 4096  # the adapter, not the base model


AUTO_TASKS = {  # task -> (transformers class of the base, targets, our Auto class name)
    "TOKEN_CLS": ("BertForTokenClassification", ["query", "value"], "AutoPeftModelForTokenClassification"),
    "QUESTION_ANS": ("BertForQuestionAnswering", ["query", "value"], "AutoPeftModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("BertModel", ["query", "value"], "AutoPeftModelForFeatureExtraction"),
    "SEQ_2_SEQ_LM": ("T5ForConditionalGeneration", ["q", "v"], "AutoPeftModelForSeq2SeqLM"),
}


@pytest.mark.parametrize("task", sorted(AUTO_TASKS))
def test_auto_peft_model_for_each_task(task, tmp_path):
    import transformers

    cls_name, targets, auto_name = AUTO_TASKS[task]
    arch = "t5" if task == "SEQ_2_SEQ_LM" else "bert"
    src = BUILDERS[arch]()
    if task == "QUESTION_ANS":
        src.config.num_labels = 2  # start and end logits
    base = getattr(transformers, cls_name)(src.config)
    base.load_state_dict(src.state_dict(), strict=False)
    base.save_pretrained(tmp_path / "base")
    base = getattr(transformers, cls_name).from_pretrained(tmp_path / "base")
    peft = get_peft_model(base, LoraConfig(task_type=task, r=4, target_modules=targets, init_lora_weights=False)).eval()
    peft.save_pretrained(tmp_path / "ad")
    loaded = getattr(unipeft, auto_name).from_pretrained(tmp_path / "ad")
    assert type(loaded.get_base_model()) is type(peft.get_base_model())
    b = {k: v for k, v in batch_for(arch).items() if k != "labels"}
    if arch == "t5":
        b["decoder_input_ids"] = batch_for(arch)["labels"]

    def first(out):
        return out.last_hidden_state if task == "FEATURE_EXTRACTION" else (
            out.start_logits if task == "QUESTION_ANS" else out.logits)

    with torch.no_grad():
        ref = first(peft(**b))
        torch.testing.assert_close(first(loaded(**b)), ref, rtol=0, atol=0)
        theirs = getattr(hf, auto_name).from_pretrained(str(tmp_path / "ad"))
        torch.testing.assert_close(first(theirs(**b)), ref, rtol=0, atol=ATOL)


def test_hf_written_pickle_folder_loads(tmp_path):
    theirs, _ = lora_pair()
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    ours = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)
    b = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ours, b), logits_of(theirs, b), rtol=0, atol=ATOL)


PROMPT_METHODS = {  # HF config, our config: the same prompt-learning adapter
    "prompt": (lambda: hf.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
               lambda: unipeft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)),
    "p_tuning": (lambda: hf.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16),
                 lambda: unipeft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16)),
}


@pytest.mark.parametrize("method", sorted(PROMPT_METHODS))
def test_prompt_state_dicts_against_hf(method):
    """HF PEFT's state dict of a prompt method loads through set_peft_model_state_dict with the same outputs, and
    ours holds every key HF's has (plus, for P-tuning, the encoder weights that let training resume)."""
    theirs = hf.get_peft_model(BUILDERS["bert"](), PROMPT_METHODS[method][0]()).eval()
    sd = hf.get_peft_model_state_dict(theirs)
    ours = get_peft_model(BUILDERS["bert"](), PROMPT_METHODS[method][1]()).eval()
    assert set(sd) <= set(get_peft_model_state_dict(ours))
    set_peft_model_state_dict(ours, sd)
    b = batch_for("bert")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(ours, b), logits_of(theirs, b), rtol=0, atol=ATOL)

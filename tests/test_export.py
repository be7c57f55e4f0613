"""`unipeft export --format merged|gguf|peft` on tiny models built here (a byte-level BPE tokenizer trained on a few
sentences with a ChatML template, so GGUF files stay small and load fast).

Oracles: HF PEFT's own merge of the same adapter file (merged, GGUF) and HF PEFT loading the exported folder (peft);
GGUF files are read back with transformers (`gguf_file=`), which undoes llama.cpp's Q/K permutation on its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_cli import cli_in_process, fails

peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = "Hello world, 123 tests! The quick brown fox jumps."


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
              "numbers like 123 and 4567 appear", "a tiny tokenizer for tests"] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def save_base(folder: Path, family="llama", tied=True, dtype=torch.float32, seed=0):
    import transformers

    tok = tiny_tokenizer()
    cls, cfg = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                "mistral": ("MistralForCausalLM", "MistralConfig"), "gpt2": ("GPT2LMHeadModel", "GPT2Config")}[family]
    kw = ({"n_embd": 32, "n_layer": 2, "n_head": 4} if family == "gpt2" else
          {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.05})
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, cfg)(
        vocab_size=len(tok), tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **kw)).eval()
    model.to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_adapter(base: Path, folder: Path, seed=1, **lora):
    """A LoRA adapter with random (non-zero) B, saved by unipeft in its run layout."""
    from transformers import AutoModelForCausalLM

    from unipeft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    opts = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], **lora}
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **opts))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    pm.save_pretrained(folder / "adapter")
    return folder


def hf_merged(base: Path, run: Path):
    """The oracle: HF PEFT loads the same adapter file and merges it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, run / "adapter").merge_and_unload().eval()


def logits(model, tok, text=TEXT):
    with torch.no_grad():
        return model(tok(text, return_tensors="pt").input_ids).logits


def load_gguf(folder: Path, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return m, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def rounded_like_file(model, gguf_type: str):
    """`model` with each weight rounded as the GGUF file stores it (1-D tensors stay fp32): the exact expectation."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in out.named_parameters():
            if p.dim() < 2:
                continue
            if gguf_type == "f16":
                p.copy_(p.half().float())
            elif gguf_type == "q8_0":
                q = gguf.GGMLQuantizationType.Q8_0
                deq = gguf.quants.dequantize(gguf.quants.quantize(p.numpy().astype(np.float32), q), q)
                p.copy_(torch.from_numpy(np.ascontiguousarray(deq)).reshape(p.shape))
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    save_base(root / "llama")
    save_adapter(root / "llama", root / "run")
    return root


def export(ws, capsys, *args, ok=True):
    p = cli_in_process("export", *map(str, args), cwd=ws, capsys=capsys)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


# -- GGUF ------------------------------------------------------------------------------------------------------
# F32 is exact. F16 and Q8_0 are exact against the merged model with its weights rounded as the file stores them
# (this checks names, permutation and block layout), and close to the unrounded merged model. The loose bounds,
# relative to the largest logit: F16 keeps 11 significant bits (a relative error <= 2^-11 = 4.9e-4 per weight;
# measured 5.2e-4 on the logits), bound 2e-3. Q8_0 stores each block of 32 weights as int8 times absmax/127, an error
# up to absmax/254 per weight (~0.4% of the block's largest weight, ~16x F16's); measured 1.4%, bound 5%.
@pytest.mark.parametrize("gguf_type,loose", [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 5e-2)])
def test_gguf_round_trips_through_transformers(ws, capsys, gguf_type, loose):
    out = ws / f"gguf_{gguf_type}"
    p = export(ws, capsys, "--adapter", ws / "run", "--model", ws / "llama", "--format", "gguf",
               "--gguf-type", gguf_type, "--out", out)
    name = f"model-{gguf_type}.gguf"
    assert name in p.stdout and " 0B" not in p.stdout and (out / "Modelfile").read_text() == f"FROM ./{name}\n"
    reader = gguf.GGUFReader(out / name)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types  # tied: no output tensor
    assert types["blk.0.attn_q.weight"] == gguf_type.upper()
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt2"

    ref = hf_merged(ws / "llama", ws / "run")
    model, tok = load_gguf(out, name)
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    got, want = logits(model, tok), logits(ref, tok)
    exact = logits(rounded_like_file(ref, gguf_type), tok)
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=0)
    assert (got - want).abs().max() <= loose * want.abs().max()
    if gguf_type != "f32":
        assert (got - want).abs().max() > 0  # the rounding is real, so the exact check above is not vacuous


def test_gguf_tokenizer_metadata_round_trips(ws, capsys):
    out = ws / "gguf_tok"
    export(ws, capsys, "--adapter", ws / "run", "--model", ws / "llama", "--format", "gguf", "--gguf-type", "f32",
           "--out", out)
    from transformers import AutoTokenizer

    orig = AutoTokenizer.from_pretrained(ws / "llama")
    _, back = load_gguf(out, "model-f32.gguf")
    assert back(TEXT).input_ids == orig(TEXT).input_ids
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert back.apply_chat_template(chat, tokenize=False) == orig.apply_chat_template(chat, tokenize=False)
    assert (back.bos_token, back.eos_token, back.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert back("<|im_start|>user").input_ids[0] == orig.convert_tokens_to_ids("<|im_start|>")  # a control token
    types = gguf.GGUFReader(out / "model-f32.gguf").fields["tokenizer.ggml.token_type"]
    assert [int(types.parts[i][0]) for i in types.data[:4]] == [3, 3, 3, 1]  # 3 specials CONTROL, then NORMAL


def test_gguf_untied_head_qwen2_and_mistral(tmp_path, capsys):
    """An untied output layer is written as output.weight; Qwen2 keeps HF's rotary rows and its q/k/v biases;
    Mistral without a sliding window is a Llama to llama.cpp."""
    for family, tied in (("llama", False), ("qwen2", True), ("mistral", False)):
        base, run, out = tmp_path / f"{family}-tiny", tmp_path / f"run_{family}", tmp_path / f"out_{family}"
        save_base(base, family, tied=tied)
        save_adapter(base, run)
        export(tmp_path, capsys, "--adapter", run, "--model", base, "--format", "gguf", "--gguf-type", "f32",
               "--out", out)
        reader = gguf.GGUFReader(out / "model-f32.gguf")
        names = {t.name for t in reader.tensors}
        assert ("output.weight" in names) == (not tied)
        # transformers gives a qwen2 model Qwen2's own split regex: exported under llama.cpp's name for it
        assert reader.fields["tokenizer.ggml.pre"].contents() == {"qwen2": "qwen2"}.get(family, "gpt2")
        assert reader.fields["general.architecture"].contents() == {"qwen2": "qwen2"}.get(family, "llama")
        if family == "qwen2":
            assert "blk.0.attn_q.bias" in names
        ref = hf_merged(base, run)
        model, tok = load_gguf(out, "model-f32.gguf")
        torch.testing.assert_close(logits(model, tok), logits(ref, tok), atol=1e-5, rtol=0)
        from transformers import AutoTokenizer

        assert tok(TEXT).input_ids == AutoTokenizer.from_pretrained(base)(TEXT).input_ids


def test_gguf_refuses_unmapped_families_and_unmergeable_methods(tmp_path, capsys):
    base, run = save_base(tmp_path / "gpt2", "gpt2"), tmp_path / "run_gpt2"
    save_adapter(base, run, target_modules=["c_attn"])
    p = export(tmp_path, capsys, "--adapter", run, "--model", base, "--format", "gguf", "--out", tmp_path / "o",
               ok=False)
    fails(p, "does not map the 'gpt2' family", "llama, mistral, qwen2", "--format merged")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))  # no output, no temp folder left

    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    from unipeft.io.gguf_export import GGUFExportError, write_gguf

    windowed = MistralForCausalLM(MistralConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, num_key_value_heads=2, sliding_window=16))
    with pytest.raises(GGUFExportError, match="sliding_window=16 below the context length"):
        write_gguf(windowed, tiny_tokenizer(), tmp_path / "w.gguf")
    assert not (tmp_path / "w.gguf").exists()

    from unipeft import get_peft_model, methods

    llama = save_base(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(llama)
    get_peft_model(model, methods()["houlsby"].factory(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "h/adapter")
    for fmt in ("gguf", "merged"):
        p = export(tmp_path, capsys, "--adapter", tmp_path / "h", "--model", llama, "--format", fmt, ok=False)
        fails(p, "cannot be merged", "llama.cpp, Ollama", "vLLM, SGLang", "transformers + unipeft")


# -- merged ----------------------------------------------------------------------------------------------------
def test_merged_is_written_in_the_base_dtype(tmp_path, capsys):
    from safetensors.torch import load_file

    base = save_base(tmp_path / "bf16", dtype=torch.bfloat16)
    save_adapter(base, tmp_path / "run")
    export(tmp_path, capsys, "--adapter", tmp_path / "run/adapter", "--model", base, "--format", "merged")
    out = tmp_path / "run" / "export-merged"  # the default output: beside the adapter, in the run folder
    got = load_file(out / "model.safetensors")
    want = {k: v.to(torch.bfloat16) for k, v in hf_merged(base, tmp_path / "run").state_dict().items()}
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    for k, v in got.items():
        assert torch.equal(v, want[k]), k
    assert (out / "tokenizer.json").is_file()

    p = export(tmp_path, capsys, "--adapter", tmp_path / "run", "--model", base, "--format", "merged", ok=False)
    fails(p, "already exists", "--overwrite")
    export(tmp_path, capsys, "--adapter", tmp_path / "run", "--model", base, "--format", "merged", "--overwrite")
    assert sorted(x.name for x in tmp_path.joinpath("run").iterdir()) == ["adapter", "export-merged"]


# -- peft (vLLM / SGLang) --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}, {"use_rslora": True, "rank_pattern": {"v_proj": 2}}],
                         ids=["lora", "rslora", "rslora-rank-pattern"])
def test_peft_folder_loads_in_hf_peft_with_our_logits(tmp_path, capsys, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipeft import PeftModel

    base = save_base(tmp_path / "llama")
    run = save_adapter(base, tmp_path / "run", **lora)
    out = tmp_path / "served"
    export(tmp_path, capsys, "--adapter", run, "--model", base, "--format", "peft", "--out", out)
    assert sorted(x.name for x in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False  # folded for runtimes that ignore the flag
    if lora == {"use_rslora": True}:  # into α: α' = α·√r
        assert cfg["lora_alpha"] == pytest.approx(8 * 2.0)
    else:  # per-module ranks: into each lora_B (×√r_m), α and the patterns as saved
        assert cfg["lora_alpha"] == 8 and (cfg.get("rank_pattern") or {}) == lora.get("rank_pattern", {})
        saved = load_file(run / "adapter" / "adapter_model.safetensors")
        served = load_file(out / "adapter_model.safetensors")
        for k, v in saved.items():
            r = saved[k.replace("lora_B", "lora_A")].shape[0] if "lora_B" in k else None
            want_k = v * math.sqrt(r) if "lora_B" in k and lora.get("use_rslora") else v
            torch.testing.assert_close(served[k], want_k, rtol=1e-6, atol=0)

    tok = AutoTokenizer.from_pretrained(base)
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "adapter").eval()
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    want = logits(ours, tok)
    assert (want - logits(plain, tok)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(logits(hf, tok), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora,why", [({"use_dora": True}, "DoRA"), ({"init_lora_weights": "pissa"}, "pissa")])
def test_peft_refuses_what_runtimes_cannot_load(tmp_path, capsys, lora, why):
    base = save_base(tmp_path / "llama")
    run = save_adapter(base, tmp_path / "run", **lora)
    p = export(tmp_path, capsys, "--adapter", run, "--model", base, "--format", "peft", ok=False)
    fails(p, "not a plain LoRA adapter", why, "vLLM, SGLang", "llama.cpp, Ollama", "--format merged")
    assert not (run / "export-peft").exists()


def test_peft_refuses_other_methods(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from unipeft import IA3Config, get_peft_model

    base = save_base(tmp_path / "llama")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), IA3Config(task_type="CAUSAL_LM")).save_pretrained(
        tmp_path / "run/adapter")
    p = export(tmp_path, capsys, "--adapter", tmp_path / "run", "--model", base, "--format", "peft", ok=False)
    fails(p, "IA3 adapter, not LoRA", "transformers + unipeft", "--format merged")


def test_export_help_and_bad_format(capsys):
    from unipeft.cli.main import build_parser

    for cmd in ("export", "chat"):
        with pytest.raises(SystemExit):
            build_parser([]).parse_args([cmd, "--help"])
        assert "usage: unipeft " + cmd in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser([]).parse_args(["export", "--adapter", "x", "--format", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_gguf_of_an_ia3_adapter_without_model_flag(tmp_path, capsys):
    """IA3 merges by scaling rows/columns (k, v, down_proj): the scaled K rows must still be permuted right. The base
    comes from the adapter's own config (no --model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipeft import IA3Config, get_peft_model

    base = save_base(tmp_path / "llama")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), IA3Config(task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.uniform_(0.5, 1.5)
    pm.save_pretrained(tmp_path / "run/adapter")
    assert json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    export(tmp_path, capsys, "--adapter", tmp_path / "run", "--format", "gguf", "--gguf-type", "f32")
    model, _ = load_gguf(tmp_path / "run/export-gguf", "model-f32.gguf")
    tok = AutoTokenizer.from_pretrained(base)
    ref = hf_merged(base, tmp_path / "run")
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    assert (logits(ref, tok) - logits(plain, tok)).abs().max() > 1e-2
    torch.testing.assert_close(logits(model, tok), logits(ref, tok), atol=1e-5, rtol=0)


def test_overwrite_never_replaces_the_adapter_or_the_base(tmp_path, capsys):
    """--overwrite replaces an earlier export, never a folder the export reads from (the run, the adapter, the base)."""
    base = save_base(tmp_path / "llama")
    run = save_adapter(base, tmp_path / "run")
    for out in (run, run / "adapter", base, tmp_path):
        p = export(tmp_path, capsys, "--adapter", run, "--model", base, "--format", "peft", "--out", out,
                   "--overwrite", ok=False)
        fails(p, "holds the adapter or the base model", "--out")
        assert (run / "adapter" / "adapter_model.safetensors").is_file() and (base / "config.json").is_file()
    export(tmp_path, capsys, "--adapter", run, "--model", base, "--format", "peft", "--out", run / "served",
           "--overwrite")
    assert (run / "served" / "adapter_config.json").is_file()

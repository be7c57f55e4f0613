"""Quantize a model's linears in place, or build a quantized model layer by layer without ever holding
its full-precision weights: parameters are created on the meta device, then each linear is materialized
(from safetensors shards, or randomly for shape-only benchmarks), quantized, and its float copy dropped
before the next one. Peak host memory ≈ the quantized model + one float linear.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..compat import model_from_config, move_hooks
from ..names import matches
from ..training.hostmem import release_free_memory  # building one float linear at a time leaves free heap behind
from .schemes import SCHEMES, quantized_linear, unsupported_shape
from ..memory.stream import LayerStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """How the frozen base is stored. `skip`: linear names (or '.name' suffixes) kept in full precision;
    the output head is always kept (it is usually tied to the input embeddings)."""

    scheme: str = "nf4"  # "nf4" (4-bit NormalFloat, QLoRA) | "int8" (LLM.int8() weight-only) | "fp8" (e4m3; Hopper, Ada, CPU)
    compute_dtype: torch.dtype = torch.bfloat16
    double_quant: bool = True  # nf4: quantize the block absmax too (≈0.37 bit/weight saved)
    blocksize: int = 64
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; choose one of {SCHEMES}")


def as_quantization(q: Union[str, Quantization], compute_dtype=None) -> Quantization:
    q = Quantization(scheme=q) if isinstance(q, str) else q
    return q if compute_dtype is None else Quantization(**{**q.__dict__, "compute_dtype": compute_dtype})


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at `name`, carrying over the old module's children and hooks (installed deltas keep working)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = parent.get_submodule(attr)
    have = dict(new.named_children())
    for child_name, child in old.named_children():
        if child_name not in have:
            new.add_module(child_name, child)
    move_hooks(old, new)
    new.train(old.training)
    setattr(parent, attr, new)
    return old


def _quantizable(model: nn.Module, q: Quantization):
    """The frozen linears: inside the base model (task heads such as `classifier` or `score` train, so they stay
    in full precision), never the output head, never `skip`, never a shape the scheme cannot take (logged)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    inside = {id(m) for m in base.modules()} if base is not model else None
    for name, mod in list(model.named_modules()):
        if (type(mod) is nn.Linear and mod is not head and (inside is None or id(mod) in inside)
                and not matches(name, q.skip)):
            why = unsupported_shape(q.scheme, mod.weight.shape)
            if why:
                logger.warning("%s stays in %s: %s", name, q.compute_dtype, why)
                continue
            yield name, mod


@torch.no_grad()
def quantize_model(model: nn.Module, quantization: Union[str, Quantization] = "nf4", *, compute_dtype=None) -> nn.Module:
    """Replace every nn.Linear of `model` (but the output head and `skip`) by its quantized form, one at a
    time, and cast the remaining floating parameters to the compute dtype. Returns `model` (changed in place)."""
    q = as_quantization(quantization, compute_dtype)
    n = 0
    for name, mod in _quantizable(model, q):
        new = quantized_linear(mod.weight, mod.bias, q.scheme, q.compute_dtype, double_quant=q.double_quant,
                               blocksize=q.blocksize, device=mod.weight.device)
        swap_module(model, name, new)
        mod.weight = None  # free the float weight now, not when the loop ends
        n += 1
    _cast_floats(model, q.compute_dtype)
    release_free_memory()
    logger.info("quantized %d linears of %s to %s", n, type(model).__name__, q.scheme)
    return model


def _cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


# --------------------------------------------------------------------------- building layer by layer


_meta_scope = threading.local()  # set in the threads building on meta
_meta_lock = threading.Lock()
_meta_hook: list = []  # [RemovableHandle, number of threads inside] while any thread builds on meta


def _param_on_meta(module, name, param):
    if getattr(_meta_scope, "on", False) and param is not None and param.device.type != "meta":
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    return None


@contextlib.contextmanager
def params_on_meta():
    """Create module parameters on the meta device in this thread (buffers stay real: rotary tables and the
    like). torch's public parameter-registration hook is global, so it acts only where this thread-local scope
    is on; other threads building modules meanwhile are untouched."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    with _meta_lock:
        if not _meta_hook:
            _meta_hook[:] = [register_module_parameter_registration_hook(_param_on_meta), 0]
        _meta_hook[1] += 1
    was = getattr(_meta_scope, "on", False)
    _meta_scope.on = True
    try:
        yield
    finally:
        _meta_scope.on = was
        with _meta_lock:
            _meta_hook[1] -= 1
            if not _meta_hook[1]:
                _meta_hook.pop(0).remove()
                _meta_hook.clear()


Source = Callable[[str, torch.Size, torch.dtype], Optional[torch.Tensor]]  # name, shape, dtype -> tensor | None


def safetensors_source(folder: Union[str, Path]) -> Source:
    """Read parameters by name from a HF folder's safetensors file(s) (sharded or not), one at a time."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        f = folder / "model.safetensors"
        with safe_open(str(f), framework="pt") as h:
            where = {k: f for k in h.keys()}

    def read(name, shape, dtype):
        f = where.get(name)
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as h:  # opened per tensor: read pages leave the process
            return h.get_tensor(name).to(dtype)

    return read


def random_source(std: float = 0.02, seed: int = 0, device="cpu") -> Source:
    """Random weights with the right shapes (norm weights 1, biases 0): for memory and speed benchmarks."""
    g = torch.Generator(device).manual_seed(seed)

    def make(name, shape, dtype):
        if name.endswith("bias"):
            return torch.zeros(shape, dtype=dtype, device=device)
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)

    return make


def _with_prefix(source: Source, prefix: str) -> Source:
    """Checkpoints of a bare base model (`layers.0...`) load into a model with a head (`model.layers.0...`) and
    back, as `from_pretrained` allows."""
    if not prefix:
        return source
    p = prefix + "."

    def read(name, shape, dtype):
        t = source(name, shape, dtype)
        if t is None:
            t = source(name[len(p):], shape, dtype) if name.startswith(p) else source(p + name, shape, dtype)
        return t

    return read


def _read(source: Source, name: str, shape, dtype, fill: Source | None = None, filled: list | None = None) -> torch.Tensor:
    t = source(name, shape, dtype)
    if fill is not None and (t is None or tuple(t.shape) != tuple(shape)):
        filled.append(name if t is None else f"{name} (checkpoint shape {tuple(t.shape)})")
        t = fill(name, shape, dtype)
    if t is None:
        raise KeyError(f"{name} is not in the checkpoint")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(shape)}")
    return t if t.dtype == dtype else t.to(dtype)


@torch.no_grad()
def load_quantized(config_or_path, quantization: Union[str, Quantization] = "nf4", *, source: Source | None = None,
                   model_class=None, compute_dtype=None, device="cpu", stream: bool = False,
                   fill: Source | None = None) -> nn.Module:
    """Build a quantized model without materializing its full-precision weights.

    `config_or_path`: a HF folder (its safetensors are the source unless `source` is given) or a config
    (then `source` is required, e.g. `random_source()`). `model_class`: an Auto class or a concrete one
    (default AutoModelForCausalLM); checkpoint names may lack or carry its base-model prefix.
    `device`: where the quantized model lives (each float linear is quantized there, then dropped).
    `stream`: the quantized layers wait in pinned host memory and visit `device` one layer at a time
    (unipeft.memory.stream; training then needs gradient checkpointing).
    `fill`: makes the full-precision tensors the checkpoint lacks or holds at another shape (a new task head:
    `random_source(config.initializer_range)`); logged. Quantized linears always come from the checkpoint.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    q = as_quantization(quantization, compute_dtype)
    if stream and q.scheme != "nf4":
        raise ValueError(f"stream=True streams NF4 layers (bitsandbytes' 4-bit weights), not {q.scheme}: build the "
                         f"base in nf4, or drop stream")
    if isinstance(config_or_path, PretrainedConfig):
        config = config_or_path
        if source is None:
            raise ValueError("building from a config needs a weight source, e.g. unipeft.quant.random_source()")
    else:
        config = AutoConfig.from_pretrained(str(config_or_path))
        source = source or safetensors_source(config_or_path)
    with params_on_meta():
        cls = model_class or AutoModelForCausalLM
        model = model_from_config(cls, config, q.compute_dtype)  # an Auto class, or a concrete one
    source = _with_prefix(source, getattr(model, "base_model_prefix", ""))
    streamer = LayerStream(device) if stream else None
    filled: list[str] = []
    for name, mod in _quantizable(model, q):
        W = _read(source, f"{name}.weight", mod.weight.shape, q.compute_dtype)
        b = None if mod.bias is None else _read(source, f"{name}.bias", mod.bias.shape, q.compute_dtype)
        linear = quantized_linear(W, b, q.scheme, q.compute_dtype, double_quant=q.double_quant,
                                  blocksize=q.blocksize, device=device)
        del W, b
        if streamer is not None:
            streamer.park(linear)  # to the host now: the device holds one linear at a time while building
        swap_module(model, name, linear)
    tied = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    for mname, mod in model.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            if tied and mod is head and pname == "weight":
                continue  # tied to the input embeddings below
            full = f"{mname}.{pname}" if mname else pname
            t = _read(source, full, p.shape, q.compute_dtype, fill, filled)
            setattr(mod, pname, nn.Parameter(t.to(device), requires_grad=False))
    if filled:
        logger.warning("not in the checkpoint, newly initialized (train them): %s", ", ".join(filled))
    if tied and head is not None:
        head.weight = model.get_input_embeddings().weight
    model.to(device)  # buffers (rotary tables); parked linears skip device moves (memory.stream)
    if streamer is not None:
        streamer.attach(model)
    model.requires_grad_(False)
    model.eval()
    release_free_memory()
    return model

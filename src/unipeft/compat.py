"""The one place that relies on private internals of torch, transformers and bitsandbytes.

Everything else in unipeft uses public APIs. Each function below names the private thing it touches and why no
public API serves (the table in docs/design-notes.md, "Private APIs we rely on"); tests/test_compat.py has one
test per private thing, named after it, so a release that changes one fails that test, not a user's run.
(transformers / accelerate / TRL's "is this a PEFT model?" predicates are extended in
unipeft/integrations/compat.py, which lists and tests its own private names.)

Only torch is imported here at load time; transformers and bitsandbytes are imported where needed.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
from typing import Callable

import torch
from torch import nn

# --------------------------------------------------------------------------------------------------- torch


def compiled_original(model):
    """The module `torch.compile(module)` wraps, or `model` itself. Private: `OptimizedModule._orig_mod` (torch
    exposes no accessor; transformers and accelerate read the same attribute)."""
    return getattr(model, "_orig_mod", model)


def is_compiled(model) -> bool:
    return hasattr(model, "_orig_mod")


def _children_only(self: nn.Module, fn, recurse=True):
    for child in self.children():  # deltas attached to the module still follow .to()
        child._apply(fn)
    return self


def keep_own_tensors_on_conversion(module: nn.Module) -> None:
    """`.to()`, `.cuda()`, `.half()`, ... on the model leave `module`'s own tensors where and what they are (its
    children still convert). Private: `nn.Module._apply`, the one method every conversion goes through; torch
    has no public hook on conversions (register_module_*_hooks cover forward/backward/registration only)."""
    module._apply = types.MethodType(_children_only, module)


class ConvertsItself:
    """Mixin for a module that decides itself what a conversion (`.to()`, `.cuda()`, `.half()`, ...) does to it:
    `convert(fn)` gets the conversion as a tensor -> tensor function. Private: `nn.Module._apply` (as above)."""

    def convert(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        self.convert(fn)
        return self


def own_parameter(module: nn.Module, name: str):
    """`module`'s parameter registered as `name` (KeyError if none), for a class that defines a property of the
    same name (deltas whose parameters may live elsewhere, deltas/base.py). Private: `nn.Module._parameters`;
    `getattr` would call the property itself, and `named_parameters()` costs a walk per forward."""
    return module._parameters[name]


# nn.Module's hook dicts (and the flag saying its backward hooks are full ones). Private: torch offers registration
# (register_forward_hook, ...) and RemovableHandle but no way to list a module's hooks or move them to another.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_is_full_backward_hook",)


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give `new` the hooks registered on `old` (the same dicts, so their RemovableHandles still remove them):
    a module swapped in place of a hooked one keeps its deltas working."""
    for name in _HOOK_DICTS:
        if getattr(old, name, None):
            setattr(new, name, getattr(old, name))
    for name in _HOOK_FLAGS:
        if getattr(old, name, None) is not None:
            setattr(new, name, getattr(old, name))


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward (pre-)hooks are registered on `module` itself (global hooks not counted)."""
    return any(getattr(module, name, None) for name in ("_forward_hooks", "_forward_pre_hooks",
                                                          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"))


_FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                       "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextlib.contextmanager
def forward_hooks_off(model: nn.Module):
    """Inside the block no module of `model` runs its own forward (pre-)hooks; they are all back on exit.

    For computing a derived tensor (an MLP-made prefix table) from values a caller already holds in full, on one
    process: DeepSpeed ZeRO-3's hooks on those submodules would otherwise gather their partitioned parameters (a
    collective that rank 0 alone would run, and that fails on the plain tensors swapped in). Private: the hook
    dicts of nn.Module (torch has no public way to suspend a module's hooks without their RemovableHandles, which
    the engine keeps)."""
    saved = [(m, {n: getattr(m, n) for n in _FORWARD_HOOK_DICTS if getattr(m, n, None)}) for m in model.modules()]
    saved = [(m, d) for m, d in saved if d]
    try:
        for m, d in saved:
            for n, hooks in d.items():
                setattr(m, n, type(hooks)())
        yield
    finally:
        for m, d in saved:
            for n, hooks in d.items():
                setattr(m, n, hooks)  # the same dicts: the engine's RemovableHandles still remove them


def runs_first_after_forward(module: nn.Module, hook_id: int) -> bool:
    """Whether the forward hook registered with handle id `hook_id` is the first code to see `module`'s output: no
    global forward hooks and no earlier hook of its own (then the output is a tensor nobody else holds yet). Private:
    `nn.Module._forward_hooks` (ordered by registration) and torch's `_global_forward_hooks`."""
    from torch.nn.modules import module as module_mod

    if module_mod._global_forward_hooks:
        return False
    return next(iter(module._forward_hooks), None) == hook_id


def autocast_dtype(device_type: str):
    """The dtype autocast computes in on `device_type`, None when it is off there. torch ≥ 2.4 takes the device type;
    2.2–2.3 (our floor) have per-device functions for CUDA and the CPU only."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """(a·b)·scale_a·scale_b for float8 a (m, k; row-major) and b (k, n; column-major), fp32 scales of shape (m, 1)
    and (1, n) (or scalars), in `out_dtype` (written into `out`, an (m, n) tensor, if given). Private:
    `torch._scaled_mm`, the FP8 GEMM torchao's float8 training and transformers' FP8 integrations call; torch has no
    public FP8 matmul yet (quant/fp8.py)."""
    if out is None:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, out=out)


def compile_rows_dynamic(t: torch.Tensor) -> torch.Tensor:
    """Mark `t` (rows, k) for torch.compile: its row count may change between calls without a recompile, its width
    may not (a kernel per width: widths are few, a model's layer sizes; with the width symbolic too, the reduction
    kernel is generic and the FP8 step lost two thirds of its gain on an H100). Private: `torch._dynamo`'s
    `maybe_mark_dynamic` and `mark_static`; torch.compile's public `dynamic=` sets every dimension at once."""
    torch._dynamo.maybe_mark_dynamic(t, 0)
    torch._dynamo.mark_static(t, 1)
    return t


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's version counter (bumped by every in-place change: optimizer steps, copy_, load_state_dict).
    Private: `Tensor._version` (torch has no public accessor; autograd checks saved tensors with the same counter).
    Used to reuse a prefix MLP's pass table only while its parameters are unchanged (deltas/prefix.py), FP8's
    quantized input while x is unchanged (quant/fp8.py), and a grouped linear's left output (positions/host_group.py)."""
    return t._version


# ------------------------------------------------------------------------------------------------ deepspeed


def zero_fp32_partitions(zero_optimizer) -> list[torch.Tensor]:
    """The flat fp32 master partitions a DeepSpeed ZeRO-3 optimizer runs its torch optimizer on (one per
    sub-group), whose optimizer state a resumed run must create before DeepSpeed's public `safe_set_full_*` can
    fill it (the torch optimizer creates it only at its first step). Private: `fp32_partitioned_groups_flat`
    (the torch optimizer's param_groups are emptied between its steps); DeepSpeed exposes the partitions through
    no public call."""
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None:
        raise TypeError(f"{type(zero_optimizer).__name__}: no fp32 master partitions found (DeepSpeed changed its "
                        f"ZeRO optimizer; see unipeft/compat.py)")
    return list(flats)


# -------------------------------------------------------------------------------------------- transformers


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on for `model` (False for a model without the flag).
    transformers 5 names it `is_activation_checkpointing`; `is_gradient_checkpointing` is its deprecated alias,
    which warns on every read and goes in v6."""
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), flag):
            return bool(getattr(model, flag))
    return False


def attn_implementation(config) -> str | None:
    """The attention implementation a transformers config dispatches to. Private: `PretrainedConfig
    ._attn_implementation`; transformers has a public setter (`PreTrainedModel.set_attn_implementation`) but no
    public getter (its own modeling files read this attribute)."""
    return config._attn_implementation


def set_config_attn_implementation(config, name: str | None) -> None:
    """Set a config's attention implementation where no PreTrainedModel owns it, so the public
    `set_attn_implementation` cannot reach it (an attention module's own config, an unregistered sub-config),
    or to restore None. Private: the `PretrainedConfig._attn_implementation` setter."""
    config._attn_implementation = name


def eager_attention_of(module: nn.Module):
    """The eager attention function of `module`'s modeling file, which its forward passes to the
    AttentionInterface as the default for "eager". Private convention: every modeling_<model>.py defines
    `eager_attention_forward`; transformers exports no per-model eager function."""
    fn = getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to fall back to")
    return fn


def calls_attention_interface(module_class: type) -> bool:
    """Whether an attention class's forward dispatches through transformers' AttentionInterface. Private:
    the source of the forward names `ALL_ATTENTION_FUNCTIONS` (transformers' own
    `_can_set_attn_implementation` reads module source the same way); there is no public flag per class."""
    try:
        src = inspect.getsource(module_class.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


def set_checkpoint_function(model: nn.Module, fn: Callable) -> None:
    """Make the layers of a transformers model that `activation_checkpointing_enable` turned on checkpoint with
    `fn(function, *args, **kwargs)`. Private: `GradientCheckpointingLayer._gradient_checkpointing_func`, which
    transformers sets; its public `offload=True` pins host memory unconditionally and fails without an
    accelerator, and there is no public way to pass a checkpoint function."""
    for m in model.modules():
        if hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = fn


def model_from_config(cls, config, dtype: torch.dtype):
    """A transformers model of `cls` (an Auto class, or a concrete one) built from `config` in `dtype`. An Auto
    class's `from_config` is public; a concrete class has no public equivalent of `_from_config` (which applies
    the dtype and transformers' init contexts), so this uses the private classmethod."""
    make = getattr(cls, "from_config", None) or cls._from_config
    return make(config, dtype=dtype)


# ------------------------------------------------------------------------------------------- bitsandbytes


def unpack_4bit_for_cpu(weight) -> None:
    """Put a bitsandbytes 4-bit weight back in its portable layout, in place (weight and quant state together, as
    bitsandbytes' own `.cuda()` and `state_dict()` do): on CPU an eval forward may repack it for an AVX512-BF16
    kernel (`quant_state.packing_format_for_cpu`), a layout `dequantize_4bit` cannot read. A later eval forward
    repacks it. Private: `bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`; the public routes
    (`state_dict()`, `.cuda()`) unpack only as a side effect of something else."""
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)

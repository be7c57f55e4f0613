"""get_peft_model_state_dict / set_peft_model_state_dict: the adapter's tensors under the keys of the file
save_pretrained writes (HF PEFT's layout, adapter name not in the keys)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .compat import compiled_original, is_compiled
from .inject_adapter import INJECTED
from .io.keys import file_keys
from .peft_model import PeftModel


class LoadResult(NamedTuple):
    """What set_peft_model_state_dict returns (loading is strict: anything that does not fit raises)."""

    missing_keys: list
    unexpected_keys: list


def _check_adapter(names, adapter_name: str) -> None:
    if adapter_name not in names:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {sorted(names)}")


def _injected(model, adapter_name):
    adapters = model.__dict__.get(INJECTED)
    if not adapters:
        raise TypeError(f"{type(model).__name__} has no unipeft adapter: pass the PeftModel from get_peft_model, "
                        f"or a model from inject_adapter_in_model")
    _check_adapter(adapters, adapter_name)
    return adapters[adapter_name]


def _unwrap(model):
    return compiled_original(model)  # torch.compile's wrapper


def get_peft_model_state_dict(model: nn.Module, state_dict: dict | None = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as in adapter_model.safetensors. With `state_dict` (e.g. gathered from a
    sharded model) the values are taken from it, by the model's own parameter names."""
    if save_embedding_layers is True:
        raise NotImplementedError("save_embedding_layers=True: unipeft never saves the base model's embedding "
                                  "layers with an adapter")
    model = _unwrap(model) if unwrap_compiled or is_compiled(model) else model
    if isinstance(model, PeftModel):
        _check_adapter(model.peft_config, adapter_name)  # any adapter, active or not (HF PEFT)
        if state_dict is None:
            return model.adapter_state_dict(adapter_name)
        if model._exports(adapter_name):
            raise ValueError(f"get_peft_model_state_dict(state_dict=...) for {model._config(adapter_name).peft_type}: "
                             f"its file holds tensors derived from the weights, which a state_dict does not give; "
                             f"call it without state_dict")
        keys = {k: p for k, (_, p) in model._file_keys(adapter_name).items()}
    else:
        cfg, handle = _injected(model, adapter_name)
        keys = {k: p for k, (_, p) in file_keys(handle, hf_names=cfg.hf_format, prefix="").items()}
        if state_dict is None:
            return {k: p.detach() for k, p in keys.items()}
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    missing = [n for n in (names[id(p)] for p in keys.values()) if n not in state_dict]
    if missing:
        raise KeyError(f"state_dict lacks {len(missing)} adapter tensor(s), e.g. {missing[:3]}; pass the model's "
                       f"state_dict() (or leave state_dict=None)")
    return {k: state_dict[names[id(p)]] for k, p in keys.items()}


@torch.no_grad()
def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default", ignore_mismatched_sizes: bool = False,
                              low_cpu_mem_usage: bool = False) -> LoadResult:
    """Load tensors keyed as get_peft_model_state_dict returns them (or as adapter_model.safetensors holds them).
    Strict: a missing, unexpected or mis-shaped tensor raises and names it."""
    if ignore_mismatched_sizes:
        raise NotImplementedError("ignore_mismatched_sizes=True: unipeft refuses tensors of the wrong shape "
                                  "rather than skipping them")
    model = _unwrap(model)
    if isinstance(model, PeftModel):
        _check_adapter(model.peft_config, adapter_name)
        model.load_adapter_weights(dict(peft_model_state_dict), source="peft_model_state_dict", adapter_name=adapter_name)
        return LoadResult([], [])
    cfg, handle = _injected(model, adapter_name)
    keys = file_keys(handle, hf_names=cfg.hf_format, prefix="")
    unexpected = sorted(set(peft_model_state_dict) - set(keys))
    missing = sorted(set(keys) - set(peft_model_state_dict))
    if unexpected or missing:
        raise ValueError(f"peft_model_state_dict does not fit adapter {adapter_name!r}: unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}; was it made for another model or config?")
    for k, (path, p) in keys.items():
        v = peft_model_state_dict[k]
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"tensor {k} has shape {tuple(v.shape)} but {path} is {tuple(p.shape)}")
    for k, (_, p) in keys.items():
        p.copy_(peft_model_state_dict[k].to(dtype=p.dtype, device=p.device))
    return LoadResult([], [])

"""inject_adapter_in_model: HF PEFT's low-level API — the adapter goes into the model, no PeftModel around it."""

from __future__ import annotations

from torch import nn

from .arch import find_arch
from .config import PeftConfig
from .inject import inject
from .spec import AtAttentionKV, AtInput

# model.__dict__ key: adapter name -> (resolved config, Handle), read by get/set_peft_model_state_dict
INJECTED = "_unipeft_injected"


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict=None) -> nn.Module:
    """Inject `peft_config`'s method into `model` in place and return the same model. As in HF PEFT, methods
    with state shared across layers (prompts, prefixes) need get_peft_model. `low_cpu_mem_usage` is accepted
    and has no effect (adapters are small and made directly in the model's dtype)."""
    if state_dict is not None:
        raise NotImplementedError("inject_adapter_in_model(state_dict=...) (targets taken from a checkpoint's keys) "
                                  "is not supported; pass a config with target_modules instead")
    injected = model.__dict__.setdefault(INJECTED, {})
    if adapter_name in injected:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; choose another adapter_name")
    arch = find_arch(model)
    cfg = peft_config.resolved(model, arch)
    insertions = cfg.insertions(model, arch)
    if any(isinstance(i.position, (AtInput, AtAttentionKV)) for i in insertions):
        raise ValueError(f"inject_adapter_in_model does not support {cfg.peft_type}: its prompt/prefix is shared by "
                         f"the whole model; use get_peft_model(model, config) instead (as in HF PEFT)")
    handle = inject(model, insertions, arch=arch, modules_to_save=cfg.modules_to_save or (),
                    trainable_biases=cfg.bias_mode(), adapter_name=adapter_name)
    try:
        cfg.initialize(model, handle)
    except Exception:
        handle.remove()
        raise
    injected[adapter_name] = (cfg, handle)
    return model

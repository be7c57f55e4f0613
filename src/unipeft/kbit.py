"""prepare_model_for_kbit_training (HF PEFT's semantics): freeze the base, upcast its fp16/bf16 floating
weights to fp32 (quantized storage stays as it is), and on a quantized model turn on input gradients and
gradient checkpointing."""

from __future__ import annotations

import torch
from torch import nn

from .training.checkpointing import enable_gradient_checkpointing
from .quant import is_quantized as is_quantized_linear

# storage classes of bitsandbytes' 8-bit and 4-bit weights (a 4-bit one may be stored as bf16: skip by class)
_QUANT_PARAMS = ("Params4bit", "Int8Params")


def loaded_in_kbit(model: nn.Module) -> bool:
    """Loaded in 8/4 bits by transformers (its flags), or holding bitsandbytes linears (unipeft.quant)."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    return any(is_quantized_linear(m) for m in model.modules())


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Prepare `model` (in place, and returned) for adapter training on a quantized base."""
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        # layer norms, embeddings and heads to fp32 (HF PEFT: training them in half precision is unstable)
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ not in _QUANT_PARAMS:
            p.data = p.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if loaded_in_kbit(model) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            # as HF PEFT: reentrant checkpointing needs an input that requires grad (harmless otherwise)
            model.enable_input_require_grads()
        enable_gradient_checkpointing(model, checkpoint_kwargs=kwargs)  # non-reentrant unless use_reentrant=True
    return model

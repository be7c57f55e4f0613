"""Leaving the quantized world: dequantize the base, fold the adapter in, export in bf16/fp16.

Merging into 4-bit weights would re-quantize W + ΔW and lose most of ΔW; instead every quantized linear
becomes a plain nn.Linear holding its dequantized weight (installed deltas and hooks move with it), the
adapter merges exactly as on any float model, and the result is cast to the export dtype. The report says
how far the exported model's outputs are from the unmerged quantized model they came from.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .schemes import dequantize_weight, is_quantized
from .build import swap_module

logger = logging.getLogger(__name__)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32, handle=None) -> nn.Module:
    """Replace every quantized linear of `model` by an nn.Linear with its dequantized weight in `dtype`.

    `handle` (a unipeft Handle; taken from a PeftModel automatically) has its sites pointed at the new
    modules, so merge/unmerge/remove keep working.
    """
    handle = handle if handle is not None else getattr(model, "handle", None)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, mod in list(root.named_modules()):
        if not is_quantized(mod):
            continue
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(dequantize_weight(mod).to(dtype), requires_grad=False)
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
        swap_module(root, name, lin)
        for site in getattr(handle, "sites", ()):
            for attr, value in vars(site).items():
                if value is mod:
                    setattr(site, attr, lin)
    return model


@torch.no_grad()
def merge_and_export(peft_model, inputs: dict | None = None, dtype: torch.dtype = torch.bfloat16):
    """Dequantize → merge → cast to `dtype`. Returns (plain model, report).

    With `inputs` (a batch for the model), the report holds the max |Δlogits| between the unmerged
    quantized model and (a) the merged float32 model, (b) the exported `dtype` model.
    """
    report = {"dtype": str(dtype).replace("torch.", "")}
    model = peft_model.get_base_model()
    was_training = model.training
    model.eval()
    ref = _logits(peft_model, inputs)
    dequantize_model(peft_model, torch.float32)
    merged = peft_model.merge_and_unload()
    if ref is not None:
        out = _logits(merged, inputs)
        report["max_abs_err_fp32"] = (out - ref).abs().max().item()
        report["max_abs_logit"] = ref.abs().max().item()
    merged.to(dtype)
    if ref is not None:
        report["max_abs_err_export"] = (_logits(merged, inputs) - ref).abs().max().item()
    merged.train(was_training)
    logger.info("merged into the dequantized base and exported as %s: %s", dtype, report)
    return merged, report


def _logits(model, inputs):
    if inputs is None:
        return None
    return model(**inputs).logits.float()

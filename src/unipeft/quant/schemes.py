"""The quantization schemes of a frozen base, and the questions generic code asks of a quantized linear:
nf4 and int8 through bitsandbytes (bnb.py), fp8 (e4m3, per-channel scales) through FP8 GEMMs (fp8.py)."""

from __future__ import annotations

import torch
from torch import nn

from .bnb import BNB_SCHEMES, bnb_linear, dequantize_bnb, is_bnb_linear
from .fp8 import Float8Linear, unsupported_shape as fp8_unsupported_shape

SCHEMES = BNB_SCHEMES + ("fp8",)


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, compute_dtype: torch.dtype,
                     *, double_quant: bool = True, blocksize: int = 64, device="cpu") -> nn.Linear:
    """A frozen linear holding `weight` (out, in) quantized by `scheme`; only the quantized form stays."""
    if scheme == "fp8":
        return Float8Linear(weight, bias, compute_dtype, device=device)
    return bnb_linear(weight, bias, scheme, compute_dtype, double_quant=double_quant, blocksize=blocksize,
                      device=device)


def unsupported_shape(scheme: str, shape: torch.Size) -> str | None:
    """Why a weight of `shape` cannot take `scheme` (None when it can): FP8 GEMMs need both sides divisible by 16."""
    return fp8_unsupported_shape(shape) if scheme == "fp8" else None


def is_quantized(module: nn.Module) -> bool:
    """True for a quantized linear: bitsandbytes' 4-bit or 8-bit, or an FP8 one."""
    return isinstance(module, Float8Linear) or is_bnb_linear(module)


def dequantize_weight(module: nn.Linear) -> torch.Tensor:
    """The (out, in) float weight a quantized linear represents (float32 for int8 and fp8, the source dtype for nf4)."""
    if isinstance(module, Float8Linear):
        return module.dequantize()
    return dequantize_bnb(module)

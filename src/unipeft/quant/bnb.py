"""bitsandbytes linears: NF4 with double quantization (QLoRA) and LLM.int8() weight-only, CPU and CUDA.

    nf4   W ≈ NF4[code] · absmax_block,  blocks of 64, absmax itself 8-bit quantized in blocks of 256
          (Dettmers et al. 2023, arXiv:2305.14314): ≈ 4.13 bits per weight
    int8  W ≈ CB · SCB_row / 127,  per-output-row absmax (Dettmers et al. 2022, arXiv:2208.07339): 8 bits

Why bitsandbytes rather than torchao's NF4Tensor (both measured on this project's 2-core CPU, 2048→8192
linear, batch 512, forward + backward): bitsandbytes 0.50 has a maintained CPU backend, ran 1.41 s (fp32) /
0.62 s (bf16) against torchao 0.18's 2.84 s / 0.92 s, offers int8 too, is what HF transformers and PEFT use
for QLoRA (same modules, same state-dict layout), and keeps a stable import path (torchao moved NF4Tensor
between releases). The dequantization error was the same (max 3.4e-3, mean 9e-4 for weights ~U(±0.022)).
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import unpack_4bit_for_cpu

BNB_SCHEMES = ("nf4", "int8")


def bnb():
    """The bitsandbytes module, or a clear error naming the extra to install."""
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("quantized bases need bitsandbytes: pip install 'unipeft[quant]' "
                          "(or pip install 'bitsandbytes>=0.49')") from e
    return bitsandbytes


def is_bnb_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear."""
    if not isinstance(module, nn.Linear) or module.weight.is_floating_point():
        return False
    b = bnb()
    return isinstance(module, (b.nn.Linear4bit, b.nn.Linear8bitLt))


def bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, compute_dtype: torch.dtype,
               *, double_quant: bool = True, blocksize: int = 64, device="cpu") -> nn.Linear:
    """A bitsandbytes linear holding `weight` (out, in) quantized by `scheme`; only the quantized form stays."""
    b = bnb()
    d_out, d_in = weight.shape
    device = torch.device(device)
    if scheme == "nf4":
        q = b.nn.Linear4bit(d_in, d_out, bias=bias is not None, compute_dtype=compute_dtype, quant_type="nf4",
                            compress_statistics=double_quant, quant_storage=torch.uint8, device="meta")
        # bitsandbytes repacks CPU weights for a faster inference-only kernel in eval mode; that kernel has
        # no backward, so an eval pass followed by training would lose the input gradient. Keep one layout.
        q.support_avx512bf16_for_cpu = False
        # quantized from the compute dtype, so dequantizing yields it directly (no float32 temporary per matmul)
        w = b.nn.Params4bit(weight.detach().to(device=device, dtype=compute_dtype), requires_grad=False, quant_type="nf4", blocksize=blocksize,
                            compress_statistics=double_quant, quant_storage=torch.uint8, module=q)
        q.weight = w.to(device)  # moving an unquantized Params4bit to a device quantizes it there
    elif scheme == "int8":
        q = b.nn.Linear8bitLt(d_in, d_out, bias=bias is not None, has_fp16_weights=False, threshold=0.0, device="meta")
        # LLM.int8() row-wise absmax quantization, as Int8Params does on its first move to a device
        CB, SCB, _ = b.functional.int8_vectorwise_quant(weight.detach().to(device=device, dtype=torch.float16).contiguous())
        q.weight = b.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)
        q.compute_dtype = compute_dtype  # what adapters on it are made in (unipeft.inject reads it)
    else:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of {BNB_SCHEMES}")
    if bias is not None:
        q.bias = nn.Parameter(bias.detach().to(device=device, dtype=compute_dtype), requires_grad=False)
    return q


def device_tensors(module: nn.Linear) -> list[tuple[object, str]]:
    """Every (holder, attribute) of a quantized linear's frozen state that a forward reads on the device:
    the packed weight and its quantization state (NF4: block absmax, code, and the double-quant level)."""
    b = bnb()
    if not isinstance(module, b.nn.Linear4bit):
        raise NotImplementedError(f"streaming quantized weights supports nf4 (Linear4bit), not {type(module).__name__}")
    qs = module.weight.quant_state
    slots = [(module.weight, "data"), (qs, "absmax"), (qs, "code")]
    if qs.nested:
        slots += [(qs, "offset"), (qs.state2, "absmax"), (qs.state2, "code")]
    if module.bias is not None:
        slots.append((module.bias, "data"))
    return slots


@torch.no_grad()
def dequantize_bnb(module: nn.Linear) -> torch.Tensor:
    """The (out, in) float weight a quantized linear represents (float32 for int8, the source dtype for nf4)."""
    b = bnb()
    if isinstance(module, b.nn.Linear4bit):
        unpack_4bit_for_cpu(module.weight)  # a CPU eval forward may have repacked it for its inference kernel
        return b.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    if isinstance(module, b.nn.Linear8bitLt):
        CB = module.state.CB if module.state.CB is not None else module.weight.data
        SCB = module.state.SCB if module.state.SCB is not None else module.weight.SCB
        return CB.float() * (SCB.float()[:, None] / 127.0)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear")


def quantized_bytes(module: nn.Module) -> int:
    """Bytes held by a module's tensors, quantization statistics (absmax, codebooks, row scales) included."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen and t.device.type != "meta":
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
    for m in module.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            for t in qs.as_dict(packed=True).values():
                add(t)
        for owner in (getattr(m, "state", None), getattr(m, "weight", None)):
            add(getattr(owner, "SCB", None))
    return total

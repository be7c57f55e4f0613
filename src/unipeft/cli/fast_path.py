"""The CLI's GPU fast path decisions: the frozen base's storage dtype and liger-kernel's kernels.

Base dtype: training in bf16/fp16 with an fp32 base makes autocast cast every frozen weight on every matmul and
doubles weight memory; the base is loaded in the compute dtype instead (trainable tensors stay fp32 masters and
compute in the activation dtype: the library's rule). Sharded engines (FSDP2, DeepSpeed) keep their own precision
handling and an fp32 base.
"""

from __future__ import annotations

import logging

from .errors import CliError

logger = logging.getLogger("unipeft.cli")
_COMPUTE = {"bf16": "bfloat16", "fp16": "float16"}


def base_dtype(choice: str, mixed_precision: str, device_type: str, sharded: bool) -> str:
    """The dtype name the frozen base is loaded in (`--base-dtype`)."""
    compute = _COMPUTE.get(mixed_precision)
    if choice == "fp32":
        return "float32"
    if choice == "compute":
        if compute is None:
            raise CliError(f"--base-dtype compute needs bf16 or fp16 training, not precision {mixed_precision}",
                           "add --precision bf16 (or fp16 on a GPU), or drop --base-dtype")
        if sharded:
            raise CliError("--base-dtype compute is not supported with a sharded engine (FSDP2 / DeepSpeed "
                           "handle precision themselves)", "drop --base-dtype (they keep an fp32 base)")
        return compute
    return compute if compute and device_type != "cpu" and not sharded else "float32"


def trainable_in_fp32(model) -> int:
    """Upcast trainable parameters stored in half precision (a base bias a method trains, a head that is not
    copied) to fp32 in place; returns how many. Frozen ones keep their dtype."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += 1
    return n


def liger_wanted(choice: str, device_type: str, available: bool) -> tuple[bool, str]:
    """Whether to apply liger-kernel (`--liger`), and why not when not."""
    if choice == "off":
        return False, "off (--liger off)"
    if device_type != "cuda":
        if choice == "on":
            raise CliError(f"--liger on needs a CUDA device (liger-kernel's kernels are Triton), this run is on "
                           f"{device_type}", "drop --liger on (auto uses it where it can)")
        return False, "off (not on CUDA)"
    if not available:
        if choice == "on":
            raise CliError("--liger on: liger-kernel is not installed", "pip install liger-kernel, or drop --liger on")
        return False, "off (liger-kernel not installed)"
    return True, ""


def apply_liger_or_explain(model, choice: str, device_type: str) -> str:
    """Apply liger's kernels as `--liger` says; returns the start summary's words for it."""
    from ..kernels import LIGER_KERNELS, apply_liger, liger_available

    on, why = liger_wanted(choice, device_type, liger_available())
    if not on:
        return f"liger {why}"
    try:
        apply_liger(model)
    except (ValueError, ImportError) as e:
        if choice == "on":
            raise CliError(f"--liger on: {e}", "drop --liger on for this model") from None
        logger.info("liger-kernel not applied: %s", e)
        return f"liger off ({str(e).split(':')[0]})"
    except RuntimeError as e:  # liger changed the loss path: the model cannot be trained as asked
        raise CliError(str(e), "pass --liger off") from None
    return f"liger-kernel ({', '.join(LIGER_KERNELS)})"

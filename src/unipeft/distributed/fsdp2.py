"""FSDP2 wrapping of an adapted model: `fully_shard` on every transformer block, then on the root.

Deltas are children of the modules they modify (design note 1), so each block's unit holds its own adapters and
they are all-gathered with the block; shared deltas (a prefix table, a prompt) sit on the model root and belong
to the root unit, which stays unsharded through the forward. One unit may hold frozen bf16 base weights and
trainable fp32 adapter weights: FSDP2 asks for one dtype among the trainable parameters only.

Quantized bases (bitsandbytes): an NF4 weight is a uint8 tensor whose meaning (absmax, code book) lives in a
`quant_state` beside it. Sharding turns the weight into a plain DTensor; bitsandbytes' `Linear4bit` keeps a copy of
the state on the module and re-attaches it on each forward (its FSDP route), so QLoRA shards with the default
uint8 `quant_storage` (FSDP2 wants one dtype among trainable parameters only, so the bf16 `quant_storage` FSDP1
needed for its flat parameters is not required) — tested on CPU against one process. Refused: a CPU NF4 layer with
bitsandbytes' CPU inference repacking on (`support_avx512bf16_for_cpu`: it rewrites the weight in place in eval
mode, into the all-gathered copy FSDP2 frees), and int8 (LLM.int8) layers, whose scales live on the weight
parameter itself (`CB`/`SCB`), which sharding replaces ("'Parameter' object has no attribute 'CB'").
"""

from __future__ import annotations

from torch import nn


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, "nf4"|"int8") for every bitsandbytes linear of the model."""
    out = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        if kind == "Linear4bit" or kind == "Linear8bitLt":
            out.append((name, m, "nf4" if kind == "Linear4bit" else "int8"))
    return out


def check_quantized_for_fsdp2(model: nn.Module) -> None:
    """Refuse a quantized base FSDP2 cannot shard, naming the layer and why."""
    from ..quant.fp8 import Float8Linear

    for name, m in model.named_modules():
        if isinstance(m, Float8Linear):
            raise ValueError(f"{name} is an FP8 linear: its second weight copy and the scales are buffers, which "
                             f"FSDP2 does not shard, and FP8 under FSDP2 is untested; use DDP, or a bf16/NF4 base")
    for name, m, kind in quantized_linears(model):
        if kind == "int8":
            raise ValueError(f"{name} is an int8 (LLM.int8) linear: its scales live on the weight parameter (SCB), "
                             f"which FSDP2's sharding replaces, so the weight could not be dequantized after an "
                             f"all-gather. Use an NF4 base on CUDA, or DDP, or dequantize (unipeft.quant.dequantize_model)")
        if m.weight.device.type == "cpu" and getattr(m, "support_avx512bf16_for_cpu", False):
            raise ValueError(f"{name} is an NF4 linear with bitsandbytes' CPU repacking on (support_avx512bf16_for_cpu): "
                             f"in eval mode it rewrites the 4-bit weight in place, into the all-gathered copy that "
                             f"FSDP2 frees after the forward. Set `support_avx512bf16_for_cpu = False` on the layer "
                             f"(unipeft.quant builds it so), or use DDP")


def shard_fsdp2(model: nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each transformer block of `model` (a PeftModel or an injected model), then the root; returns
    the model (now an FSDPModule). Checks a quantized base first (check_quantized_for_fsdp2)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..arch import find_arch
    from ..arch.resolve import blocks

    check_quantized_for_fsdp2(model)
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    arch = find_arch(base)
    if arch is None:
        raise ValueError(f"cannot find the transformer blocks of {type(base).__name__} (unknown architecture); call "
                         f"torch.distributed.fsdp.fully_shard on each block and then on the model yourself")
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
          "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy()}
    for b in blocks(base, arch):
        fully_shard(b.module, **kw)
    fully_shard(model, **kw)
    if callable(getattr(model, "generate", None)):
        # generate() runs the inner model, not the root's forward: the root unit (embeddings, head, shared
        # deltas) must be all-gathered around it too
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    return model

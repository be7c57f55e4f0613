"""Full adapter tensors from a sharded model.

Under FSDP2 (`fully_shard`) a module's parameters are DTensors holding 1/N of each tensor on each rank;
under DeepSpeed ZeRO-3 they are empty outside a forward pass (`ds_shape` gives the real shape). Either way
reading `p` gives a shard, and writing it gives a file with partial or empty tensors. `full_parameters`
makes a set of parameters read as their full tensors inside a `with` block, so that everything computed from
them (the file's tensors, an MLP-made prefix table) is computed once, by one code path, as on one process.

Gathering is a collective: every rank must enter the block, with the same parameters in the same order.
Parameters that are not sharded (one process, DDP, ZeRO-1/2) need nothing and no collective is run, so a
caller that saves on rank 0 only (transformers.Trainer under DDP) never waits for the other ranks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def is_main_process() -> bool:
    """The first process of its node (LOCAL_RANK 0, as torchrun and Accelerate set it; else rank 0 of
    torch.distributed when it is initialized), or True for one process. Per node, not global rank 0: a caller that
    saves on each node (Trainer's save_on_each_node) must not lose the second node's files; on a shared filesystem
    the nodes write the same bytes atomically."""
    import os

    import torch.distributed as dist

    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit():
        return int(local) == 0
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def sharding_of(p: torch.Tensor) -> str | None:
    """"fsdp2" (a DTensor shard), "zero3" (a DeepSpeed partitioned parameter) or None (a full tensor)."""
    if hasattr(p, "ds_id") and hasattr(p, "ds_shape"):
        return "zero3"
    DTensor = _dtensor_type()
    if DTensor is not None and isinstance(p, DTensor):
        return "fsdp2"
    return None


def _owners(model: nn.Module, ids: set[int]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(module, attribute, parameter) for every registration of the given parameters, in module order (the same
    on every rank: the order of the collectives)."""
    out = []
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in ids:
                out.append((m, name, p))
    return out


@contextlib.contextmanager
def full_parameters(model: nn.Module, params):
    """Inside the block each of `params` (parameters of `model`) reads as its full tensor, on every rank.

    FSDP2: each DTensor is all-gathered (`full_tensor()`) and a plain parameter holding it is registered in its
    place; the shard is put back on exit (changes made inside are not written back: this is for reading).
    ZeRO-3: `deepspeed.zero.GatheredParameters` (read only as well). Values read inside must be copied if they
    are kept: ZeRO-3 frees the gathered storage on exit."""
    params = list({id(p): p for p in params}.values())
    kinds = {sharding_of(p) for p in params} - {None}
    if not kinds:
        yield
        return
    with contextlib.ExitStack() as stack:
        if "zero3" in kinds:
            import deepspeed

            zero = [p for p in params if sharding_of(p) == "zero3"]
            stack.enter_context(deepspeed.zero.GatheredParameters(zero, modifier_rank=None))
        if "fsdp2" in kinds:
            stack.enter_context(_fsdp2_full(model, [p for p in params if sharding_of(p) == "fsdp2"]))
        yield


@contextlib.contextmanager
def _fsdp2_full(model: nn.Module, params: list):
    with torch.no_grad():
        full = {id(p): p.full_tensor() for _, _, p in _owners(model, {id(p) for p in params})}
    with _swapped(model, params, full):
        yield


@contextlib.contextmanager
def parameters_from(model: nn.Module, params, state_dict: dict):
    """Inside the block each of `params` reads as its value in `state_dict` (a full state dict of `model`, keyed
    by its parameter names: what transformers.Trainer passes to save_pretrained under DeepSpeed ZeRO-3 and
    FSDP, gathered by the engine). No collective: modules called inside (an MLP making a prefix table from them)
    run without their forward hooks, so an engine's hooks neither gather nor see the plain tensors."""
    params = list({id(p): p for p in params}.values())
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    missing = [names.get(id(p), "?") for p in params if names.get(id(p)) not in state_dict]
    if missing:
        raise KeyError(f"state_dict lacks {len(missing)} adapter tensor(s), e.g. {missing[:3]}; pass the model's full "
                       f"state_dict (with a sharded engine: gathered, e.g. accelerator.get_state_dict(model))")
    from ..compat import forward_hooks_off

    # the engine's module hooks (ZeRO-3's gathers) must not run: the values are full already, and rank 0 may be alone
    with _swapped(model, params, {id(p): state_dict[names[id(p)]] for p in params}), forward_hooks_off(model):
        yield


@contextlib.contextmanager
def _swapped(model: nn.Module, params: list, values: dict):
    """Register a plain parameter holding values[id(p)] wherever p is registered; put p back on exit."""
    owners = _owners(model, {id(p) for p in params})
    found = {id(p) for _, _, p in owners}
    lost = [p for p in params if id(p) not in found]
    if lost:
        raise ValueError(f"{len(lost)} adapter parameter(s) are not registered in the model given; pass the model "
                         f"that holds them")
    full = {k: nn.Parameter(v.detach(), requires_grad=False) for k, v in values.items()}
    try:
        for m, name, p in owners:
            m._parameters[name] = full[id(p)]
        yield
    finally:
        for m, name, p in owners:
            m._parameters[name] = p


def full_shape(p: torch.Tensor) -> tuple:
    """The full tensor's shape (a ZeRO-3 parameter is empty between forwards; a DTensor reports its global shape)."""
    return tuple(p.ds_shape) if sharding_of(p) == "zero3" else tuple(p.shape)


@torch.no_grad()
def assign_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """p ← value, the full tensor (every rank holds it, e.g. read from one file): an FSDP2 DTensor keeps its own
    shard of it (no communication); a ZeRO-3 parameter is gathered, written on rank 0 and re-partitioned (a
    collective: every rank calls this, for the same parameters in the same order)."""
    kind = sharding_of(p)
    if kind == "fsdp2":
        from torch.distributed.tensor import distribute_tensor

        local = value.to(dtype=p.dtype, device=p.to_local().device)
        p.copy_(distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None))
    elif kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(dtype=p.dtype, device=p.device).view(p.shape))
    else:
        p.copy_(value.to(dtype=p.dtype, device=p.device))

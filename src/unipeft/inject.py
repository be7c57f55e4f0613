"""inject(model, insertions) -> Handle: the single entry point that changes a model, and its undo.

Resolution happens first for every insertion; only when all positions resolve is anything installed, and a
failure while installing rolls back what was done. The model is never left half-modified.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import blocks, find_arch, resolve_linears, resolve_sublayers
from .arch.fused import FusedSlice
from .arch.resolve import adaptable_dims, get_submodule
from .arch.spec import ArchSpec
from .deltas import build_delta
from .deltas.base import delta_parameters
from .handle import Handle
from .names import matches
from .training.losses import ChunkedLoss
from .training.recompute import ActivationRecompute
from .positions import LinearDeltaSite, Site, SublayerDeltaSite, Switch, TrainableCopy
from .positions import attention_kv, input as input_position
from .positions.attention_kv import AttentionKVSite, PrefixPasses, SeamConfigs, check_seam, relative_bias_source
from .positions.fused import SlicedLinearDeltaSite
from .positions.input import InputSite, PrefixPositions
from .positions.installers import installer_for, position_installer
from .positions.layout import place_delta, unplace_delta
from .positions.weight import input_passes
from .spec import AtAttentionKV, AtInput, AtLinear, AtSublayer, Form, Insertion, Sublayer

_HALF = (torch.bfloat16, torch.float16)


def base_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: its first quantized layer's compute dtype (a quantized linear, or a block
    holding them), else its first floating weight's."""
    for m in module.modules():
        p = next(m.parameters(recurse=False), None)
        if getattr(m, "compute_dtype", None) is not None and (p is None or not p.is_floating_point()):
            return m.compute_dtype
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def trainable_dtype(module: nn.Module, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of trainable parameters made for `module`: fp32 over a bf16/fp16/quantized base (AdamW's small
    updates would round away in half precision; HF PEFT's `autocast_adapter_dtype`), else the base's dtype.
    Deltas compute in the activation dtype whatever they are stored in."""
    dt = base_dtype(module)
    return torch.float32 if autocast_adapter_dtype and dt in _HALF else dt


def _autocast(handle) -> bool:
    return getattr(handle, "autocast_adapter_dtype", True)


def _param_like(module: nn.Module, autocast_adapter_dtype: bool = True):
    p = next(module.parameters(), None)
    # a module computing elsewhere than its weights live (HostEmbedding) says so with compute_device
    device = getattr(module, "compute_device", None) or (p.device if p is not None else None)
    return dict(dtype=trainable_dtype(module, autocast_adapter_dtype), device=device)


@position_installer(AtLinear)
def _install_linear(model, ins: Insertion, arch, handle) -> list[Site]:
    switch = handle.switch
    sites, built = [], []
    try:
        for name, mod in resolve_linears(model, ins.position, arch):
            d_in, d_out, _ = adaptable_dims(mod)
            side = ins.position.side_of(name)
            part = isinstance(mod, FusedSlice)  # rows of a fused linear (Phi-3's q_proj inside qkv_proj)
            # the host goes to the delta: DoRA reads its weight, PiSSA/OLoRA leave a residual in it
            built.append(build_delta(ins.delta, d_in, d_out, side=side, host=mod, scale=ins.scale, where=name,
                                     **_param_like(mod.host if part else mod, _autocast(handle))))
            sites.append((SlicedLinearDeltaSite if part else LinearDeltaSite)(mod, name, ins, built[-1], switch,
                                                                              side=side))
    except Exception:
        for s in sites:
            s.remove()
        for d in built:  # sites not yet on the handle: undo their host changes here
            d.restore_host()
        raise
    handle.extras += input_passes(model, sites, handle.extras)
    return sites


def hidden_size(model) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")


@position_installer(AtSublayer)
def _install_sublayer(model, ins: Insertion, arch, handle) -> list[Site]:
    switch = handle.switch
    sites = []
    d = hidden_size(model)
    after_add = ins.form == Form.AFTER_ADD_NORM
    for s in resolve_sublayers(model, ins.position, arch, residual=after_add):
        delta = build_delta(ins.delta, d, d, side="out", **_param_like(s.out_module, _autocast(handle)))
        residual = (s.residual, arch.post_norm) if after_add else None
        sites.append(SublayerDeltaSite(s.in_module, s.out_module, s.out_name, ins, delta, switch, residual=residual))
    return sites


class RootModule:
    """A delta shared by many sites (a prefix table, a prompt), placed on the model root: `<name>.<adapter>`."""

    def __init__(self, model: nn.Module, name: str, delta: nn.Module, adapter: str):
        self.model, self.name, self.delta, self.adapter = model, name, delta, adapter
        place_delta(model, name, adapter, delta)

    def remove(self):
        unplace_delta(self.model, self.name, self.adapter, self.delta)


def attention_dims(model) -> tuple[int, int]:
    """(kv_heads, head_dim) from the model config (GQA-aware; T5's d_kv)."""
    cfg = model.config
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or hidden_size(model) // H
    return getattr(cfg, "num_key_value_heads", None) or H, hd


@position_installer(AtAttentionKV)
def _install_attention_kv(model, ins: Insertion, arch, handle) -> list:
    if arch is None:
        resolve_sublayers(model, AtSublayer(sublayer=Sublayer.ATTN), arch)  # raises, listing the modules
    paths = arch.attn if ins.position.attention == "self" else arch.cross_attn
    in_stack = None
    if ins.position.stack == "decoder":
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"stack='decoder' selects an encoder-decoder's decoder; {type(model).__name__} has none")
        in_stack = {id(m) for m in model.get_decoder().modules()}
    modules = []
    for b in blocks(model, arch):
        if ins.position.layers is not None and b.index not in ins.position.layers:
            continue
        if in_stack is not None and id(b.module) not in in_stack:
            continue
        for p in paths:
            m = get_submodule(b.module, p)
            if m is not None:
                modules.append((f"{b.path}.{p}", m))
                break
    if not modules:
        raise ValueError(f"no {ins.position.attention}-attention modules found at {paths} in {type(model).__name__}")
    for name, m in modules:
        check_seam(m, name)
        attention_kv.check_insertion(ins, m, name, handle.switch.adapter)
    kv_heads, head_dim = attention_dims(model)
    delta = build_delta(ins.delta, 0, 0, sites=len(modules), kv_heads=kv_heads, head_dim=head_dim,
                        **_param_like(model, _autocast(handle)))
    handle.extras.append(RootModule(model, ins.name, delta, handle.switch.adapter))
    if getattr(delta, "reparameterized", False):
        handle.extras.append(PrefixPasses(model, delta))
    if not any(isinstance(e, SeamConfigs) for e in handle.extras):
        handle.extras.append(SeamConfigs(model))
    if not getattr(model.config, "is_encoder_decoder", False):
        shift = ins.delta.length if ins.position.position_shift else 0
        other = next((e for e in handle.extras if isinstance(e, PrefixPositions)), None)
        if other is not None and other.shift != shift:
            raise ValueError(f"prefix insertions with different position shifts ({other.shift} and {shift}) on one "
                             f"model: real tokens can start at one position only")
        if other is None:
            handle.extras.append(PrefixPositions(model, shift, handle.switch))
    bias = relative_bias_source([m for _, m in modules])
    L = len(modules)
    slot = (lambda i: 2 * i % L) if ins.position.hf_seq2seq_blocks else (lambda i: i)  # noqa: E731
    return [AttentionKVSite(m, n, ins, delta, slot(i), handle.switch, ins.name, bias_source=bias)
            for i, (n, m) in enumerate(modules)]


@position_installer(AtInput)
def _install_input(model, ins: Insertion, arch, handle) -> list:
    input_position.check_insertion(ins)
    emb = model.get_input_embeddings()
    subs = 2 if getattr(model.config, "is_encoder_decoder", False) else 1
    delta = build_delta(ins.delta, emb.embedding_dim, emb.embedding_dim, word_embeddings=emb, submodules=subs,
                        **_param_like(emb, _autocast(handle)))
    handle.extras.append(RootModule(model, ins.name, delta, handle.switch.adapter))
    return [InputSite(model, ins, delta, handle.switch, ins.name)]


def inject(
    model: nn.Module,
    insertions: tuple[Insertion, ...],
    *,
    arch: ArchSpec | None = None,
    modules_to_save: tuple[str, ...] = (),
    trainable_biases: str = "none",
    autocast_adapter_dtype: bool = True,
    adapter_name: str = "default",
) -> Handle:
    """Install `insertions` into `model` in place and return the Handle that can undo it.

    Args:
        modules_to_save: module names (or name suffixes) trained in full as copies, e.g. task heads.
        trainable_biases: "none" | "all" (every bias of the model) | "sites" (biases of modules holding a delta).
        autocast_adapter_dtype: trainable parameters (deltas, prefixes, prompts, head copies) over a bf16/fp16 or
            quantized base are fp32 (True, HF PEFT's default) or in the base's dtype (False).
        adapter_name: the adapter's name in the module layout (`q_proj.lora_A.<adapter_name>.weight`); several
            adapters can live in one model, each injected by its own call.
    """
    arch = arch or find_arch(model)
    handle = Handle(model, switch=Switch(adapter_name))
    handle.autocast_adapter_dtype = autocast_adapter_dtype
    try:
        for ins in insertions:
            handle.sites += installer_for(ins.position)(model, ins, arch, handle)
        _install_copies(model, handle, modules_to_save)
        _train_biases(model, handle, trainable_biases)
        if ChunkedLoss.applies_to(model):  # model(..., labels=...) computes its loss without full logits
            handle.extras.append(ChunkedLoss(model))
        if ActivationRecompute.applies_to(model):  # backward recomputes act(g) from g instead of keeping both
            handle.extras.append(ActivationRecompute(model))
    except Exception:
        handle.remove()
        raise
    handle.mark_trainable()
    return handle


def _install_copies(model, handle: Handle, names) -> None:
    for name, mod in list(model.named_modules()):
        if not name or not matches(name, names):
            continue
        if ".original_module" in name or ".modules_to_save." in name:  # inside another adapter's head copies
            continue
        if any(name.startswith(c.name + ".") for c in handle.copies):
            continue
        parent_name, _, attr = name.rpartition(".")
        dtype = trainable_dtype(mod, _autocast(handle))
        handle.copies.append(TrainableCopy(model.get_submodule(parent_name), attr, name, handle.switch.adapter,
                                           dtype=dtype))


def _train_biases(model, handle: Handle, mode: str) -> None:
    if mode == "none":
        return
    if mode == "all":
        hosts = [(n, m) for n, m in model.named_modules()]
    elif mode == "sites":
        hosts = [(s.host_name, s.host) for s in handle.sites]
    else:
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {mode!r}")
    owned = {id(p) for s in handle.sites for _, p in delta_parameters(s.delta)}
    owned |= {id(p) for c in handle.copies for m in (c.copy, c.original) for p in m.parameters()}  # heads: trained whole
    seen = set()
    for n, m in hosts:
        b = dict(m.named_parameters(recurse=False)).get("bias")
        if b is not None and id(b) not in seen and id(b) not in owned:
            seen.add(id(b))
            handle.trainable_base.append((f"{n}.bias", b, b.detach().clone()))

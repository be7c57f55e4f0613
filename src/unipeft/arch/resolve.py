"""Resolve positions on a live model: named linears, blocks, sublayers. Clear errors list what exists."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass

from torch import nn

from ..names import matches, pattern_layer_index
from ..spec import AtLinear, AtSublayer, Sublayer
from .fused import FusedSlice, fused_slices
from .spec import ARCHS, ArchSpec


def takes_past_key_values(model: nn.Module) -> bool:
    """Whether the model's forward, or its backbone's, takes `past_key_values` (a KV cache): where HF PEFT runs prefix
    tuning (it refuses a model whose task model and backbone forwards both lack it)."""
    backbone = getattr(model, "base_model", model)
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone))


def linear_dims(module: nn.Module):
    """(d_in, d_out, transposed) of a linear-like module, or None. GPT-2's Conv1D stores W as (in, out).
    A part of a fused linear (FusedSlice) has its rows as d_out."""
    if isinstance(module, FusedSlice):
        return module.host.in_features, module.rows, False
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        w = module.weight
        return w.shape[0], w.shape[1], True
    if hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight"):
        return module.in_features, module.out_features, False  # quantized linears (bitsandbytes, torchao)
    return None


def adaptable_dims(module: nn.Module):
    """linear_dims, extended to the other layers a low-rank delta can adapt when named explicitly:
    nn.Embedding (in = num_embeddings, out = embedding_dim, stored (in, out)) and nn.Conv1d/2d (channels)."""
    dims = linear_dims(module)
    if dims is not None:
        return dims
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim, True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.in_channels, module.out_channels, False
    return None


def get_submodule(root: nn.Module, path: str):
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def find_arch(model: nn.Module) -> ArchSpec | None:
    """The ArchSpec of `model` by config.model_type, else the first registered spec whose paths all exist."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt in ARCHS:
        return ARCHS[mt]
    for spec in dict.fromkeys(ARCHS.values()):
        bl = _block_lists(model, spec)
        if bl and all(_first(bl[0][1][0], alts) for alts in (spec.attn, spec.attn_out, spec.ffn, spec.ffn_out)):
            return spec
    return None


def _first(block: nn.Module, alternatives) -> str | None:
    for p in alternatives:
        if get_submodule(block, p) is not None:
            return p
    return None


def _block_lists(model, arch: ArchSpec):
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and matches(name, arch.layers):
            out.append((name, mod))
    return out


@dataclass(frozen=True)
class Block:
    stack: str  # path of the ModuleList (e.g. "model.layers", "encoder.block")
    index: int
    path: str
    module: nn.Module


def blocks(model: nn.Module, arch: ArchSpec) -> list[Block]:
    found = [Block(name, i, f"{name}.{i}", blk) for name, ml in _block_lists(model, arch) for i, blk in enumerate(ml)]
    if not found:
        raise ValueError(
            f"could not find the transformer blocks of this {type(model).__name__} (looked for a ModuleList named "
            f"{arch.layers}); module lists found: {[n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]}"
        )
    return found


def layer_index(name: str, blks: list[Block]) -> int | None:
    for b in blks:
        if name == b.path or name.startswith(b.path + "."):
            return b.index
    return None


def _head_names(model: nn.Module, arch: ArchSpec | None) -> set[str]:
    heads = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = arch.heads if arch else ("classifier", "score", "classification_head", "lm_head", "qa_outputs")
    for name, mod in model.named_modules():
        if (out_emb is not None and mod is out_emb) or matches(name, names):
            heads.add(name)
    return heads


def _own_modules(model: nn.Module):
    """(name, module) of the model's own modules: not those inside adapters' slots or task heads trained in full
    (classes marking themselves `unipeft_internal`), so a second adapter never adapts the first one's parts."""
    skip: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p) for p in skip):
            continue
        if getattr(type(mod), "unipeft_internal", False):  # a head trained in full counts as a head: not a target
            skip.append(name + ".")
            continue
        yield name, mod


def resolve_linears(model: nn.Module, pos: AtLinear, arch: ArchSpec | None) -> list[tuple[str, nn.Module]]:
    """The linear modules an AtLinear position names, in model order. Raises with suggestions if none match."""
    targets = pos.targets
    dims = linear_dims if targets == "all-linear" else adaptable_dims  # embeddings and convs only by name
    linears = [(n, m) for n, m in _own_modules(model) if dims(m) is not None]
    if targets == "all-linear":
        heads = _head_names(model, arch)
        chosen = [(n, m) for n, m in linears if n not in heads]
    else:
        if isinstance(targets, (list, set)):
            targets = tuple(targets)
        # Parts of fused projections (Phi-3's q_proj inside qkv_proj) are targets too; "all-linear" takes the
        # fused linears whole instead.
        linears = linears + fused_slices(model, arch)
        chosen = [(n, m) for n, m in linears if matches(n, targets)]
        # Every listed name must match something: a typo must not silently train fewer modules.
        unmatched = isinstance(targets, tuple) and any(not any(matches(n, (t,)) for n, _ in linears) for t in targets)
        if not chosen or unmatched:
            raise ValueError(_unknown_target_message(targets, linears, model))
    if pos.exclude:
        chosen = [(n, m) for n, m in chosen if not matches(n, pos.exclude)]
    if pos.layers is not None and pos.layers_pattern:
        chosen = [(n, m) for n, m in chosen if pattern_layer_index(n, pos.layers_pattern) in pos.layers]
        if not chosen:
            raise ValueError(f"layers_to_transform={list(pos.layers)} with layers_pattern={list(pos.layers_pattern)} "
                             f"selects no module: the pattern must name the layer list (e.g. 'layers', 'h') whose "
                             f"index follows it in the module paths, e.g. {linears[0][0]!r}")
    elif pos.layers is not None:
        if arch is None:
            raise ValueError("layers_to_transform needs a known architecture (its blocks) or layers_pattern naming "
                             "the layer list; or pass target_modules by regex")
        blks = blocks(model, arch)
        chosen = [(n, m) for n, m in chosen if layer_index(n, blks) in pos.layers]
        if not chosen:
            raise ValueError(f"layers_to_transform={list(pos.layers)} selects no module (the model has "
                             f"{max(b.index for b in blks) + 1} layers)")
    return chosen


def default_targets(model, arch: ArchSpec | None, roles: tuple[str, ...]) -> tuple[str, ...]:
    """Target names for roles (e.g. ("q", "v")) from the architecture table, or a clear error."""
    if arch is None:
        mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        linears = [(n, m) for n, m in model.named_modules() if n and linear_dims(m) is not None]
        raise ValueError(
            f"no default target modules for model type {mt!r}: pass target_modules=[...]; linear modules "
            f"found: {_short_names(linears)}"
        )
    return tuple(dict.fromkeys(t for r in roles for t in arch.role(r)))


def stores_transposed(model, targets, arch) -> bool:
    """True when the targets are Conv1D-style (W stored (in, out)): HF PEFT's `fan_in_fan_out`, recorded in
    saved configs so HF PEFT loads them without a warning. unipeft itself detects it per module."""
    try:
        return any(linear_dims(m) is not None and linear_dims(m)[2]
                   for _, m in resolve_linears(model, AtLinear(targets=targets), arch))
    except ValueError:
        return False  # unresolvable targets raise their clear error at injection


def _short_names(named) -> list[str]:
    return sorted({n.split(".")[-1] for n, _ in named} | {".".join(n.split(".")[-2:]) for n, _ in named})


def _unknown_target_message(targets, linears, model) -> str:
    short = _short_names(linears)
    if isinstance(targets, str):
        return (f"target_modules regex {targets!r} matches no linear module of {type(model).__name__}; "
                f"linear modules found: {short}")
    missing = [t for t in targets if not any(matches(n, (t,)) for n, _ in linears)]
    params = [n for n, _ in model.named_parameters()]
    hints = []
    for t in missing:
        as_param = next((n for n in params if matches(n, (t,))), None)
        if as_param is not None:  # e.g. Mixtral's experts.down_proj: a 3-D parameter, no module to hook
            hints.append(f"{t!r} (a parameter, {as_param}, not a linear module: weight-level deltas need linear "
                         f"modules)")
            continue
        close = difflib.get_close_matches(t, short, n=3, cutoff=0.5)
        hints.append(f"{t!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    return (f"target module(s) {', '.join(hints)} not found in {type(model).__name__}; "
            f"linear modules found: {short}")


@dataclass(frozen=True)
class SublayerSite:
    block: Block
    in_name: str
    in_module: nn.Module
    out_name: str
    out_module: nn.Module
    residual: nn.Module | None = None  # where x + f(x) is reachable (ArchSpec.attn_residual / ffn_residual)


def resolve_sublayers(model: nn.Module, pos: AtSublayer, arch: ArchSpec | None, *,
                      residual: bool = False) -> list[SublayerSite]:
    """The sublayer of every selected block; with `residual`, also the module where its residual sum lives."""
    if arch is None:
        mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"unknown architecture {mt!r}: cannot tell where its attention and FFN sublayers are. Register an "
            f"ArchSpec (unipeft.arch.register_arch) or use a weight-level method with target_modules. "
            f"Modules of the first block: {_first_block_names(model)}"
        )
    ins, outs = (arch.attn, arch.attn_out) if pos.sublayer == Sublayer.ATTN else (arch.ffn, arch.ffn_out)
    sites = []
    for b in blocks(model, arch):
        if pos.layers is not None and b.index not in pos.layers:
            continue
        i, o = _first(b.module, ins), _first(b.module, outs)
        if i is None or o is None:
            raise ValueError(
                f"block {b.path} has no {pos.sublayer.value} sublayer at {ins}/{outs}; its modules: "
                f"{[n for n, _ in b.module.named_modules() if n][:40]}"
            )
        res = None
        if residual:
            alts = arch.attn_residual if pos.sublayer == Sublayer.ATTN else arch.ffn_residual
            r = _first(b.module, alts)
            if r is None:
                other = "ffn" if pos.sublayer == Sublayer.ATTN else "attn"
                hint = f", or position={other!r}" if (arch.ffn_residual if other == "ffn" else arch.attn_residual) else ""
                raise ValueError(
                    f"the {pos.sublayer.value} sublayer of {arch.name} blocks adds its residual inside the block's "
                    f"forward, where no hook can reach it, so form 'after_add_norm' is not available there; use "
                    f"form 'sequential' or 'parallel'{hint}"
                )
            res = get_submodule(b.module, r)
        sites.append(SublayerSite(b, f"{b.path}.{i}", get_submodule(b.module, i), f"{b.path}.{o}",
                                  get_submodule(b.module, o), res))
    return sites


def _first_block_names(model) -> list[str]:
    lists = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return [n for n, _ in model.named_modules() if n][:40]
    return [n for n, _ in lists[0][0].named_modules() if n][:40]


def is_norm(module: nn.Module) -> bool:
    """A layer norm, by type or by transformers' naming (LlamaRMSNorm, T5LayerNorm)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def block_norms(model: nn.Module, arch: ArchSpec | None) -> list[str]:
    """Names of the layer norms with parameters inside the transformer blocks (Houlsby trains them). Adapter
    modules are not looked into; a norm another adapter already copies counts under its own name."""
    if arch is None:
        resolve_sublayers(model, AtSublayer(sublayer=Sublayer.ATTN), arch)  # raises, listing the modules
    found, names = False, []

    def walk(module: nn.Module, path: str) -> None:
        nonlocal found
        for n, m in module.named_children():
            inner = getattr(m, "original_module", None) if getattr(m, "unipeft_internal", False) else m
            if inner is not None and is_norm(inner):
                found = True
                if any(True for _ in inner.parameters(recurse=False)):  # OLMo's norm has none: nothing to train
                    names.append(f"{path}.{n}")
            elif not getattr(m, "unipeft_internal", False):
                walk(m, f"{path}.{n}")

    for b in blocks(model, arch):
        walk(b.module, b.path)
    if not found:
        raise ValueError(f"no layer norm found in the blocks of {type(model).__name__}; use train_layer_norms=False")
    return names

"""add_weighted_adapter: a new LoRA adapter made from existing ones, with HF PEFT's three exact recipes.

For adapters i with weights wᵢ, scales sᵢ = αᵢ/rᵢ and factors Aᵢ (r×in), Bᵢ (out×r), at every linear that any
of them adapts (the new adapter has α = r, so its scale is 1):
    linear  A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ,   B = Σ √|wᵢsᵢ|·Bᵢ       (equal ranks; ΔW = B·A has cross terms, as in HF)
    cat     A = [w₁s₁A₁; w₂s₂A₂; …],      B = [B₁ B₂ …]          (rank Σrᵢ; ΔW = Σ wᵢ·ΔWᵢ exactly)
    svd     U Σ Vᵀ = Σ wᵢ·ΔWᵢ,   B = U[:, :r]·Σ[:r],   A = Vᵀ[:r]  (rank svd_rank or max rᵢ; the best rank-r fit)
"""

from __future__ import annotations

import dataclasses

import torch

from .deltas.low_rank import LowRankDelta
from .positions import LinearDeltaSite

COMBINATIONS = ("linear", "cat", "svd")


def _low_rank_sites(handle, adapter: str) -> dict[str, LinearDeltaSite]:
    sites = {}
    for s in handle.sites:
        if not (isinstance(s, LinearDeltaSite) and type(s.delta) is LowRankDelta):
            raise ValueError(f"add_weighted_adapter combines plain LoRA adapters; {adapter!r} holds "
                             f"{type(s.delta).__name__} at {s.host_name}")
        sites[s.host_name] = s
    return sites


def _union_targets(configs) -> object:
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise ValueError("the adapters mix a regex target_modules with a list of names; add_weighted_adapter cannot "
                         "combine them")
    return tuple(sorted({n for t in targets for n in t}))


def add_weighted_adapter(peft, adapters, weights, adapter_name: str, combination_type: str = "svd", *,
                         svd_rank=None, svd_clamp=None, svd_full_matrices: bool = True, svd_driver=None) -> None:
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapter(s), {len(weights)} weight(s)")
    missing = [a for a in adapters if a not in peft.peft_config]
    if missing:
        raise ValueError(f"adapter(s) {missing} do not exist; this model has {list(peft.peft_config)}")
    if adapter_name in peft.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; choose another name for the combination")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type {combination_type!r} is not supported; choose one of {COMBINATIONS}")
    configs = [peft.peft_config[a] for a in adapters]
    if any(c.peft_type != "LORA" for c in configs):
        raise ValueError(f"add_weighted_adapter combines LoRA adapters; got {[c.peft_type for c in configs]}")
    sites = {a: _low_rank_sites(peft._handles[a], a) for a in adapters}
    heads = [c.name for a in adapters for c in peft._handles[a].copies]
    if len(heads) != len(set(heads)):
        raise ValueError("several of these adapters train their own copy of the same module (modules_to_save, e.g. "
                         "a task head), and full modules cannot be combined; as in HF PEFT this is refused")
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = {s.delta.r for a in adapters for s in sites[a].values()}
    if combination_type == "linear" and len(ranks) != 1:
        raise ValueError(f"combination_type='linear' needs adapters of one rank, got ranks {sorted(ranks)}; use 'cat' "
                         f"or 'svd'")
    rank = {"linear": max(ranks), "cat": sum(max(s.delta.r for s in sites[a].values()) for a in adapters),
            "svd": svd_rank or max(ranks)}[combination_type]
    fields = {f.name for f in dataclasses.fields(configs[0])}
    extra = {k: {} for k in ("rank_pattern", "alpha_pattern") if k in fields}
    cfg = dataclasses.replace(configs[0], r=rank, lora_alpha=rank, use_rslora=False, init_lora_weights=True,
                              target_modules=_union_targets(configs), **extra)
    autocast = {getattr(peft._handles[a], "autocast_adapter_dtype", True) for a in adapters}
    if len(autocast) != 1:
        raise ValueError(f"adapters {adapters} were made with different autocast_adapter_dtype (fp32 trainables or "
                         f"the base's dtype); the combination would have to pick one: combine adapters of one kind")
    handle = peft._inject(adapter_name, cfg, autocast_adapter_dtype=autocast.pop())  # the sources' dtype
    try:
        with torch.no_grad():
            for new in handle.sites:
                parts = [(sites[a][new.host_name], w) for a, w in zip(adapters, weights) if new.host_name in sites[a]]
                A, B = _combine(combination_type, parts, rank, svd_clamp, svd_full_matrices, svd_driver)
                if float(new.s) != 1.0:
                    raise AssertionError(f"the combined adapter's scale is {new.s}, expected 1")
                new.delta.A.zero_()
                new.delta.B.zero_()
                new.delta.A[: A.shape[0]].copy_(A)
                new.delta.B[:, : B.shape[1]].copy_(B)
    except Exception:
        peft.delete_adapter(adapter_name)
        raise
    for p in handle.adapter_parameters().values():  # HF PEFT: the combination starts frozen
        p.requires_grad_(False)


def _combine(kind: str, parts, rank: int, clamp, full_matrices: bool, driver):
    """(A, B) in fp32 from [(site, weight)], each site's scale sᵢ folded in."""
    if kind == "linear":
        ws = [w * float(s.s) for s, w in parts]
        A = sum((1.0 if c >= 0 else -1.0) * abs(c) ** 0.5 * s.delta.A.float() for (s, _), c in zip(parts, ws))
        B = sum(abs(c) ** 0.5 * s.delta.B.float() for (s, _), c in zip(parts, ws))
        return A, B
    if kind == "cat":
        A = torch.cat([w * float(s.s) * s.delta.A.float() for s, w in parts], 0)
        B = torch.cat([s.delta.B.float() for s, _ in parts], 1)
        return A, B
    dW = sum(w * float(s.s) * s.delta.delta_weight() for s, w in parts)  # (out, in)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    B, A = U[:, :k] * S[:k], Vh[:k]
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B

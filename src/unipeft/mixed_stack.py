"""Stacked low-rank deltas for mixed-adapter batches: one gathered computation per host linear for all adapters.

The grouped path (`on_rows`) runs each adapter's delta on its rows: adapters × hosts small calls, several kernels
each, so a mixed batch is launch-bound. Here (the BGMV / punica idea) every host whose active sites are all plain
LoRA stacks the served adapters' factors, zero-padded to the largest rank, scaling folded into B,

    A (n+1, in, r_max)   B (n+1, r_max, out)      slot 0 is zero: "__base__" rows, adapters without a delta here

and adds, with idx the slot of each row,   h += bmm(bmm(x, A[idx]), B[idx])   — a constant number of kernels per
host whatever the number of adapters. Those sites are told `served_elsewhere` for the batch, so they add nothing
themselves. Anything else (DoRA, dropout in training, fused parts, learned scales, IA3, bottlenecks, conv or
embedding LoRA) keeps the grouped path; a host where any active site is such stays grouped as a whole.

The stacks are cached per host for one mixed-batch call (a forward, or a whole generate(), during which the factors
cannot change), so generate() does not restack each token; with grad enabled on trainable factors they are rebuilt
each forward so gradients reach every A, B. Factors sharded by FSDP2 or DeepSpeed ZeRO-3 keep the grouped path (it
calls the delta modules, whose engine hooks gather them).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .deltas.low_rank import LowRankDelta
from .distributed import sharding_of
from .positions.weight import LinearDeltaSite
from .spec import Compose, Form


def stackable(site) -> bool:
    """Plain LoRA on a linear, added in parallel with a fixed scale, no dropout drawn."""
    d = site.delta
    return (type(site) is LinearDeltaSite and type(d) is LowRankDelta and site.side == "out"
            and site.ins.form == Form.PARALLEL and site.ins.compose == Compose.ADD
            and (isinstance(d.dropout, nn.Identity) or not d.training)
            and sharding_of(d.A) is None and sharding_of(d.B) is None)


def _stacks(cache: dict, sites: list, idx: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors each row uses, A[idx] (N, in, r_max) and B[idx] (N, r_max, out), for `sites` (slot i+1 =
    sites[i]; slot 0 zero), B scaled. Gathered once per mixed-batch call when the factors cannot change in it, so
    a cached host costs two kernels, as a single adapter's LoRA does (the gathers and casts are launch-bound)."""
    params = [p for s in sites for p in (s.delta.A, s.delta.B)]
    cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
    if cacheable and dtype in cache:
        return cache[dtype]
    r = max(s.delta.r for s in sites)
    A0, B0 = sites[0].delta.A, sites[0].delta.B
    zA = A0.new_zeros(A0.shape[1], r, dtype=dtype)
    zB = B0.new_zeros(r, B0.shape[0], dtype=dtype)
    As = [zA] + [nn.functional.pad(s.delta.A.to(dtype).t(), (0, r - s.delta.r)) for s in sites]
    Bs = [zB] + [nn.functional.pad((s.delta.B.t() * float(s.s)).to(dtype), (0, 0, 0, r - s.delta.r))
                 for s in sites]
    out = torch.stack(As)[idx], torch.stack(Bs)[idx]
    if cacheable:
        cache[dtype] = out
    return out


class StackedHost:
    """One forward hook on a host linear adding every served adapter's low-rank delta in one gathered bmm pair."""

    def __init__(self, host, sites: list, idx: torch.Tensor):
        self.host, self.sites, self.idx = host, sites, idx
        self.cache: dict = {}  # dtype -> stacks, for this mixed-batch call only
        for s in sites:
            s.served_elsewhere = True
        self._hook = host.register_forward_hook(self._add)

    def _add(self, module, args, out):
        x = args[0]
        A, B = _stacks(self.cache, self.sites, self.idx, out.dtype)
        n = x.shape[0]
        z = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(out.dtype), A)  # (N, T, r_max)
        return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), z, B).view(out.shape)  # h + z·B[idx], one kernel

    def remove(self) -> None:
        self._hook.remove()
        for s in self.sites:
            s.served_elsewhere = False


@contextlib.contextmanager
def stacked_low_rank(handles: dict, names: list, device):
    """Within a mixed-adapter batch (switches and rows already set): serve every all-LoRA host stacked."""
    served = [h for n, h in handles.items() if n in names]
    by_host: dict[int, list] = {}
    for h in served:
        for s in h.sites:
            if s.active:
                by_host.setdefault(id(s.host), []).append(s)
    idx_cache: dict[tuple, torch.Tensor] = {}
    stacked = []
    try:
        for sites in by_host.values():
            adapters = [s.switch.adapter for s in sites]
            if not all(stackable(s) for s in sites) or len(set(adapters)) != len(adapters):
                continue  # grouped path for the whole host
            slot = {a: i + 1 for i, a in enumerate(adapters)}
            k = tuple(adapters)
            if k not in idx_cache:
                idx_cache[k] = torch.tensor([slot.get(n, 0) for n in names], device=device)
            stacked.append(StackedHost(sites[0].host, sites, idx_cache[k]))
        yield
    finally:
        for st in stacked:
            st.remove()

"""Stacked low-rank deltas for mixed-adapter batches: one gathered computation per host linear for all adapters.

The grouped path (`on_rows`) runs each adapter's delta on its rows: adapters × hosts small calls, several kernels
each, so a mixed batch is launch-bound. Here (the BGMV / punica idea) every host whose active sites are all plain
LoRA stacks the served adapters' factors, zero-padded to the largest rank, scaling folded into B,

    A (n+1, in, r_max)   B (n+1, r_max, out)      slot 0 is zero: "__base__" rows, adapters without a delta here

and adds, with idx the slot of each row,   h += bmm(bmm(x, A[idx]), B[idx])   — a constant number of kernels per
host whatever the number of adapters. Those sites are told `served_elsewhere` for the batch, so they add nothing
themselves. Anything else (DoRA, dropout in training, fused parts, learned scales, IA3, bottlenecks, conv or
embedding LoRA) keeps the grouped path; a host where any active site is such stays grouped as a whole.

Hosts of the same shape serving the same adapters (q_proj of every layer, say) build their stacks together, once
per mixed-batch call (a forward, or a whole generate(): generate() does not restack each token), so the setup
costs a constant number of kernels per kind of host, not per host. Factors sharded by FSDP2 or DeepSpeed ZeRO-3
keep the grouped path (it calls the delta modules, whose engine hooks gather them).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .deltas.low_rank import LowRankDelta
from .distributed import sharding_of
from .positions.weight import LinearDeltaSite, output_is_unshared
from .spec import Compose, Form


def stackable(site) -> bool:
    """Plain LoRA on a linear, added in parallel with a fixed scale, no dropout drawn."""
    d = site.delta
    return (type(site) is LinearDeltaSite and type(d) is LowRankDelta and site.side == "out"
            and site.ins.form == Form.PARALLEL and site.ins.compose == Compose.ADD
            and (isinstance(d.dropout, nn.Identity) or not d.training)
            and sharding_of(d.A) is None and sharding_of(d.B) is None)


_GATHER_ONCE_BYTES = 64 * 2**20  # rows' factors gathered for a whole group at once up to this size


class StackGroup:
    """Hosts of one shape (in, out, adapters, ranks): their stacks are built together, once per mixed-batch call and
    dtype, with a constant number of kernels for the whole group (one stack of every layer's factors, the scales
    folded into B by one multiply, one gather by row) instead of a dozen small ops per host, which on a GPU are launch
    overhead (with per-host stacks a mixed forward measured ~0.52x a single-adapter one on an H200). Each host then
    reads its layer.

        A (L, n+1, in, r_max)[:, idx]   B (L, n+1, r_max, out)[:, idx]   — row i gets slot idx[i] of its layer

    The gather by row happens once for the group when the result is small (the launch-bound case: few rows), else
    per host at use (large batches: the memory held stays the adapters'). Stacks never outlive the call (one
    forward, or one generate()): writes that move no version counter (`.data`, fused optimizer kernels) must be seen
    by the next call. Under grad they are built inside the forward, so gradients reach every A and B."""

    def __init__(self, hosts: list, idx: torch.Tensor):
        self.hosts, self.idx = hosts, idx  # hosts: [[site, ...] per host], the same adapters in the same order
        self.cache: dict = {}  # (dtype, grad enabled) -> (A, B, gathered)

    def _build(self, dtype) -> tuple[torch.Tensor, torch.Tensor, bool]:
        first = self.hosts[0]
        r = max(s.delta.r for s in first)
        A0, B0 = first[0].delta.A, first[0].delta.B
        zA, zB = A0.new_zeros(r, A0.shape[1]), B0.new_zeros(B0.shape[0], r)

        def pad_rank(t, dim):  # zero-pad a factor's rank dim to r_max (no op when it is r_max)
            extra = r - t.shape[dim]
            return t if extra == 0 else nn.functional.pad(t, (0, extra) if dim == 1 else (0, 0, 0, extra))

        L, n1 = len(self.hosts), len(first) + 1  # one stack (one kernel) per factor for the whole group
        A = torch.stack([t for sites in self.hosts for t in [zA] + [pad_rank(s.delta.A, 0) for s in sites]])
        B = torch.stack([t for sites in self.hosts for t in [zB] + [pad_rank(s.delta.B, 1) for s in sites]])
        A, B = A.view(L, n1, *A.shape[1:]), B.view(L, n1, *B.shape[1:])
        scale = torch.tensor([[0.0] + [float(s.s) for s in sites] for sites in self.hosts], dtype=B.dtype,
                             device=B.device)  # (L, n+1)
        B = B * scale[:, :, None, None]  # (L, n+1, out, r)
        n_rows = len(self.idx)
        gathered_bytes = n_rows * (A[0, 0].numel() + B[0, 0].numel()) * len(self.hosts) * A.element_size()
        gather = gathered_bytes <= _GATHER_ONCE_BYTES
        if gather:
            A, B = A[:, self.idx], B[:, self.idx]
        return A.to(dtype).transpose(-1, -2), B.to(dtype).transpose(-1, -2), gather  # (L, ·, in, r), (L, ·, r, out)

    def factors(self, layer: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (N, in, r_max), B (N, r_max, out)): the factors of each row of this call at host `layer`."""
        key = (dtype, torch.is_grad_enabled())  # built under grad, the stacks are one graph node every layer uses
        built = self.cache.get(key)
        if built is None:
            built = self.cache[key] = self._build(dtype)
        A, B, gathered = built
        return (A[layer], B[layer]) if gathered else (A[layer][self.idx], B[layer][self.idx])


class StackedHost:
    """One forward hook on a host linear adding every served adapter's low-rank delta: h + (x·A[idx])·B[idx] as one
    bmm and one baddbmm, the kernels one adapter's LoRA costs (a projection and an add-into GEMM). Without grad the
    add goes into the linear's output in place (an out-of-place baddbmm copies h first: one more kernel per host)."""

    def __init__(self, host, sites: list, group: StackGroup, layer: int):
        self.host, self.sites, self.group, self.layer = host, sites, group, layer
        for s in sites:
            s.served_elsewhere = True
        # first among the host's hooks, where its sites' own hooks (registered at injection) would add the delta:
        # a hook the user added after injection sees the adapted output, as it does in a single-adapter batch
        self._hook = host.register_forward_hook(self._add, prepend=True)

    def _add(self, module, args, out):
        x = args[0]
        A, B = self.group.factors(self.layer, out.dtype)  # (N, in, r_max), (N, r_max, out)
        n = x.shape[0]
        z = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(out.dtype), A)  # (N, T, r_max)
        if self._into(module, out):  # serving: into the linear's fresh output, no copy
            out.view(n, -1, out.shape[-1]).baddbmm_(z, B)
            return out
        return torch.baddbmm(out.reshape(n, -1, out.shape[-1]), z, B).view(out.shape)

    def _into(self, module, out) -> bool:
        """In place only where nobody else can hold the output yet: no grad, a fresh contiguous tensor, our hook the
        first code to see it (no global hooks), not under torch.compile."""
        return (not torch.is_grad_enabled() and out._base is None and out.is_contiguous()
                and output_is_unshared(module, self._hook.id))

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
    groups: dict[tuple, list] = {}  # hosts computing the same shapes for the same adapters -> stacked together
    for sites in by_host.values():
        adapters = [s.switch.adapter for s in sites]
        if not all(stackable(s) for s in sites) or len(set(adapters)) != len(adapters):
            continue  # grouped path for the whole host
        d = sites[0].delta
        key = (tuple(adapters), tuple(s.delta.r for s in sites), d.A.shape[1], d.B.shape[0], d.A.dtype, d.A.device)
        groups.setdefault(key, []).append(sites)
    stacked = []
    try:
        for key, hosts in groups.items():
            slot = {a: i + 1 for i, a in enumerate(key[0])}
            group = StackGroup(hosts, torch.tensor([slot.get(n, 0) for n in names], device=device))
            stacked += [StackedHost(sites[0].host, sites, group, i) for i, sites in enumerate(hosts)]
        yield
    finally:
        for st in stacked:
            st.remove()

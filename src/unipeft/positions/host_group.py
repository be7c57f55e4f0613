"""Linears of one adapter that read the same x (q, k, v; gate, up), each with its delta computed inside its GEMMs
(`weight.HostForward`), computed in one autograd node by the first of them to be called; the others' outputs wait
for their own calls, which take them.

    q_proj(x) -> [y_q, y_k, y_v] = delta.linears_with(x, q, k, v)     y_k, y_v left for k_proj(x), v_proj(x)

For LoRA that is one x·[A_q; A_k; A_v]ᵀ GEMM reading x once, and one ∂x buffer that every GEMM of the backward
accumulates into (`functional.linears_low_rank`), where three linears computed apart make autograd sum three (tokens,
in) gradients in passes of their own. The groups are learned from the calls and take effect checkpoint-safely
(`deltas/same_input.py`). A left output is served only to the call it was made for: the same x (its identity within
the pass, its version) and the same weights (each tensor's storage and version, the scale), or it is computed anew.
"""

from __future__ import annotations

import torch

from ..compat import tensor_version
from ..deltas.same_input import SameInputGroups


def _stamp(site) -> tuple:
    """What the site's output was computed from: changed in place or replaced, a left output is not served."""
    host, delta = site.host, site.delta
    return (float(site.s),) + tuple(None if t is None else (t.data_ptr(), tensor_version(t))
                                    for t in (host.weight, host.bias, delta.A, delta.B))


class HostGroups(SameInputGroups):
    def output(self, site, x: torch.Tensor) -> torch.Tensor:
        """The output of `site`'s host with its delta inside (the caller checked `site.fuses(x)`)."""
        if not self.active() or x.is_inference():  # an inference tensor has no version to check a left output by
            return site.fused_output(x)
        readers, left = self.read(site, x, site.delta.training)
        got = left.pop(id(site), None)
        if got is not None and got[0] is site and got[2] == (tensor_version(x), _stamp(site)):
            return got[1]
        group = self.group_of(site)
        if len(group) > 1 and all(m is site or m.fuses(x) for m in group):
            outs = type(site.delta).linears_with(x, [(m.delta, m.host.weight, m.host.bias, float(m.s)) for m in group])
            for m, out in zip(group, outs):
                if m is not site:
                    left[id(m)] = (m, out, (tensor_version(x), _stamp(m)))
            out = outs[group.index(site)]
        else:
            out = site.fused_output(x)
        self.computed(site, readers, out)
        return out

    def compatible(self, group) -> bool:
        """One node computes them: deltas of one kind that offer `linears_with`, on one device, in one mode."""
        d0 = group[0].delta
        return all(type(m.delta) is type(d0) and m.delta.training == d0.training
                   and m.host.weight.device == group[0].host.weight.device for m in group)

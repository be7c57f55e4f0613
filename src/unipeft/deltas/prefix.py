"""Prefix keys/values.  Li & Liang 2021 (arXiv:2101.00190); flat = P-tuning v2 (arXiv:2110.07602).

One table serves all the attention sites of an insertion: row p, column block l holds layer l's
[key (H_kv·d) | value (H_kv·d)] for virtual token p — HF PEFT's `prompt_embeddings` layout, so its
checkpoints load as they are. With reparameterization the table is MLP(E):

    E (P × d_e) ─ Linear(d_e → m) ─ tanh ─ Linear(m → L·2·H_kv·d) ─> table (P × L·2·H_kv·d)

computed once per forward pass of the model for all sites: a pre-hook on the model root calls the delta with no
slot (`forward(None)`, a module call so ZeRO-3 gathers the parameters), outside every layer, and the sites slice
that table. Without a pass table (the backbone called directly, or transformers' gradient checkpointing on) each
site computes only its own slice, as before; so do FSDP2-sharded tables (the root hook may run before FSDP2's
gather).

A pass table lives no longer than its pass: made without autograd, it is dropped when the forward returns (or
raises); made with autograd, a non-reentrant activation-checkpoint recompute (in backward, after the pass) slices
the very tensor the forward sliced, so both save the same tensors, and the table is dropped once backward has
passed through it. Version counters cannot stand in for that: DeepSpeed ZeRO-3's step (and any write through
`.data`) changes the values and leaves them as they were, so a backbone-direct call after a step (generate()'s
encoder call) would meet a stale table. Within its life a table is also used only while the version counters of
its parameters are unchanged. Under transformers' gradient checkpointing no table is
made: a reentrant recompute runs its own backward per layer, which must not share one graph between layers.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..compat import tensor_version
from ..spec import Prefix
from .base import DeltaModule


class PrefixDelta(DeltaModule):
    spec_type = Prefix
    hf_exports = ("prompt_embeddings",)

    def __init__(self, spec: Prefix, d_in: int, d_out: int, *, sites: int, kv_heads: int, head_dim: int,
                 side: str = "out", dtype=None, device=None):
        super().__init__()
        self.P, self.L, self.H, self.hd = spec.length, sites, kv_heads, head_dim
        width = sites * 2 * kv_heads * head_dim
        kw = dict(dtype=dtype, device=device)
        if spec.projection:
            d_e = kv_heads * head_dim
            self.embedding = nn.Parameter(torch.randn(spec.length, d_e, **kw))  # (P, d_e), as nn.Embedding
            self.transform = nn.Sequential(nn.Linear(d_e, spec.projection, **kw), nn.Tanh(),
                                           nn.Linear(spec.projection, width, **kw))
        else:
            init = torch.zeros if spec.init == "zeros" else torch.randn
            self.table = nn.Parameter(init(spec.length, width, **kw))  # (P, L·2·H·d)
        if spec.init == "zero_values":
            self._zero_values()
        self._pass = _PassCache()

    @torch.no_grad()
    def _zero_values(self) -> None:
        """P_v = 0 at every site (the value half of each layer's block): an added prefix starts as the identity."""
        w = self.H * self.hd
        values = torch.arange(self.L * 2 * w, device=self.table.device if not self.reparameterized else
                              self.transform[2].weight.device).view(self.L, 2, w)[:, 1].flatten()
        if self.reparameterized:
            self.transform[2].weight[values] = 0
            self.transform[2].bias[values] = 0
        else:
            self.table[:, values] = 0

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "transform")

    def begin_pass(self, cache: bool) -> None:
        """A forward pass of the model begins: drop the last pass's table; with `cache`, make this pass's table."""
        self._pass.entry = None
        if cache and self.reparameterized and not _sharded(self.embedding):
            self(None)

    def end_pass(self) -> None:
        """The forward pass returned or raised: drop its table now, or (in an autograd graph, which a non-reentrant
        checkpoint may recompute from) once backward has passed through it."""
        entry = self._pass.entry
        if entry is None:
            return
        table = entry[1]
        if not table.requires_grad:
            self._pass.entry = None
        elif not torch.compiler.is_compiling():  # weakly: the hook lives on the table the cache holds
            cache, made = weakref.ref(self._pass), weakref.ref(table)
            table.register_hook(lambda grad: _drop(cache(), made()))

    def _versions(self) -> tuple:
        return tuple(tensor_version(p) for p in (self.embedding, *self.transform.parameters()))

    def _pass_table(self) -> torch.Tensor | None:
        """This pass's MLP(E) for every site, or None (compute per site): none made, parameters changed since, or
        made without autograd while this site needs gradients."""
        entry = self._pass.entry
        if entry is None or not torch.compiler.is_compiling() and entry[0] != self._versions():
            return None  # under compile the entry is this traced pass's own (its versions are not known: None)
        table = entry[1]
        if torch.is_grad_enabled() and not table.requires_grad and self.embedding.requires_grad:
            return None
        return table

    def forward(self, slot: int | None, batch: int = 1, dtype=None):
        """Site `slot`'s prefix keys and values (see kv); slot None: compute this pass's table for all sites. The
        seam and the pass hook call the module, so ZeRO-3's hooks see the table used."""
        if slot is None:
            versions = None if torch.compiler.is_compiling() else self._versions()
            self._pass.entry = (versions, self.transform(self.embedding))  # (P, L·2·H·d)
            return None
        return self.kv(slot, batch, dtype)

    def kv(self, slot: int, batch: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Site `slot`'s prefix keys and values, each (B, H_kv, P, d)."""
        w = 2 * self.H * self.hd
        table = self._pass_table() if self.reparameterized else None
        if table is not None:
            block = table[:, slot * w:(slot + 1) * w]
        elif self.reparameterized:
            h = self.transform[1](self.transform[0](self.embedding))  # (P, m)
            last = self.transform[2]
            rows = slice(slot * w, (slot + 1) * w)
            block = nn.functional.linear(h, last.weight[rows], last.bias[rows])  # (P, 2·H·d)
        else:
            block = self.table[:, slot * w:(slot + 1) * w]
        kv = block.to(dtype).view(self.P, 2, self.H, self.hd).permute(1, 2, 0, 3)  # (2, H, P, d)
        return kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)

    def full_table(self) -> torch.Tensor:
        return self.transform(self.embedding) if self.reparameterized else self.table

    # HF PEFT stores only the final table, as `prompt_embeddings` -----------------------------------
    def hf_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.full_table().detach()}

    @torch.no_grad()
    def load_hf_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        t = tensors["prompt_embeddings"]
        want = (self.P, self.L * 2 * self.H * self.hd)
        if tuple(t.shape) != want:
            raise ValueError(f"prompt_embeddings has shape {tuple(t.shape)} but this model's prefix table is {want} "
                             f"(num_virtual_tokens × layers·2·kv_heads·head_dim); the adapter is for another model")
        ref = self.embedding if self.reparameterized else self.table
        self._pass.entry = None
        if self.reparameterized:  # only the table was saved: continue with it, flat
            del self.embedding, self.transform
        self.table = nn.Parameter(t.to(dtype=ref.dtype, device=ref.device).clone())

    @torch.no_grad()
    def set_table(self, table: torch.Tensor) -> None:
        """Initialise from given key/value activations (P × L·2·H·d), e.g. those of real tokens."""
        if self.reparameterized:
            raise ValueError("init from activations needs the flat table (prefix_projection=False)")
        self.table.copy_(table.to(self.table.dtype))


def _sharded(p: torch.Tensor) -> bool:
    """An FSDP2 (DTensor) parameter: the root hook may run before FSDP2's own pre-hook gathers it, so the sites
    compute their slices inside the layers, after the gather (as without a pass table)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _drop(cache: "_PassCache | None", table: torch.Tensor | None) -> None:
    """Backward has reached `table`: every recompute that slices it is done."""
    if cache is not None and cache.entry is not None and cache.entry[1] is table:
        cache.entry = None


class _PassCache:
    """The pass table of one PrefixDelta: (parameter versions, MLP(E)) or None. Copies and pickles start empty: the
    table is part of an autograd graph (deepcopy refuses those) and belongs to one pass of one model."""

    def __init__(self):
        self.entry = None

    def __deepcopy__(self, memo):
        return _PassCache()

    def __reduce__(self):
        return (_PassCache, ())

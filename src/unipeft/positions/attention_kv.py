"""Attention-KV position: prefix keys/values through ONE attention seam (transformers' AttentionInterface).

The model's attention implementation (sdpa, eager, ...) is wrapped by `seam`, registered under a new name:

    seam(module, q, k, v, mask):   k ← [P_k ; k],  v ← [P_v ; v],  mask ← [visible | mask]

Prefixes never enter the KV cache, so generation with a cache and a full forward see the same thing. With
`position_shift` (HF PEFT's semantics) the prefix stands at positions 0..P-1 as if it were cached tokens: real
tokens' position ids start at P (`PrefixPositions`), and a relative position bias (T5) gets the prefix's
columns from the bias of those positions; without it real tokens keep 0..T-1 and the prefix columns get zero
bias. Without position ids from the caller they are derived from the attention mask, so a left-padded row sees
the same positions as the row alone. Prefix K/V have the model's KV-head count (GQA).

Two mask paths compute the same attention (the explicit one is the reference in tests):
    explicit   mask ← [visible | mask], a dense boolean/additive (·, 1, T, P+S) tensor: every case
    fast       no dense mask where the batch needs none (transformers passes mask None: equal lengths, no
               padding, no packed rows) and no relative bias, soft-cap or per-query prefix visibility (`seen`)
               applies; a padded or packed batch (a dense mask) keeps the explicit path. On sdpa a causal layer gets
               `causal_lower_right(T, P+S)` (torch's CausalBias): query i sees every prefix key and real keys
               j <= past + i, i.e. the causal mask aligned to the bottom-right corner, which SDPA runs on its
               flash / memory-efficient kernels without materializing a mask (SDPA's own is_causal would align
               top-left once keys outnumber queries, hiding prefix and past keys). Eager keeps the explicit mask.
    Why not the log-sum-exp merge of a separate prefix term (He et al.'s gated form): it equals the joint softmax
    only given the causal attention's own log-sum-exp, which torch's public SDPA does not return; the joint
    softmax over [P; K] under CausalBias is the same function in one fused call.
flash_attention_* stay refused: transformers loads the flash kernel by the config's implementation name, which
the seam replaces (a name containing "flash" is looked up as a hub kernel); sdpa's fast path serves instead.

Composition (the unified view's two prefix points, He et al. 2022 §3):
    gate (softmax)   the concat above: head = (1-λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v)        prefix tuning
    add (relu)       head_i + s·ReLU(q_i P_kᵀ·scale) P_v, the attention itself untouched      multi-head PA
    add (softmax)    head_i + s·softmax(q_i P_kᵀ·scale) P_v (the prefix normalized on its own)
An added term is computed from each query alone, with the attention's own scale, soft-cap and dropout, and is
added to the head outputs the attention function returns, i.e. before the output projection. Its prefix rows
are never masked: like the prefix columns of the concat they have no position, so a causal or padding mask has
nothing to hide there, and a row's term does not depend on any other position (padding cannot change it).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .. import functional as Fn
from ..compat import (attn_implementation, calls_attention_interface, eager_attention_of,
                      set_config_attn_implementation)
from ..spec import Compose, Form, Insertion
from .base import Switch

_SEAM_PREFIX = "unipeft_prefix_"
_MASK_PATHS = ("fast", "explicit")
_mask_path = ["fast"]


@contextlib.contextmanager
def prefix_mask_path(path: str):
    """Within the block, joined prefixes use `path`: "fast" (the default: no dense mask where none is needed) or
    "explicit" (always the dense [visible | mask] mask: the reference the fast path is tested against)."""
    if path not in _MASK_PATHS:
        raise ValueError(f"prefix_mask_path takes one of {_MASK_PATHS}; got {path!r}")
    saved, _mask_path[0] = _mask_path[0], path
    try:
        yield
    finally:
        _mask_path[0] = saved


def _fast_mask(base_name: str, mask, seen, cols, q_len: int, P: int, kv_len: int, causal: bool, kwargs):
    """(True, the mask to pass) where the joined prefix needs no dense mask on `base_name`, else (False, None).
    Exact only when every query sees every prefix key and its causal window of real keys: no padding mask, no
    per-query prefix visibility, no relative bias (position_bias makes sdpa build a float mask anyway)."""
    if _mask_path[0] != "fast" or mask is not None or seen is not None or cols is not None:
        return False, None
    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return False, None
    if base_name == "sdpa":
        return True, (causal_lower_right(q_len, P + kv_len) if causal and q_len > 1 else None)
    return False, None


def _registries():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    return ALL_ATTENTION_FUNCTIONS, AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


def _extend_mask(mask, P: int, q_len: int, kv_len: int, causal: bool, ref: torch.Tensor, seen=None):
    """[prefix | mask] over P + kv_len keys; builds the bottom-right causal mask when mask is None. `seen`
    (bool, (B|1, 1, T, P)) says which prefix columns each query sees; None: all of them."""
    if mask is None:
        if (not causal or q_len == 1) and seen is None:
            return None  # everything visible: no mask needed
        i = torch.arange(q_len, device=ref.device)[:, None] + (kv_len - q_len)
        j = torch.arange(kv_len, device=ref.device)[None, :]
        mask = ((j <= i) if causal else (j >= 0).expand(q_len, kv_len))[None, None]  # (1, 1, T, S)
    if seen is None:
        seen = torch.ones((*mask.shape[:-1], P), dtype=torch.bool, device=mask.device)
    else:
        B = max(mask.shape[0], seen.shape[0])
        mask, seen = mask.expand(B, *mask.shape[1:]), seen.expand(B, mask.shape[1], mask.shape[2], P)
    if mask.dtype != torch.bool:  # additive float mask
        seen = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(~seen, torch.finfo(mask.dtype).min)
    return torch.cat([seen.to(mask.device), mask], dim=-1)


def _prefix_seen(site, P: int, kwargs):
    """Which prefix columns each query sees. All of them in our semantics (a prefix has no position). Under HF
    PEFT's (position_shift: the prefix is P cached tokens at positions 0..P-1) a sliding-window layer shows a
    query at position p only the prefix rows j with p - j < window, as HF PEFT's cached prefix would be."""
    window = kwargs.get("sliding_window")
    if not window or not site.ins.position.position_shift:
        return None
    pos = kwargs.get("position_ids")
    if pos is None:
        raise ValueError("prefix tuning with position_shift=True on a sliding-window attention needs the queries' "
                         "position_ids, which this model does not pass to its attention function")
    return (pos[:, None, :, None] - torch.arange(P, device=pos.device)) < window  # (B|1, 1, T, P)


def _pad_bias(bias, P: int, prefix_bias=None):
    """[prefix columns | bias]: the prefix's own relative bias (HF's cached positions 0..P-1), else zeros."""
    if bias is None:
        return None
    if prefix_bias is None:
        return torch.cat([bias.new_zeros((*bias.shape[:-1], P)), bias], dim=-1)
    B = max(bias.shape[0], prefix_bias.shape[0])  # a mixed batch's columns differ per row
    bias = bias.expand(B, *bias.shape[1:])
    return torch.cat([prefix_bias.to(bias.dtype).expand(*bias.shape[:-1], P), bias], dim=-1)


def make_seam(base_name: str):
    ALL, _, _, _ = _registries()

    def seam(module, query, key, value, attention_mask, **kwargs):
        base = ALL[base_name] if base_name in ALL else eager_attention_of(module)
        site = _site_of(module)
        if site is not None and site.capture is not None:  # recording real tokens' keys/values
            site.capture[site] = (key, value)
            return base(module, query, key, value, attention_mask, **kwargs)
        if site is None or not site.active:
            return base(module, query, key, value, attention_mask, **kwargs)
        B, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        causal = kwargs.get("is_causal", None)
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if site.switch.rows is not None:  # a mixed-adapter batch: each row its own adapter's prefix, or none
            on = [s for s in getattr(module, "_unipeft_kv", ()) if s.active and s.switch.rows is not None]
            added = [s for s in on if s.ins.compose == Compose.ADD]  # terms on their rows' head outputs
            joined = [s for s in on if s.ins.compose != Compose.ADD]  # keys/values joined to the softmax
            if not joined:
                out, *rest = base(module, query, key, value, attention_mask, **kwargs)
                return (_added_rows(added, module, query, out, kwargs), *rest)
            pk, pv, seen, cols = _mixed_prefix(joined, B, q_len, kv_len, key.dtype, kwargs)
            P = pk.shape[2]
        else:
            pk, pv = site.delta(site.slot, B, key.dtype)  # (B, H_kv, P, d)
            if site.ins.compose == Compose.ADD:
                return _added(site, base, module, query, key, value, attention_mask, pk, pv, kwargs)
            P = pk.shape[2]
            seen, cols = _prefix_seen(site, P, kwargs), site.prefix_bias(q_len, kv_len, P)
        fast, mask = _fast_mask(base_name, attention_mask, seen, cols, q_len, P, kv_len, causal, kwargs)
        attention_mask = mask if fast else _extend_mask(attention_mask, P, q_len, kv_len, causal, query, seen)
        if "position_bias" in kwargs:
            kwargs["position_bias"] = _pad_bias(kwargs["position_bias"], P, cols)
        if "is_causal" in kwargs:
            kwargs["is_causal"] = False  # the mask is explicit now
        out, *rest = base(module, query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), attention_mask, **kwargs)
        if site.switch.rows is not None and added:
            out = _added_rows(added, module, query, out, kwargs)
        return (out, *rest)

    return seam


def _mixed_prefix(on: list, B: int, q_len: int, kv_len: int, dtype, kwargs):
    """A mixed-adapter batch's joined prefixes at one attention (`on`: their sites): (pk, pv) (B, H_kv, Pmax, d) with
    row b's adapter's P_b keys/values first, `seen` (B, 1, q, Pmax) showing row b only those, and the relative-bias
    columns (B, H, q, Pmax) or None. Computed once per adapter group; rows of adapters without a joined prefix here
    see no prefix column."""
    kvs = [(s, s.delta(s.slot, s.switch.rows.shape[0], dtype)) for s in on]
    Pmax = max(k.shape[2] for _, (k, _) in kvs)
    H, d = kvs[0][1][0].shape[1], kvs[0][1][0].shape[3]
    ref = kvs[0][1][0]
    pk = ref.new_zeros(B, H, Pmax, d)
    pv = ref.new_zeros(B, H, Pmax, kvs[0][1][1].shape[3])
    seen = torch.zeros(B, 1, q_len, Pmax, dtype=torch.bool, device=ref.device)
    cols = None
    for s, (k, v) in kvs:
        rows, P = s.switch.rows, k.shape[2]
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], Pmax - P, t.shape[3])], 2) if P < Pmax else t  # noqa: E731
        pk, pv = pk.index_put((rows,), pad(k)), pv.index_put((rows,), pad(v))
        sees = _prefix_seen(s, P, kwargs)  # (B|1, 1, q, P) or None: all
        sees = torch.ones(1, 1, q_len, P, dtype=torch.bool, device=ref.device) if sees is None else sees
        sees = sees.expand(B, 1, q_len, P)[rows]
        seen = seen.index_put((rows,), torch.cat([sees, sees.new_zeros(rows.shape[0], 1, q_len, Pmax - P)], -1))
        bias = s.prefix_bias(q_len, kv_len, P)  # (1, H, q, P) or None
        if bias is not None:
            cols = bias.new_zeros(B, bias.shape[1], q_len, Pmax) if cols is None else cols
            block = torch.cat([bias, bias.new_zeros(*bias.shape[:-1], Pmax - P)], -1)
            cols = cols.index_put((rows,), block.expand(rows.shape[0], -1, -1, -1))
    return pk, pv, seen, cols


def _with_added(site, module, query, out, pk, pv, kwargs):
    """out (B', T, H, d) + s·w(q P_kᵀ·scale) P_v for the query rows `out` holds: the added prefix term."""
    scaling = kwargs.get("scaling")
    delta = Fn.prefix_attention_added(query, pk, pv, site.ins.delta.normalization,
                                      query.shape[-1] ** -0.5 if scaling is None else scaling, kwargs.get("softcap"),
                                      kwargs.get("dropout") or 0.0, module.training)
    return Fn.compose(out, delta.transpose(1, 2).to(out.dtype), site.ins.scale)


def _added_rows(added: list, module, query, out, kwargs):
    """A mixed-adapter batch's added prefix terms, each on its own rows' head outputs (once per adapter group)."""
    for s in added:
        rows = s.switch.rows
        pk, pv = s.delta(s.slot, rows.shape[0], query.dtype)
        out = out.index_put((rows,), _with_added(s, module, query[rows], out[rows], pk, pv, kwargs))
    return out


def _added(site, base, module, query, key, value, attention_mask, pk, pv, kwargs):
    """The attention as it is, plus the added prefix term on each head's output."""
    out, *rest = base(module, query, key, value, attention_mask, **kwargs)
    return (_with_added(site, module, query, out, pk, pv, kwargs), *rest)


def _site_of(module):
    """The prefix site that acts at this attention module now: the one recording, or the active adapter's."""
    sites = getattr(module, "_unipeft_kv", ())
    if len(sites) <= 1:
        return sites[0] if sites else None
    on = [s for s in sites if s.capture is not None] or [s for s in sites if s.active]
    if len(on) > 1 and all(s.switch.rows is not None for s in on):
        return on[0]  # a mixed-adapter batch: the seam serves every adapter's rows (_mixed_prefix)
    if len(on) > 1:
        raise ValueError(f"prefixes of adapters {[s.switch.adapter for s in on]} are active together at one attention "
                         f"module; activate one of them (set_adapter)")
    return on[0] if on else sites[0]


def seam_name(base_name: str) -> str:
    if base_name.startswith(_SEAM_PREFIX):
        return base_name
    if "flash" in base_name:  # transformers picks the flash kernel by the config's name: a wrapped name breaks it
        raise ValueError(f"prefix methods wrap the attention under a new implementation name, and transformers loads "
                         f"a flash kernel by that name, so attn_implementation={base_name!r} cannot be wrapped. Load "
                         f"the model with attn_implementation='sdpa': without padding the prefix keeps SDPA's fused "
                         f"(flash / memory-efficient) kernels there")
    ALL, AI, MASKS, MI = _registries()
    name = _SEAM_PREFIX + base_name
    if name not in ALL:
        AI.register(name, make_seam(base_name))
        MI.register(name, MASKS[base_name])
    return name


def check_seam(module: nn.Module, name: str) -> None:
    """Refuse attention modules that do not route through the AttentionInterface (no seam to hook)."""
    if not calls_attention_interface(type(module)):
        raise ValueError(
            f"{name} ({type(module).__name__}) does not call transformers' AttentionInterface, so prefix keys/values "
            f"cannot be inserted there; prefix methods need an architecture whose attention uses it (transformers "
            f">= 4.48 for Llama/GPT-2/BERT/T5)"
        )


# The (form, compose, normalization) points a prefix at attention K/V computes: attended to together with the real
# keys (the softmax-mass gate of He et al. eq. 7), or added to each head's output with its own weights (a ReLU:
# the multi-head parallel adapter; a softmax over the prefix alone). Other values would be labels only.
VALID_FORMS = {(Form.PARALLEL, Compose.GATE, "softmax"), (Form.PARALLEL, Compose.ADD, "softmax"),
               (Form.PARALLEL, Compose.ADD, "relu")}


def check_insertion(ins: Insertion, module: nn.Module, name: str, adapter: str = "default") -> None:
    """Refuse what a prefix cannot compute, and a second prefix of one adapter on one attention (one would
    silently win; prefixes of different adapters take turns, see _site_of)."""
    point = (ins.form, ins.compose, getattr(ins.delta, "normalization", "softmax"))
    if point not in VALID_FORMS:
        raise ValueError(f"a prefix at attention keys/values computes (form, compose, normalization) in "
                         f"{sorted((f.value, c.value, n) for f, c, n in VALID_FORMS)} (gate: the joint softmax of "
                         f"prefix tuning; add: a term added to each head, relu = the multi-head parallel adapter); "
                         f"got {(point[0].value, point[1].value, point[2])}, which would be a label only")
    if ins.compose == Compose.ADD and ins.position.position_shift:
        raise ValueError("an added prefix (compose='add') has no positions; position_shift=True (HF PEFT's prefix as "
                         "cached tokens at 0..P-1) applies to the joint softmax (compose='gate') only")
    other = next((s for s in getattr(module, "_unipeft_kv", ()) if s.switch.adapter == adapter), None)
    if other is not None:
        raise ValueError(f"{name} already holds the prefix {other.ins.name!r}; two prefixes on one attention are not "
                         f"supported (the second would replace the first). Use one prefix with more virtual tokens, "
                         f"or put the insertions on disjoint layers")


def relative_bias_source(modules: list[nn.Module]):
    """The module computing the relative position bias of an attention stack (T5's first layer), or None."""
    for m in modules:
        if getattr(m, "has_relative_attention_bias", False) and callable(getattr(m, "compute_bias", None)):
            return m
    return None


class AttentionKVSite:
    """A prefix at one attention module. The shared prefix table lives on the model root."""

    rowwise = True  # in a mixed-adapter batch the seam gives each row its adapter's prefix or added term

    def __init__(self, module: nn.Module, name: str, ins: Insertion, delta, slot: int, switch: Switch, root_name: str,
                 bias_source: nn.Module | None = None):
        self.host, self.host_name, self.ins, self.delta, self.slot, self.switch = module, name, ins, delta, slot, switch
        self.merged, self.path, self.capture = False, root_name, None
        self.bias_source = bias_source if ins.position.position_shift else None
        module.__dict__.setdefault("_unipeft_kv", []).append(self)  # one per adapter

    def prefix_bias(self, q_len: int, kv_len: int, P: int):
        """(1, H, q_len, P): the relative bias queries at P + past + i give to cached positions 0..P-1 (HF PEFT's
        cache route), or None (zero bias) without position_shift or a relative bias."""
        if self.bias_source is None:
            return None
        full = self.bias_source.compute_bias(q_len, P + kv_len, past_seen_tokens=P + kv_len - q_len)
        return full[..., :P]

    @property
    def active(self) -> bool:
        return self.switch.on

    def merge(self):
        raise ValueError(f"prefix keys/values ({self.ins.describe()}) cannot be merged into weights")

    def unmerge(self):
        pass

    def remove(self):
        sites = self.host.__dict__.get("_unipeft_kv", [])
        if self in sites:
            sites.remove(self)
        if not sites:
            self.host.__dict__.pop("_unipeft_kv", None)


class PrefixPasses:
    """A pre-hook on the model root: each forward pass computes the prefix table's MLP reparameterization once for
    all layers (deltas/prefix.py), except under transformers' gradient checkpointing, where each layer computes
    its slice in its forward and again in its recompute; a forward hook ends the pass (the table's lifetime is in
    deltas/prefix.py). Undone with the adapter."""

    def __init__(self, model: nn.Module, delta):
        # transformers >= 5 names the property is_activation_checkpointing (is_gradient_checkpointing warns)
        flag = next((f for f in ("is_activation_checkpointing", "is_gradient_checkpointing")
                     if hasattr(type(model), f)), None)

        def begin(module, args):
            checkpointing = module.training and flag is not None and getattr(module, flag)
            delta.begin_pass(cache=not checkpointing)

        def end(module, args, out):  # always called: a forward that raises drops its table too
            delta.end_pass()

        self._hooks = [model.register_forward_pre_hook(begin), model.register_forward_hook(end, always_call=True)]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


class SeamConfigs:
    """Switches every config of the model to the seam implementation, and back when the last adapter that
    needs it is removed (adapters with prefixes share the switch)."""

    _users: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (count, saved implementations)

    def __init__(self, model: nn.Module):
        from transformers import PretrainedConfig

        self.model = model
        count, saved = self._users.get(model, (0, None))
        if saved is None:
            cfgs = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)}
            saved = [(c, attn_implementation(c)) for c in cfgs.values()]
            _switch(model, [(c, seam_name(impl or "eager")) for c, impl in saved])
        self._users[model] = (count + 1, saved)
        self.saved = saved

    def remove(self):
        count, saved = self._users.get(self.model, (1, self.saved))
        if count > 1:
            self._users[self.model] = (count - 1, saved)
            return
        self._users.pop(self.model, None)
        _switch(self.model, saved)


def _switch(model: nn.Module, want: list) -> None:
    """Give each config its implementation name: through each PreTrainedModel's public set_attn_implementation
    (outermost first; inner models then set their own), and where none reached a config (a config no
    PreTrainedModel owns, a sub-config set_attn_implementation does not walk, or None to restore) directly."""
    from transformers import PreTrainedModel

    by_id = {id(c): name for c, name in want}
    for m in model.modules():
        name = by_id.get(id(getattr(m, "config", None)))
        if isinstance(m, PreTrainedModel) and name is not None and attn_implementation(m.config) != name:
            m.set_attn_implementation(name)
    for c, name in want:
        if attn_implementation(c) != name:
            set_config_attn_implementation(c, name)


@torch.no_grad()
def init_prefix_from_tokens(model: nn.Module, handle, ids: tuple[int, ...]) -> None:
    """Set each prefix table to the keys/values real tokens produce at each site (tiled to P rows)."""
    sites = [s for s in handle.sites if isinstance(s, AttentionKVSite)]
    captured: dict = {}
    for s in sites:
        s.capture = captured
    x = torch.tensor([ids], device=next(model.parameters()).device)
    kw = {"decoder_input_ids": x} if getattr(model.config, "is_encoder_decoder", False) else {}
    was_training = model.training
    try:
        model.eval()
        model(input_ids=x, **kw)
    finally:
        model.train(was_training)
        for s in sites:
            s.capture = None
    for delta in {id(s.delta): s.delta for s in sites}.values():
        by_slot: dict = {}
        for s in sites:
            if s.delta is delta:
                by_slot.setdefault(s.slot, s)  # sites sharing a block (HF's seq2seq layout): the first one's
        cols = []
        for slot in range(delta.L):
            if slot not in by_slot:  # a block no site reads
                cols.append(torch.zeros(len(ids), 2 * delta.H * delta.hd, device=x.device))
                continue
            k, v = captured[by_slot[slot]]  # (1, H_kv, T, d)
            cols.append(torch.cat([k[0].transpose(0, 1).flatten(1), v[0].transpose(0, 1).flatten(1)], -1))
        table = torch.cat(cols, -1)  # (T, L·2·H·d)
        reps = -(-delta.P // table.shape[0])
        delta.set_table(table.repeat(reps, 1)[: delta.P])

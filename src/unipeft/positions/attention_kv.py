"""Attention-KV position: prefix keys/values through ONE attention seam (transformers' AttentionInterface).

The model's attention implementation (sdpa, eager, ...) is wrapped by `seam`, registered under a new name:

    seam(module, q, k, v, mask):   k ← [P_k ; k],  v ← [P_v ; v],  mask ← [visible | mask]

Prefixes never enter the KV cache, so generation with a cache and a full forward see the same thing, and
real tokens keep their positions (set position_shift for HF PEFT's shifted positions). The mask is always
explicit: SDPA's own is_causal would align top-left once keys outnumber queries. Prefix K/V have the
model's KV-head count (GQA); T5's relative position bias gets zero columns for the prefix.
"""

from __future__ import annotations

import inspect
import weakref
import sys

import torch
from torch import nn

from ..spec import Insertion
from .base import Switch

_SEAM_PREFIX = "unipeft_prefix_"


def _registries():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    return ALL_ATTENTION_FUNCTIONS, AttentionInterface, ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface


def _extend_mask(mask, P: int, q_len: int, kv_len: int, causal: bool, ref: torch.Tensor):
    """[visible prefix | mask] over P + kv_len keys; builds the bottom-right causal mask when mask is None."""
    if mask is None:
        if not causal or q_len == 1:
            return None  # everything visible: no mask needed
        i = torch.arange(q_len, device=ref.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=ref.device)[None, :] <= i)[None, None]  # (1, 1, T, S)
    pad_shape = (*mask.shape[:-1], P)
    if mask.dtype == torch.bool:
        visible = torch.ones(pad_shape, dtype=torch.bool, device=mask.device)
    else:
        visible = torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask], dim=-1)


def _pad_bias(bias, P: int):
    if bias is None:
        return None
    return torch.cat([bias.new_zeros((*bias.shape[:-1], P)), bias], dim=-1)


def make_seam(base_name: str):
    ALL, _, _, _ = _registries()

    def seam(module, query, key, value, attention_mask, **kwargs):
        base = ALL[base_name] if base_name in ALL else _eager_of(module)
        site = _site_of(module)
        if site is not None and site.capture is not None:  # recording real tokens' keys/values
            site.capture[site] = (key, value)
            return base(module, query, key, value, attention_mask, **kwargs)
        if site is None or not site.active:
            return base(module, query, key, value, attention_mask, **kwargs)
        B, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
        pk, pv = site.delta.kv(site.slot, B, key.dtype)  # (B, H_kv, P, d)
        P = pk.shape[2]
        causal = kwargs.get("is_causal", None)
        causal = getattr(module, "is_causal", True) if causal is None else causal
        attention_mask = _extend_mask(attention_mask, P, q_len, kv_len, causal, query)
        if "position_bias" in kwargs:
            kwargs["position_bias"] = _pad_bias(kwargs["position_bias"], P)
        if "is_causal" in kwargs:
            kwargs["is_causal"] = False  # the mask is explicit now
        return base(module, query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), attention_mask, **kwargs)

    return seam


def _site_of(module):
    """The prefix site that acts at this attention module now: the one recording, or the active adapter's."""
    sites = getattr(module, "_unipeft_kv", ())
    if len(sites) <= 1:
        return sites[0] if sites else None
    on = [s for s in sites if s.capture is not None] or [s for s in sites if s.active]
    if len(on) > 1:
        raise ValueError(f"prefixes of adapters {[s.switch.adapter for s in on]} are active together at one attention "
                         f"module; activate one of them (set_adapter)")
    return on[0] if on else sites[0]


def _eager_of(module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to fall back to")
    return fn


def seam_name(base_name: str) -> str:
    if base_name.startswith(_SEAM_PREFIX):
        return base_name
    if "flash" in base_name:
        raise ValueError(f"prefix methods need a dense attention mask; attn_implementation={base_name!r} has none. "
                         f"Load the model with attn_implementation='sdpa' or 'eager'")
    ALL, AI, MASKS, MI = _registries()
    name = _SEAM_PREFIX + base_name
    if name not in ALL:
        AI.register(name, make_seam(base_name))
        MI.register(name, MASKS[base_name])
    return name


def check_seam(module: nn.Module, name: str) -> None:
    """Refuse attention modules that do not route through the AttentionInterface (no seam to hook)."""
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        src = ""
    if "ALL_ATTENTION_FUNCTIONS" not in src:
        raise ValueError(
            f"{name} ({type(module).__name__}) does not call transformers' AttentionInterface, so prefix keys/values "
            f"cannot be inserted there; prefix methods need an architecture whose attention uses it (transformers "
            f">= 4.48 for Llama/GPT-2/BERT/T5)"
        )


class AttentionKVSite:
    """A prefix at one attention module. The shared prefix table lives on the model root."""

    def __init__(self, module: nn.Module, name: str, ins: Insertion, delta, slot: int, switch: Switch, root_name: str):
        self.host, self.host_name, self.ins, self.delta, self.slot, self.switch = module, name, ins, delta, slot, switch
        self.merged, self.path, self.capture = False, root_name, None
        module.__dict__.setdefault("_unipeft_kv", []).append(self)  # one per adapter

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
            saved = [(c, c._attn_implementation) for c in cfgs.values()]
            for c, impl in saved:
                c._attn_implementation = seam_name(impl or "eager")
        self._users[model] = (count + 1, saved)
        self.saved = saved

    def remove(self):
        count, saved = self._users.get(self.model, (1, self.saved))
        if count > 1:
            self._users[self.model] = (count - 1, saved)
            return
        self._users.pop(self.model, None)
        for c, impl in saved:
            c._attn_implementation = impl


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
        cols = []
        for s in sorted((s for s in sites if s.delta is delta), key=lambda s: s.slot):
            k, v = captured[s]  # (1, H_kv, T, d)
            cols.append(torch.cat([k[0].transpose(0, 1).flatten(1), v[0].transpose(0, 1).flatten(1)], -1))
        table = torch.cat(cols, -1)  # (T, L·2·H·d)
        reps = -(-delta.P // table.shape[0])
        delta.set_table(table.repeat(reps, 1)[: delta.P])

"""Input position: virtual-token embeddings in the input sequence (prompt tuning, P-tuning v1).

Written once for every task, as hooks on the model the user holds:
  * prepend (default): inputs_embeds ← [prompts ; E(x)], attention_mask ← [1…1 ; mask], labels ← [-100… ; labels]
    (when they run along the sequence), token_type_ids ← [0… ; ids], position_ids ← [0..P-1 ; pos + P].
    The virtual positions are cut from the returned logits, so they line up with input_ids.
  * template: input ids < 0 mark slots (P-tuning's "[P]" anywhere in a template); prompts fill them in order.
Generation: prompts enter the KV cache on the first step; later steps only shift positions and extend the mask
by P, which is what keeps generate() equal to full forward passes. Encoder-decoders get prompts in the encoder
input, and the decoder's cross-attention mask is widened to match.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import Insertion
from .base import Switch


def _cache_len(kwargs) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None):
        return None  # relative / rotary positions have no hard table to run off
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


class InputSite:
    def __init__(self, model: nn.Module, ins: Insertion, delta, switch: Switch, root_name: str):
        self.model, self.ins, self.delta, self.switch = model, ins, delta, switch
        self.host_name, self.path, self.merged = "", root_name, False
        self._cut = None  # (P, T) of the current call: which logits to cut
        self.enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        self.embed = model.get_input_embeddings()
        self.max_pos = _max_positions(model)
        self._hooks = []
        if self.enc_dec:
            self._hooks.append(model.get_encoder().register_forward_pre_hook(self._encoder_pre, with_kwargs=True))
            self._hooks.append(model.get_decoder().register_forward_pre_hook(self._decoder_pre, with_kwargs=True))
        else:
            self._hooks.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._hooks.append(model.register_forward_hook(self._post))

    @property
    def active(self) -> bool:
        return self.switch.on

    @property
    def P(self) -> int:
        return self.delta.P

    # prompts into the input --------------------------------------------------------------------------
    def _embed(self, kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = kwargs.pop("input_ids", None)
        if kwargs.get("inputs_embeds") is not None:
            return kwargs.pop("inputs_embeds"), None
        if ids is None:
            raise ValueError("prompt methods need input_ids or inputs_embeds")
        return self.embed(ids.clamp(min=0)), ids

    def _insert(self, kwargs, extend_labels: bool) -> int:
        """Put the prompts into kwargs; returns the original sequence length."""
        x, ids = self._embed(kwargs)  # (B, T, d)
        B, T, P = x.shape[0], x.shape[1], self.P
        prompts = self.delta().to(x.dtype)  # (P, d)
        if ids is not None and (ids < 0).any():  # template slots
            slots = ids < 0
            counts = slots.sum(1)
            if not bool((counts == P).all()):
                raise ValueError(f"every row must hold exactly {P} virtual-token slots (ids < 0), got {counts.tolist()}")
            x = x.masked_scatter(slots[..., None], prompts.expand(B, P, -1))
            kwargs["inputs_embeds"] = x
            return -1
        if self.max_pos is not None and P + T > self.max_pos:
            raise ValueError(f"{P} virtual tokens + {T} input tokens exceed the model's {self.max_pos} positions; "
                             f"truncate inputs to at most {self.max_pos - P} tokens")
        kwargs["inputs_embeds"] = torch.cat([prompts.expand(B, P, -1), x], 1)
        ones = lambda t: torch.ones(B, P, dtype=t.dtype, device=t.device)  # noqa: E731
        if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 2:
            kwargs["attention_mask"] = torch.cat([ones(kwargs["attention_mask"]), kwargs["attention_mask"]], 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = torch.cat([0 * ones(kwargs["token_type_ids"]), kwargs["token_type_ids"]], 1)
        if kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"]
            kwargs["position_ids"] = torch.cat([torch.arange(P, device=pos.device).expand(pos.shape[0], P), pos + P], 1)
        labels = kwargs.get("labels")
        if extend_labels and labels is not None and labels.dim() == 2 and labels.shape[1] == T:
            kwargs["labels"] = torch.cat([torch.full((B, P), -100, dtype=labels.dtype, device=labels.device), labels], 1)
        return T

    def _normalize(self, args, kwargs):
        if args:  # model(input_ids, ...) positionally
            kwargs = {"input_ids": args[0], **kwargs}
            args = args[1:]
        return args, dict(kwargs)

    def _pre(self, module, args, kwargs):
        self._cut = None
        if not self.active:
            return None
        args, kwargs = self._normalize(args, kwargs)
        past = _cache_len(kwargs)
        if past > 0:  # a generation step: the prompts are already in the cache
            if kwargs.get("attention_mask") is not None:
                m = kwargs["attention_mask"]
                kwargs["attention_mask"] = torch.cat([m.new_ones(m.shape[0], self.P), m], 1)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + self.P
            return args, kwargs
        T = self._insert(kwargs, extend_labels=True)
        if T > 0:
            self._cut = (self.P, T)
        return args, kwargs

    def _post(self, module, args, out):
        cut, self._cut = self._cut, None
        logits = getattr(out, "logits", None)
        if cut is None or logits is None or logits.dim() < 3 or logits.shape[1] != cut[0] + cut[1]:
            return out
        out["logits"] = logits[:, cut[0]:]
        return out

    # encoder-decoders ---------------------------------------------------------------------------------
    def _encoder_pre(self, module, args, kwargs):
        if not self.active:
            return None
        args, kwargs = self._normalize(args, kwargs)
        self._insert(kwargs, extend_labels=False)
        return args, kwargs

    def _decoder_pre(self, module, args, kwargs):
        h, m = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if not self.active or h is None or m is None or m.dim() != 2 or h.shape[1] != m.shape[1] + self.P:
            return None
        kwargs = dict(kwargs)
        kwargs["encoder_attention_mask"] = torch.cat([m.new_ones(m.shape[0], self.P), m], 1)
        return args, kwargs

    # site protocol --------------------------------------------------------------------------------------
    def merge(self):
        raise ValueError(f"virtual-token prompts ({self.ins.describe()}) cannot be merged into weights")

    def unmerge(self):
        pass

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class PositionShift:
    """HF PEFT's prefix semantics: real tokens' positions start at P, as if the prefix were cached tokens."""

    def __init__(self, model: nn.Module, P: int, switch: Switch):
        self.P, self.switch = P, switch
        self._hook = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if not self.switch.on or getattr(module.config, "is_encoder_decoder", False):
            return None
        kwargs = dict(kwargs)
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        pos = kwargs.get("position_ids")
        if pos is None:
            past = _cache_len(kwargs)
            pos = torch.arange(past, past + ids.shape[1], device=ids.device)[None]
        kwargs["position_ids"] = pos + self.P
        return args, kwargs

    def remove(self):
        self._hook.remove()

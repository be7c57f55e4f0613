"""Input position: virtual-token embeddings in the input sequence (prompt tuning, P-tuning v1).

Written once for every task, as hooks on the model the user holds, in two steps:
  * the outer model (the one called) gets P slot ids (< 0) prepended to input_ids, attention_mask ← [1…1 ; mask],
    labels ← [-100… ; labels] (when they run along the sequence), token_type_ids ← [0… ; ids],
    position_ids ← [0..P-1 ; pos + P] (derived from the attention mask when the caller gives none, so a
    left-padded row sees the positions it has alone);
  * its backbone (`model.base_model`) gets the ids, embeds them and puts the prompts into the slots.
So the outer model still sees input ids: a sequence-classification head finds each row's last real token
(prompts are not pads), and logits include the virtual positions, as HF PEFT returns them (`logits[:, P:]`
are the real tokens'); `keep_virtual_logits=False` cuts them so logits line up with input_ids.
Templates: input ids < 0 mark slots (P-tuning's "[P]" anywhere in a template); prompts fill them in order.
A caller giving inputs_embeds (or a bare backbone) gets the prompts prepended to the embeddings directly.
Generation: prompts enter the KV cache on the first step; later steps only shift positions and extend the mask
by P, which is what keeps generate() equal to full forward passes. Encoder-decoders get prompts in the encoder
input (right after a row's left padding, so relative positions between prompts and tokens stay those of the row
alone; the returned logits are the decoder's, so this layout never shows), and the decoder's cross-attention
mask is widened to match.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..spec import Compose, Form, Insertion
from .base import Switch

# Prompts are concatenated to the input: the only (form, compose) they compute; other values would be labels only.
VALID_FORMS = {(Form.SEQUENTIAL, Compose.ADD)}
SLOT = -1  # an input id < 0 is a virtual-token slot (templates: unipeft.methods.p_tuning_template)


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


def positions_from_mask(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Position ids of the last `length` tokens counted over real tokens only (None when no row is left-padded)."""
    if mask is None or mask.dim() != 2 or mask.shape[1] < length:
        return None
    # Only left padding moves real tokens: unpadded and right-padded rows keep the model's own numbering, which is
    # not always 0-based (RoBERTa counts from padding_idx + 1). A compiled graph cannot branch on the mask's
    # values, so it keeps the model's numbering too (as HF PEFT: left-padded rows then depend on their padding).
    if torch.compiler.is_compiling() or not bool((mask[:, 0] == 0).any()):
        return None
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def check_insertion(ins: Insertion) -> None:
    if (ins.form, ins.compose) not in VALID_FORMS:
        raise ValueError(f"virtual-token prompts at the input are concatenated to it: form={Form.SEQUENTIAL.value!r}, "
                         f"compose={Compose.ADD.value!r}; got form={ins.form.value!r}, compose={ins.compose.value!r}, "
                         f"which would be a label only. Valid: {sorted((f.value, c.value) for f, c in VALID_FORMS)}")


def after_left_padding(mask: torch.Tensor, P: int):
    """Where P prompts go in each row of an encoder input: right after its left padding, so they keep their
    distance to the row's tokens (relative positions, T5). Returns (src, slot, k): for each of the P + T output
    positions, the input position it copies, whether it is a prompt slot, and which prompt."""
    B, T = mask.shape
    lead = (mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # (B, 1) leading pads
    j = torch.arange(P + T, device=mask.device)[None]
    slot = (j >= lead) & (j < lead + P)
    src = torch.where(j < lead, j, j - P).clamp(0, T - 1)
    return src, slot, (j - lead).clamp(0, P - 1)


def _place(t: torch.Tensor, src, slot, fill) -> torch.Tensor:
    """t (B, T[, d]) laid out over P + T positions, `fill` (scalar or (B, P+T[, d])) at the slots."""
    if t.dim() == 3:
        got = t.gather(1, src[..., None].expand(-1, -1, t.shape[-1]))
        return torch.where(slot[..., None], fill, got)
    return torch.where(slot, torch.as_tensor(fill, dtype=t.dtype, device=t.device), t.gather(1, src))


def _normalize(args, kwargs):
    if args:  # model(input_ids, ...) positionally
        kwargs = {"input_ids": args[0], **kwargs}
        args = args[1:]
    return args, dict(kwargs)


def slots_to_embeds(args, kwargs, fill):
    """The inner model's pre-hook for template slots: input_ids holding slots (negative ids) become inputs_embeds
    through `fill`; None (nothing to change) when there are none."""
    args, kwargs = _normalize(args, kwargs)
    ids = kwargs.get("input_ids")
    if ids is None or not bool((ids < 0).any()):
        return None
    kwargs["inputs_embeds"] = fill(kwargs.pop("input_ids"))
    return args, kwargs


class InputSite:
    rowwise = True  # in a mixed-adapter batch each row gets its adapter's prompts (mixed_input.MixedInputs)

    def __init__(self, model: nn.Module, ins: Insertion, delta, switch: Switch, root_name: str):
        self.model, self.ins, self.delta, self.switch = model, ins, delta, switch
        self.host_name, self.path, self.merged = "", root_name, False
        self.keep_logits = ins.position.keep_virtual_logits
        self._cut = None  # (P, T) of the current call: which logits to cut
        self.enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        self.embed = model.get_input_embeddings()
        self.max_pos = _max_positions(model)
        inner = getattr(model, "base_model", model)
        # the backbone embeds the slot ids; a bare backbone (or an unusual one) gets embeddings directly
        self.inner = inner if inner is not model and "inputs_embeds" in inspect.signature(inner.forward).parameters \
            else None
        self.positions = "position_ids" in inspect.signature(model.forward).parameters
        self._hooks = []
        if self.enc_dec:
            self._hooks.append(model.get_encoder().register_forward_pre_hook(self._encoder_pre, with_kwargs=True))
            self._hooks.append(model.get_decoder().register_forward_pre_hook(self._decoder_pre, with_kwargs=True))
        else:
            self._hooks.append(model.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._hooks.append(model.register_forward_hook(self._post))
            if self.inner is not None:
                self._hooks.append(self.inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True))

    @property
    def active(self) -> bool:
        """Acting through its own hooks: on, and not in a mixed-adapter batch (mixed_input.MixedInputs serves it)."""
        return self.switch.on and self.switch.rows is None

    @property
    def P(self) -> int:
        return self.delta.P

    # prompts into the input --------------------------------------------------------------------------
    def _fill_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ids whose slots (< 0) hold the prompts in order; every row holds exactly P slots."""
        slots = ids < 0
        counts = slots.sum(1)
        if not bool((counts == self.P).all()):
            raise ValueError(f"every row must hold exactly {self.P} virtual-token slots (ids < 0), got {counts.tolist()}")
        x = self.embed(ids.clamp(min=0))
        prompts = self.delta().to(x.dtype)  # (P, d)
        return x.masked_scatter(slots[..., None], prompts.expand(ids.shape[0], self.P, -1))

    def _prepend(self, kwargs, extend_labels: bool, as_slots: bool) -> int:
        """Prepend the P virtual tokens (as slot ids, or as embeddings); returns the original sequence length."""
        ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if emb is None and ids is None:
            raise ValueError("prompt methods need input_ids or inputs_embeds")
        x = emb if emb is not None else ids
        B, T, P = x.shape[0], x.shape[1], self.P
        if self.max_pos is not None and P + T > self.max_pos:
            raise ValueError(f"{P} virtual tokens + {T} input tokens exceed the model's {self.max_pos} positions; "
                             f"truncate inputs to at most {self.max_pos - P} tokens")
        if emb is not None:
            kwargs.pop("input_ids", None)
            kwargs["inputs_embeds"] = torch.cat([self.delta().to(emb.dtype).expand(B, P, -1), emb], 1)
        elif as_slots:
            kwargs["input_ids"] = torch.cat([torch.full((B, P), SLOT, dtype=ids.dtype, device=ids.device), ids], 1)
        else:
            x = self.embed(kwargs.pop("input_ids"))
            kwargs["inputs_embeds"] = torch.cat([self.delta().to(x.dtype).expand(B, P, -1), x], 1)
        ones = lambda t: torch.ones(B, P, dtype=t.dtype, device=t.device)  # noqa: E731
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and self.positions:
            derived = positions_from_mask(mask, T)
            if derived is not None:
                kwargs["position_ids"] = derived
        if mask is not None and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([ones(mask), mask], 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = torch.cat([0 * ones(kwargs["token_type_ids"]), kwargs["token_type_ids"]], 1)
        if kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"]
            kwargs["position_ids"] = torch.cat([torch.arange(P, device=pos.device).expand(pos.shape[0], P), pos + P], 1)
        labels = kwargs.get("labels")
        if extend_labels and labels is not None and labels.dim() == 2 and labels.shape[1] == T:
            kwargs["labels"] = torch.cat([torch.full((B, P), -100, dtype=labels.dtype, device=labels.device), labels], 1)
        return T

    def _pre(self, module, args, kwargs):
        self._cut = None
        if not self.active:
            return None
        args, kwargs = _normalize(args, kwargs)
        past = _cache_len(kwargs)
        if past > 0:  # a generation step: the prompts are already in the cache
            if kwargs.get("attention_mask") is not None:
                m = kwargs["attention_mask"]
                kwargs["attention_mask"] = torch.cat([m.new_ones(m.shape[0], self.P), m], 1)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + self.P
            return args, kwargs
        ids = kwargs.get("input_ids")
        if kwargs.get("inputs_embeds") is None and ids is not None and bool((ids < 0).any()):  # template slots
            if kwargs.get("position_ids") is None and self.positions:
                derived = positions_from_mask(kwargs.get("attention_mask"), ids.shape[1])
                if derived is not None:
                    kwargs["position_ids"] = derived
            if self.inner is None:
                kwargs["inputs_embeds"] = self._fill_slots(kwargs.pop("input_ids"))
            return args, kwargs
        T = self._prepend(kwargs, extend_labels=True, as_slots=self.inner is not None)
        if not self.keep_logits:
            self._cut = (self.P, T)
        return args, kwargs

    def _inner_pre(self, module, args, kwargs):
        return slots_to_embeds(args, kwargs, self._fill_slots) if self.active else None

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
        args, kwargs = _normalize(args, kwargs)
        ids = kwargs.get("input_ids")
        if kwargs.get("inputs_embeds") is None and ids is not None and bool((ids < 0).any()):  # template slots
            kwargs["inputs_embeds"] = self._fill_slots(kwargs.pop("input_ids"))
            return args, kwargs
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2 or bool(mask[:, :1].all()):  # no left padding: prepend
            self._prepend(kwargs, extend_labels=False, as_slots=False)
            return args, kwargs
        x = kwargs.pop("inputs_embeds") if kwargs.get("inputs_embeds") is not None else self.embed(kwargs["input_ids"])
        kwargs.pop("input_ids", None)
        src, slot, k = after_left_padding(mask, self.P)
        kwargs["inputs_embeds"] = _place(x, src, slot, self.delta().to(x.dtype)[k])
        kwargs["attention_mask"] = _place(mask, src, slot, 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _place(kwargs["token_type_ids"], src, slot, 0)
        return args, kwargs

    def _decoder_pre(self, module, args, kwargs):
        h, m = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if not self.active or h is None or m is None or m.dim() != 2 or h.shape[1] != m.shape[1] + self.P:
            return None
        kwargs = dict(kwargs)
        src, slot, _ = after_left_padding(m, self.P)  # the layout the encoder input got
        kwargs["encoder_attention_mask"] = _place(m, src, slot, 1)
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


class PrefixPositions:
    """Position ids for prefix methods on decoder-only models: HF PEFT's semantics add `shift` = P (real tokens
    start at P, as if the prefix were cached tokens); without ids from the caller they are counted over the
    attention mask, so a left-padded row sees the positions (and prefix/query offsets) it has alone."""

    def __init__(self, model: nn.Module, shift: int, switch: Switch):
        self.model, self.shift, self.switch = model, shift, switch
        self._hook = None
        if "position_ids" in inspect.signature(model.forward).parameters:
            self._hook = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        if not self.switch.on or self.switch.rows is not None:  # a mixed batch: mixed_input.MixedInputs numbers rows
            return None
        args, kwargs = _normalize(args, kwargs)
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        pos = kwargs.get("position_ids")
        if pos is None and x is not None:
            pos = positions_from_mask(kwargs.get("attention_mask"), x.shape[1])
            if pos is None and self.shift:
                past = _cache_len(kwargs)
                pos = torch.arange(past, past + x.shape[1], device=x.device)[None]
        if pos is None:
            return None
        kwargs["position_ids"] = pos + self.shift
        return args, kwargs

    def remove(self):
        if self._hook is not None:
            self._hook.remove()

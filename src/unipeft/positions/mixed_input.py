"""Prompts and prefix positions in a mixed-adapter batch: each row gets the virtual tokens and positions of its own
adapter (or none), computed once per adapter group.

Rows of one batch share a sequence length, but their adapters' prompts differ in length (P_b; 0 for rows of
"__base__" or of an adapter without a prompt). Every row is laid out over Pmax + T positions: its P_b prompts and
T tokens, and Pmax - P_b *gap* positions that the attention mask hides (they are padding):

    models that generate (decoder-only LMs):   [gap | prompts_b | tokens]   the gap on the left, like left padding,
        so generated tokens append to every row; positions are explicit, so the gap does not move them;
    the others (encoders, classification heads): [prompts_b | tokens | gap]   like right padding (the gap holds the
        pad id), so a head pooling the first token or the last non-pad token sees what the row alone gives;
    encoder-decoders' encoder input:           [left pads | prompts_b | tokens | gap]  (relative positions).

Logits come back in one layout: `logits[:, Pmax:]` are the real tokens', row b's virtual tokens at
`logits[b, Pmax - P_b:Pmax]` (the gap's logits before them); `keep_virtual_logits=False` cuts to the real tokens.
Position ids of each row are those it has alone: its adapter's rule (prompt and prefix adapters count them over
the attention mask in a left-padded batch, a prefix with HF's semantics shifts them by its length, other rows keep
the model's 0-based numbering), placed at the row's own columns. Decode steps (generate) widen the mask by each
row's [gap | prompts] and shift positions by P_b. The per-adapter hooks of InputSite and PrefixPositions stand
aside in a mixed batch (their switch has rows); prefix keys/values are the attention seam's (attention_kv).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .input import (SLOT, InputSite, PrefixPositions, _cache_len, _max_positions, _normalize, positions_from_mask,
                    slots_to_embeds)


def _own_positions(mask, T: int, P: torch.Tensor, derive: torch.Tensor, left_padded: bool, device):
    """(B, max(P) + T): column i of row b is the position the row has alone at the i-th place of its own sequence
    [its P_b prompts | its T tokens] (left-aligned; later columns are unused)."""
    B, Pmax = P.shape[0], int(P.max()) if P.numel() else 0
    i = torch.arange(Pmax + T, device=device)[None].expand(B, -1)
    own = i.clone()  # the model's numbering of the row alone: 0..P_b+T-1
    if left_padded and mask is not None:  # prompt/prefix adapters count over the mask: [0..P_b-1 ; pfm + P_b]
        pfm = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        tok = (i - P[:, None]).clamp(0, T - 1)
        counted = torch.where(i < P[:, None], i, pfm.gather(1, tok) + P[:, None])
        own = torch.where(derive[:, None], counted, own)
    return own


class MixedInputs:
    """Installed for one mixed-adapter call (and removed after): the hooks that lay rows out and number them."""

    def __init__(self, model: nn.Module, prompts: list, shifts: list, prefix_rows: torch.Tensor, n_rows: int,
                 device):
        """prompts: [(InputSite, rows)]; shifts: [(shift, rows)] of the adapters with PrefixPositions;
        prefix_rows: (B,) bool, rows whose adapter has PrefixPositions."""
        self.model, self.prompts, self.B = model, prompts, n_rows
        self.P = torch.zeros(n_rows, dtype=torch.long, device=device)
        for site, rows in prompts:
            self.P[rows] = site.P
        self.shift = torch.zeros(n_rows, dtype=torch.long, device=device)
        for s, rows in shifts:
            self.shift[rows] = s
        self.prefix_rows = prefix_rows
        self.derive = prefix_rows | (self.P > 0)  # adapters whose hooks count positions over the mask
        self.Pmax = int(self.P.max()) if n_rows else 0
        keeps = {site.keep_logits for site, _ in prompts}
        if len(keeps) > 1:
            raise ValueError("the prompt adapters of this batch differ in keep_virtual_logits, so their logits cannot "
                             "share one layout; run them in separate batches")
        self.keep = keeps.pop() if keeps else True
        self.enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        self.gap_left = bool(getattr(model, "can_generate", lambda: False)())
        self.positions = "position_ids" in inspect.signature(model.forward).parameters
        # position tables with a padding row (RoBERTa family) number tokens from padding_idx + 1, not 0
        self.offset_numbering = any(isinstance(m, nn.Embedding) and n.endswith("position_embeddings")
                                    and m.padding_idx is not None for n, m in model.named_modules())
        self.max_pos = _max_positions(model)
        self.embed = model.get_input_embeddings()
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) else 0
        inner = getattr(model, "base_model", model)
        self.inner = inner if inner is not model and "inputs_embeds" in inspect.signature(inner.forward).parameters \
            else None
        self._layout = None  # (T, offsets) of the current prefill: the logits relayout
        self._hooks = []
        if self.enc_dec:
            if self.Pmax:
                self._hooks.append(model.get_encoder().register_forward_pre_hook(self._encoder_pre, with_kwargs=True,
                                                                                  prepend=True))
                self._hooks.append(model.get_decoder().register_forward_pre_hook(self._decoder_pre, with_kwargs=True,
                                                                                  prepend=True))
            return
        # first among the root's pre-hooks: before the chunked loss takes the labels
        self._hooks.append(model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True))
        self._hooks.append(model.register_forward_hook(self._post))
        if self.inner is not None and self.Pmax:
            self._hooks.append(self.inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True, prepend=True))

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # the rows' prompts ------------------------------------------------------------------------------------
    def _prompt_table(self, dtype) -> torch.Tensor:
        """(B, Pmax, d): row b's prompts in its first P_b rows (computed once per adapter group)."""
        d = self.embed.embedding_dim
        out = torch.zeros(self.B, self.Pmax, d, dtype=dtype, device=self.P.device)
        for site, rows in self.prompts:
            p = site.delta().to(dtype)  # (P, d)
            block = torch.cat([p, p.new_zeros(self.Pmax - p.shape[0], d)]) if p.shape[0] < self.Pmax else p
            out = out.index_put((rows,), block.expand(rows.shape[0], -1, -1))
        return out

    def _fill_slots(self, ids: torch.Tensor) -> torch.Tensor:
        slots = ids < 0
        counts = slots.sum(1)
        if not bool((counts == self.P).all()):
            raise ValueError(f"in this mixed-adapter batch row b must hold exactly its adapter's number of virtual-token "
                             f"slots (ids < 0): expected {self.P.tolist()}, got {counts.tolist()}")
        x = self.embed(ids.clamp(min=0))
        table = self._prompt_table(x.dtype)  # slot k of a row (its k-th slot) takes its prompt k
        k = (slots.long().cumsum(-1) - 1).clamp(min=0)
        return torch.where(slots[..., None], table.gather(1, k[..., None].expand(-1, -1, x.shape[-1])), x)

    # layout ---------------------------------------------------------------------------------------------
    def _columns(self, T: int, offset: torch.Tensor):
        """For Pmax + T columns of each row: (prompt?, token?, k = prompt index, src = token index)."""
        j = torch.arange(self.Pmax + T, device=self.P.device)[None]
        o, P = offset[:, None], self.P[:, None]
        prompt = (j >= o) & (j < o + P)
        token = (j >= o + P) & (j < o + P + T)
        return prompt, token, (j - o).clamp(0, max(self.Pmax - 1, 0)), (j - o - P).clamp(0, T - 1)

    def _pre(self, module, args, kwargs):
        args, kwargs = _normalize(args, kwargs)
        if _cache_len(kwargs) > 0:
            return args, self._decode_step(kwargs)
        ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        x = emb if emb is not None else ids
        if x is None:
            raise ValueError("a mixed-adapter batch with prompt or prefix adapters needs input_ids or inputs_embeds")
        T = x.shape[1]
        mask = kwargs.get("attention_mask")
        mask = mask if mask is not None and mask.dim() == 2 else None
        left_padded = mask is not None and bool((mask[:, 0] == 0).any())
        template = emb is None and bool((ids < 0).any())
        if template or not self.Pmax:  # positions only (templates hold their slots already)
            self._positions(kwargs, T, self.P.new_zeros(self.B), mask, left_padded, layout=False)
            if template and self.inner is None:
                kwargs["inputs_embeds"] = self._fill_slots(kwargs.pop("input_ids"))
            return args, kwargs
        if self.max_pos is not None and self.Pmax + T > self.max_pos:
            raise ValueError(f"{self.Pmax} virtual tokens + {T} input tokens exceed the model's {self.max_pos} "
                             f"positions; truncate inputs to at most {self.max_pos - self.Pmax} tokens")
        offset = (self.Pmax - self.P) if self.gap_left else torch.zeros_like(self.P)
        prompt, token, k, src = self._columns(T, offset)
        self._positions(kwargs, T, offset, mask, left_padded, layout=True)
        if emb is not None or self.inner is None:
            e = emb if emb is not None else self.embed(ids)
            kwargs.pop("input_ids", None)
            d = e.shape[-1]
            table = self._prompt_table(e.dtype).gather(1, k[..., None].expand(-1, -1, d))
            got = e.gather(1, src[..., None].expand(-1, -1, d))
            kwargs["inputs_embeds"] = torch.where(prompt[..., None], table, torch.where(token[..., None], got, 0))
        else:
            kwargs["input_ids"] = torch.where(prompt, SLOT, torch.where(token, ids.gather(1, src), self.pad_id))
        m = mask if mask is not None else torch.ones(self.B, T, dtype=torch.long, device=x.device)
        kwargs["attention_mask"] = torch.where(prompt, 1, torch.where(token, m.gather(1, src), 0)).to(m.dtype)
        if kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"].expand(self.B, -1)
            kwargs["token_type_ids"] = torch.where(token, tt.gather(1, src), 0)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == T:
            labels = torch.where(token, labels.gather(1, src), -100)
            if self.gap_left:  # a causal LM's loss predicts each label from the column before: for a row without
                # prompts that is a gap, and the row alone never predicts its first token
                first = torch.arange(self.Pmax + T, device=labels.device)[None] == offset[:, None]
                labels = labels.masked_fill(first & (self.P == 0)[:, None], -100)
            kwargs["labels"] = labels
        self._layout = (T, offset)
        return args, kwargs

    def _positions(self, kwargs, T: int, offset, mask, left_padded: bool, layout: bool) -> None:
        """Each row's own position ids at its own columns (see the module docstring)."""
        if not self.positions:
            return
        pos = kwargs.get("position_ids")
        shifted = bool(self.shift.any())
        if pos is None and not (layout and self.gap_left) and not shifted and not (left_padded and self.derive.any()):
            return  # every row keeps the model's own numbering, as alone
        if pos is None and self.offset_numbering:
            raise ValueError(f"{type(self.model).__name__} numbers positions from its padding index + 1, so rows of this "
                             f"mixed-adapter batch that keep the model's numbering cannot be given explicit positions "
                             f"beside rows whose adapter shifts or counts them (a prefix with position_shift, or "
                             f"prompts in a left-padded batch); pass position_ids, or run these adapters in separate "
                             f"batches")
        width = self.Pmax + T if layout else T
        P = self.P if layout else torch.zeros_like(self.P)
        if pos is not None:  # the caller's (or generate's) positions of the tokens: [0..P_b-1 ; pos + P_b]
            i = torch.arange(width, device=self.P.device)[None].expand(self.B, -1)
            pos = pos.expand(self.B, -1)
            own = torch.where(i < P[:, None], i, pos.gather(1, (i - P[:, None]).clamp(0, T - 1)) + P[:, None])
        else:
            own = _own_positions(mask, T, P, self.derive, left_padded, self.P.device)
        own = own + self.shift[:, None]
        if layout:  # own column i of row b sits at column offset_b + i
            j = torch.arange(width, device=self.P.device)[None]
            own = torch.where(j >= offset[:, None], own.gather(1, (j - offset[:, None]).clamp(min=0)), 0)
        kwargs["position_ids"] = own[:, :width]

    def _decode_step(self, kwargs):
        """Generation after the first step: the prompts are in the cache, at each row's columns."""
        q = next(t for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if t is not None).shape[1]
        past = _cache_len(kwargs)
        m = kwargs.get("attention_mask")
        if self.Pmax and (m is None or m.dim() == 2):  # [gap | prompts] of each row are in the cache
            ref = self.P if m is None else m
            m_all = m if m is not None else torch.ones(self.B, past - self.Pmax + q, dtype=torch.long, device=ref.device)
            seen = torch.arange(self.Pmax, device=ref.device)[None] >= (self.Pmax - self.P)[:, None]
            kwargs["attention_mask"] = torch.cat([seen.to(m_all.dtype), m_all], 1)
        if not self.positions:
            return kwargs
        pos = kwargs.get("position_ids")
        if pos is not None:
            kwargs["position_ids"] = pos.expand(self.B, -1) + (self.P + self.shift)[:, None]
        elif self.Pmax or self.shift.any() or self.prefix_rows.any():
            own_past = past - (self.Pmax - self.P)  # the cache length each row has alone
            own = own_past[:, None] + torch.arange(q, device=self.P.device)
            counted = positions_from_mask(m, q)
            if counted is not None:  # prefix adapters count over the mask in a left-padded batch
                own = torch.where(self.prefix_rows[:, None], counted, own)
            kwargs["position_ids"] = own + self.shift[:, None]
        return kwargs

    def _inner_pre(self, module, args, kwargs):
        return slots_to_embeds(args, kwargs, self._fill_slots)

    def _post(self, module, args, out):
        layout, self._layout = self._layout, None
        if layout is not None and isinstance(out, tuple):  # positions cannot be put in place without names
            raise ValueError("a mixed-adapter batch with prompt adapters needs return_dict=True: its logits are "
                             "reordered into one layout (real tokens at [:, Pmax:]) by name")
        logits = getattr(out, "logits", None)
        if layout is None or logits is None or logits.dim() < 3:
            return out
        T, offset = layout
        if logits.shape[1] != self.Pmax + T:
            return out
        if not self.gap_left:  # [prompts | tokens | gap] -> [gap | prompts | tokens]
            j = torch.arange(self.Pmax + T, device=logits.device)[None]
            P = self.P[:, None]
            src = torch.where(j < self.Pmax - P, P + T + j, j - (self.Pmax - P))
            logits = logits.gather(1, src[..., None].expand(-1, -1, logits.shape[-1]))
        out["logits"] = logits if self.keep else logits[:, self.Pmax:]
        return out

    # encoder-decoders -------------------------------------------------------------------------------------
    def _encoder_layout(self, mask: torch.Tensor):
        """[left pads | prompts_b | tokens | gap]: (prompt?, token?, k, src) over Pmax + T columns."""
        T = mask.shape[1]
        lead = (mask.long().cumsum(-1) == 0).sum(-1, keepdim=True)  # leading pads per row
        j = torch.arange(self.Pmax + T, device=mask.device)[None]
        P = self.P[:, None]
        prompt = (j >= lead) & (j < lead + P)
        token = (j < lead) | ((j >= lead + P) & (j < T + P))
        src = torch.where(j < lead, j, j - P).clamp(0, T - 1)
        return prompt, token, (j - lead).clamp(0, max(self.Pmax - 1, 0)), src

    def _encoder_pre(self, module, args, kwargs):
        args, kwargs = _normalize(args, kwargs)
        ids, emb = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if emb is None and ids is not None and bool((ids < 0).any()):  # template slots
            kwargs["inputs_embeds"] = self._fill_slots(kwargs.pop("input_ids"))
            return args, kwargs
        x = emb if emb is not None else self.embed(ids)
        kwargs.pop("input_ids", None)
        B, T, d = x.shape
        mask = kwargs.get("attention_mask")
        mask = mask if mask is not None else torch.ones(B, T, dtype=torch.long, device=x.device)
        prompt, token, k, src = self._encoder_layout(mask)
        table = self._prompt_table(x.dtype).gather(1, k[..., None].expand(-1, -1, d))
        got = x.gather(1, src[..., None].expand(-1, -1, d))
        kwargs["inputs_embeds"] = torch.where(prompt[..., None], table, torch.where(token[..., None], got, 0))
        kwargs["attention_mask"] = torch.where(prompt, 1, torch.where(token, mask.gather(1, src), 0)).to(mask.dtype)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = torch.where(token, kwargs["token_type_ids"].gather(1, src), 0)
        return args, kwargs

    def _decoder_pre(self, module, args, kwargs):
        h, m = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        if h is None or h.shape[1] != (m.shape[1] if m is not None else h.shape[1] - self.Pmax) + self.Pmax:
            return None
        kwargs = dict(kwargs)
        m = m if m is not None else torch.ones(h.shape[0], h.shape[1] - self.Pmax, dtype=torch.long, device=h.device)
        prompt, token, _, src = self._encoder_layout(m)
        kwargs["encoder_attention_mask"] = torch.where(prompt, 1, torch.where(token, m.gather(1, src), 0)).to(m.dtype)
        return args, kwargs


def mixed_inputs(handles: dict, rows: dict, n_rows: int, device) -> MixedInputs | None:
    """The hooks a mixed batch needs for the prompts and prefix positions of its adapters, or None (no such adapter)."""
    prompts, shifts, model = [], [], None
    prefix_rows = torch.zeros(n_rows, dtype=torch.bool, device=device)
    for name, r in rows.items():
        h = handles.get(name)
        if h is None:
            continue
        sites = [s for s in h.sites if isinstance(s, InputSite)]
        if len(sites) > 1:
            raise ValueError(f"adapter {name!r} has {len(sites)} input prompts; a mixed-adapter batch serves one per "
                             f"adapter")
        if sites:
            prompts.append((sites[0], r))
            model = sites[0].model
        for e in h.extras:
            if isinstance(e, PrefixPositions) and e._hook is not None:
                shifts.append((e.shift, r))
                prefix_rows[r] = True
                model = e.model
    if model is None:
        return None
    return MixedInputs(model, prompts, shifts, prefix_rows, n_rows, device)

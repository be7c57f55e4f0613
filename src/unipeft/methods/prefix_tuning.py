"""Prefix tuning: per-layer key/value prefixes at every attention · gate.  Li & Liang 2021, arXiv:2101.00190.

head = softmax(q [P_k; K]ᵀ) [P_v; V] = (1-λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v), λ the prefix's softmax
mass (He et al. 2022, eq. 7). P comes from an MLP over E (prefix_projection=True, the paper's stable
reparameterization) or is a flat table. Encoder-decoders get separate prefixes for encoder self-attention,
decoder self-attention and cross-attention, as in the paper. `init_text` starts the flat table from the
keys/values of real tokens — the paper's best initialisation.

Positions (`position_shift`): by default HF PEFT's semantics wherever HF PEFT runs prefix tuning — its prefix is a
KV cache of P entries, so real tokens sit at positions P..P+T-1 and the prefix keys are never rotated.
`position_shift=False` keeps real tokens at 0..T-1 (ours; a prefix then acts like a pure memory, independent of P).
Unset (None), it resolves per model and task: True where HF PEFT computes prefix tuning, False where HF PEFT refuses
it — a classification, tagging or QA task whose model and backbone forwards take no `past_key_values` (BERT/RoBERTa
under transformers 5) — since there no file or result is shared with HF, and shifting the real tokens' absolute
positions by P only hurts (SST-2, MiniLM: one of three seeds collapsed; nlu_prompt.md). The saved config records
the resolved value. Such a file is not HF's: it is written
without HF's `prompt_embeddings` tensor, so HF PEFT refuses it (KeyError 'prompt_embeddings') instead of
silently computing something else; unipeft loads it from its own keys.
Encoder-decoders: with HF's semantics a single prefix serves the decoder's self-attention (HF PEFT gives the
encoder and cross-attention none), the prefix keys get T5's relative position bias as cached positions 0..P-1,
and decoder layer l reads the table's block 2l mod L (HF's cache layout: layers l and l + L/2 share a block);
`position_shift=False` gives the paper's separate encoder, decoder and cross-attention prefixes instead.
GQA: `token_dim` / `num_attention_heads` record the key/value heads (HF PEFT's numbers), e.g. 192 / 3 on SmolLM2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Union

from ..arch.resolve import takes_past_key_values
from ..config import PromptLearningConfig, TaskType, tokenize_init_text
from ..registry import register_config, register_method
from ..spec import AtAttentionKV, Compose, Form, Insertion, Prefix


@register_config
@dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    prefix_projection: bool = False
    encoder_hidden_size: Union[int, None] = None  # the MLP's width (default: the model's hidden size)
    init_text: Union[str, None] = None
    tokenizer_name_or_path: Union[str, None] = None
    # True: HF PEFT's positions (real tokens start at P); False: ours (0..T-1); None: True where HF PEFT runs prefix
    # tuning on the model, else False (resolved at injection)
    position_shift: Union[bool, None] = None
    init_weights: Union[str, None] = None  # HF PEFT's field: None (random) is what unipeft does; "zero" is not

    @property
    def hf_format(self) -> bool:  # type: ignore[override]
        """Only HF's semantics are written in HF's format; an unshifted file must not load into HF PEFT."""
        return bool(self.position_shift)

    def validate(self) -> None:
        super().validate()
        if self.init_weights is not None and not self.inference_mode:
            raise ValueError(f"init_weights={self.init_weights!r} is not supported: unipeft starts prefixes at random "
                             f"(init_weights=None) or from real tokens (init_text=...)")
        Prefix(length=self.num_virtual_tokens, projection=self.encoder_hidden_size if self.prefix_projection else None)
        if self.position_shift is not None and not isinstance(self.position_shift, bool):
            raise ValueError(f"position_shift must be True (HF PEFT's positions), False (real tokens keep 0..T-1) or "
                             f"None (HF's where HF PEFT runs prefix tuning on the model), got {self.position_shift!r}")
        if self.init_text is not None and self.prefix_projection:
            raise ValueError("init_text initialises the flat prefix table; use prefix_projection=False with it")

    def resolved(self, model, arch):
        """HF PEFT's shape fields: on a GQA model the prefix has the key/value heads (token_dim = kv_heads·head_dim)."""
        cfg = self._resolved_dims(super().resolved(model, arch), model)
        if cfg.position_shift is None:
            cfg = dataclasses.replace(cfg, position_shift=hf_runs_prefix_tuning(model, cfg.task_type))
        # HF PEFT records the MLP's width too (the token dim when unset; a recorded token_dim is what made it)
        return dataclasses.replace(cfg, encoder_hidden_size=cfg.encoder_hidden_size or self.token_dim or cfg.token_dim)

    def _resolved_dims(self, cfg, model):
        mc = model.config
        heads = mc.num_attention_heads
        kv = getattr(mc, "num_key_value_heads", None) or heads
        head_dim = getattr(mc, "head_dim", None) or getattr(mc, "d_kv", None) or \
            (getattr(mc, "hidden_size", None) or mc.d_model) // heads
        want = (head_dim * kv, kv)
        given = (self.token_dim or want[0], self.num_attention_heads or want[1])
        legacy = (getattr(mc, "hidden_size", None), heads)  # what older unipeft files recorded: replaced by HF's
        if given not in (want, legacy):
            raise ValueError(f"token_dim={self.token_dim}, num_attention_heads={self.num_attention_heads} do not fit "
                             f"this model's prefix keys/values ({kv} key/value heads of size {head_dim}: token_dim "
                             f"{want[0]}, num_attention_heads {want[1]}); leave them unset to derive them")
        return dataclasses.replace(cfg, token_dim=want[0], num_attention_heads=want[1])

    def prefix_insertions(self, model, layers=None) -> tuple:
        proj = (self.encoder_hidden_size or self.token_dim) if self.prefix_projection else None
        delta = Prefix(length=self.num_virtual_tokens, projection=proj)
        kw = dict(form=Form.PARALLEL, compose=Compose.GATE)
        if not getattr(model.config, "is_encoder_decoder", False):
            return (Insertion(delta=delta, position=AtAttentionKV(layers=layers, position_shift=self.position_shift),
                              name="prefix", **kw),)
        if self.position_shift:  # HF PEFT's layout: one prefix, at the decoder's self-attention
            pos = AtAttentionKV(layers=layers, stack="decoder", position_shift=True, hf_seq2seq_blocks=True)
            return (Insertion(delta=delta, position=pos, name="prefix", **kw),)
        return (Insertion(delta=delta, position=AtAttentionKV(layers=layers), name="prefix", **kw),
                Insertion(delta=delta, position=AtAttentionKV(layers=layers, attention="cross"), name="cross_prefix",
                          **kw))

    def insertions(self, model, arch):
        return self.prefix_insertions(model)

    def initialize(self, model, handle) -> None:
        if self.init_text is None or self.inference_mode:
            return
        from ..positions.attention_kv import init_prefix_from_tokens

        ids = tokenize_init_text(self.init_text, self.tokenizer_name_or_path, self.num_virtual_tokens, "init_text")
        init_prefix_from_tokens(model, handle, ids)


def hf_runs_prefix_tuning(model, task_type) -> bool:
    """Whether HF PEFT computes prefix tuning on this model for this task: its classification, tagging and QA models
    refuse one whose forward and backbone forward take no `past_key_values`; its other tasks pass the prefix as the
    model's cache without that check."""
    checked = {TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS}
    return task_type not in checked or takes_past_key_values(model)


register_method("prefix_tuning", PrefixTuningConfig, "prefix K/V (MLP reparam) @ every attention · gate",
                "arXiv:2101.00190",
                train_defaults={"lr": 1e-3, "method_options": {"num_virtual_tokens": 20, "prefix_projection": True,
                                                             "encoder_hidden_size": 512}})

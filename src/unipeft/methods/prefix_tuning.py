"""Prefix tuning: per-layer key/value prefixes at every attention · gate.  Li & Liang 2021, arXiv:2101.00190.

head = softmax(q [P_k; K]ᵀ) [P_v; V] = (1-λ)·Attn(q, K, V) + λ·Attn(q, P_k, P_v), λ the prefix's softmax
mass (He et al. 2022, eq. 7). P comes from an MLP over E (prefix_projection=True, the paper's stable
reparameterization) or is a flat table. Encoder-decoders get separate prefixes for encoder self-attention,
decoder self-attention and cross-attention, as in the paper. `init_text` starts the flat table from the
keys/values of real tokens — the paper's best initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from ..config import PromptLearningConfig, tokenize_init_text
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
    position_shift: Union[bool, None] = None  # real tokens' positions start at P (HF PEFT); None: False for new
    init_weights: Union[str, None] = None  # HF PEFT's field: None (random) is what unipeft does; "zero" is not

    def validate(self) -> None:
        super().validate()
        if self.init_weights is not None and not self.inference_mode:
            raise ValueError(f"init_weights={self.init_weights!r} is not supported: unipeft starts prefixes at random "
                             f"(init_weights=None) or from real tokens (init_text=...)")
        Prefix(length=self.num_virtual_tokens, projection=self.encoder_hidden_size if self.prefix_projection else None)
        if self.init_text is not None and self.prefix_projection:
            raise ValueError("init_text initialises the flat prefix table; use prefix_projection=False with it")

    @classmethod
    def from_dict(cls, d: dict):
        if "position_shift" not in d:  # an HF PEFT file: keep its position semantics
            d = {**d, "position_shift": True}
        return super().from_dict(d)

    def prefix_insertions(self, model, layers=None) -> tuple:
        proj = (self.encoder_hidden_size or self.token_dim) if self.prefix_projection else None
        delta = Prefix(length=self.num_virtual_tokens, projection=proj)
        shift = bool(self.position_shift)
        out = [Insertion(delta=delta, position=AtAttentionKV(layers=layers, position_shift=shift), form=Form.PARALLEL,
                         compose=Compose.GATE, name="prefix")]
        if getattr(model.config, "is_encoder_decoder", False):
            out.append(Insertion(delta=delta, position=AtAttentionKV(layers=layers, attention="cross"),
                                 form=Form.PARALLEL, compose=Compose.GATE, name="cross_prefix"))
        return tuple(out)

    def insertions(self, model, arch):
        return self.prefix_insertions(model)

    def initialize(self, model, handle) -> None:
        if self.init_text is None or self.inference_mode:
            return
        from ..positions.attention_kv import init_prefix_from_tokens

        ids = tokenize_init_text(self.init_text, self.tokenizer_name_or_path, self.num_virtual_tokens, "init_text")
        init_prefix_from_tokens(model, handle, ids)


register_method("prefix_tuning", PrefixTuningConfig, "prefix K/V (MLP reparam) @ every attention · gate",
                "arXiv:2101.00190",
                train_defaults={"lr": 1e-3, "method_options": {"num_virtual_tokens": 20, "prefix_projection": True,
                                                             "encoder_hidden_size": 512}})

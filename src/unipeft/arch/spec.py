"""ArchSpec: one frozen record per model family. No per-architecture code anywhere else.

Paths inside a block are tuples of alternatives: the first that exists is used (T5's feed-forward is
`layer.1` in encoder blocks and `layer.2` in decoder blocks). Role names follow HF PEFT's default target
names, matched as module-name suffixes, so `LoraConfig()` without target_modules picks what HF PEFT picks.
"""

from __future__ import annotations

from dataclasses import dataclass

Alt = tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # name suffixes of the ModuleLists holding the transformer blocks
    attn: Alt  # self-attention module (its input is the attention sublayer's input)
    attn_out: Alt  # attention output projection (Houlsby's first adapter reads its output)
    ffn: Alt  # the module whose input is the FFN sublayer's input
    ffn_out: Alt  # the module whose output is the FFN sublayer's output (before the residual add)
    # Where x + f(x) is reachable (Form.AFTER_ADD_NORM): with post_norm, the norm module whose input it is
    # (BERT's LayerNorm after each sublayer); else the module whose output it is. Empty: not reachable
    # (the sum is a local variable of the block's forward, e.g. Llama's attention residual).
    attn_residual: Alt = ()
    ffn_residual: Alt = ()
    post_norm: bool = False
    cross_attn: Alt = ()  # encoder-decoder cross-attention module
    roles: tuple[tuple[str, tuple[str, ...]], ...] = ()  # role -> target-name suffixes
    heads: tuple[str, ...] = ("classifier", "score", "classification_head", "lm_head", "qa_outputs")

    def role(self, name: str) -> tuple[str, ...]:
        for r, names in self.roles:
            if r == name:
                return names
        raise KeyError(name)


ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    for t in spec.model_types:
        ARCHS[t] = spec
    return spec


LLAMA = register_arch(ArchSpec(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3"),
    layers=("layers",), attn=("self_attn",), attn_out=("self_attn.o_proj",), ffn=("mlp",), ffn_out=("mlp",),
    ffn_residual=("",),  # the block's output is the FFN's residual sum
    roles=(("q", ("q_proj",)), ("k", ("k_proj",)), ("v", ("v_proj",)), ("o", ("o_proj",)),
           ("ffn_out", ("down_proj",))),
))

GPT2 = register_arch(ArchSpec(
    name="gpt2", model_types=("gpt2",),
    layers=("h",), attn=("attn",), attn_out=("attn.c_proj",), ffn=("mlp",), ffn_out=("mlp",), ffn_residual=("",),
    # q, k and v share the fused c_attn (a Conv1D): a delta on it covers all three, as in HF PEFT.
    roles=(("q", ("c_attn",)), ("k", ("c_attn",)), ("v", ("c_attn",)), ("o", ("attn.c_proj",)),
           ("ffn_out", ("mlp.c_proj",))),
))

BERT = register_arch(ArchSpec(
    name="bert", model_types=("bert", "roberta", "xlm-roberta", "electra", "camembert"),
    layers=("encoder.layer",), attn=("attention.self",), attn_out=("attention.output.dense",),
    ffn=("intermediate",), ffn_out=("output.dense",),
    attn_residual=("attention.output.LayerNorm",), ffn_residual=("output.LayerNorm",), post_norm=True,
    roles=(("q", ("query",)), ("k", ("key",)), ("v", ("value",)), ("o", ("attention.output.dense",)),
           ("ffn_out", ("output.dense",))),
))

T5 = register_arch(ArchSpec(
    name="t5", model_types=("t5", "mt5", "umt5"),
    layers=("block",), attn=("layer.0.SelfAttention",), attn_out=("layer.0.SelfAttention.o",),
    ffn=("layer.2.DenseReluDense", "layer.1.DenseReluDense"), ffn_out=("layer.2.DenseReluDense", "layer.1.DenseReluDense"),
    attn_residual=("layer.0",), ffn_residual=("layer.2", "layer.1"),  # T5Layer* modules return x + f(LN(x))
    cross_attn=("layer.1.EncDecAttention",),
    roles=(("q", ("q",)), ("k", ("k",)), ("v", ("v",)), ("o", ("o",)), ("ffn_out", ("wo",))),
))

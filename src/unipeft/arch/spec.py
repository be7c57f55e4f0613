"""ArchSpec: one frozen record per model family. No per-architecture code anywhere else.

Paths inside a block are tuples of alternatives: the first that exists is used (T5's feed-forward is
`layer.1` in encoder blocks and `layer.2` in decoder blocks). Role names follow HF PEFT's default target
names, matched as module-name suffixes, so `LoraConfig()` without target_modules picks what HF PEFT picks.
"""

from __future__ import annotations

from dataclasses import dataclass

Alt = tuple[str, ...]


@dataclass(frozen=True)
class FusedLayout:
    """A linear whose output rows are several projections side by side (Phi-3's qkv_proj = [q; k; v]).

    `parts` are (name, rows) in row order; rows is "heads" (num_attention_heads·head_dim), "kv_heads"
    (num_key_value_heads·head_dim) or "share" (an equal share of the rows the others leave). A part's name is a
    target name that resolves to its rows of the fused linear (arch/fused.py)."""

    fused: str  # name of the fused linear inside its parent module
    parts: tuple[tuple[str, str], ...]


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
    fused: tuple[FusedLayout, ...] = ()  # fused projections whose parts are addressable targets
    # role -> why the family has no linear for it (e.g. Mixtral's experts are 3-D parameters, not linears)
    missing_roles: tuple[tuple[str, str], ...] = ()

    def role(self, name: str) -> tuple[str, ...]:
        for r, names in self.roles:
            if r == name:
                return names
        why = dict(self.missing_roles).get(name, "")
        raise ValueError(f"{self.name} models have no default target for the {name!r} role{': ' + why if why else ''}; "
                         f"pass target_modules=[...] naming the linears to adapt")


ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    for t in spec.model_types:
        ARCHS[t] = spec
    return spec


_LLAMA_LAYOUT = dict(
    layers=("layers",), attn=("self_attn",), attn_out=("self_attn.o_proj",), ffn=("mlp",), ffn_out=("mlp",),
    ffn_residual=("",),  # the block's output is the FFN's residual sum
)
_LLAMA_ROLES = (("q", ("q_proj",)), ("k", ("k_proj",)), ("v", ("v_proj",)), ("o", ("o_proj",)))

LLAMA = register_arch(ArchSpec(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "smollm3"),
    roles=_LLAMA_ROLES + (("ffn_out", ("down_proj",)),), **_LLAMA_LAYOUT,
))

# Phi-3 fuses q, k, v into qkv_proj and gate, up into gate_up_proj: the Llama part names address their rows,
# so q/v-only LoRA and k/v-only IA3 act on exactly the rows Llama's separate linears would hold.
PHI3 = register_arch(ArchSpec(
    name="phi3", model_types=("phi3",), roles=_LLAMA_ROLES + (("ffn_out", ("down_proj",)),), **_LLAMA_LAYOUT,
    fused=(FusedLayout("qkv_proj", (("q_proj", "heads"), ("k_proj", "kv_heads"), ("v_proj", "kv_heads"))),
           FusedLayout("gate_up_proj", (("gate_proj", "share"), ("up_proj", "share")))),
))

# Mixtral's feed-forward is a sparse mixture of experts whose weights are 3-D parameters (experts.gate_up_proj,
# experts.down_proj in transformers 5), not linear modules: weight-level deltas reach its attention linears only.
# Sublayer positions (adapters on the whole MoE block's input/output) are meaningful and supported.
MIXTRAL = register_arch(ArchSpec(
    name="mixtral", model_types=("mixtral",), roles=_LLAMA_ROLES, **_LLAMA_LAYOUT,
    missing_roles=(("ffn_out", "its experts are fused 3-D parameters (mlp.experts.down_proj), not linear modules, "
                               "so LoRA/IA3 cannot target them; use attention targets (q_proj, k_proj, v_proj, "
                               "o_proj) or an adapter on the FFN sublayer"),),
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

"""Multi-head parallel adapter (MH PA): He et al. 2022, arXiv:2110.04366, §3.3 and Table 1.

Each attention head i gets its own bottleneck, read from that head's query and added to that head's output
before the output projection:

    head_i ← head_i + s · ReLU(q_i P_k^(i)ᵀ · scale) P_v^(i)          (W_1^(i) = P_k^(i)ᵀ, W_2^(i) = P_v^(i))

with bottleneck size l = the number of prefix vectors. It is not a module of its own: it is the prefix point of
the design space (positions/attention_kv.py) with normalization "relu" instead of the joint softmax and compose
"add" instead of the gate — the authors' code runs it as prefix mode with attn_option=cross_attn_relu,
attn_composition=add. `scale` is the attention's own (1/√d_head, as in their code), and so is its dropout.

Defaults: P from the prefix MLP reparameterization (their "prefix" mode; width `encoder_hidden_size`, theirs 800),
real tokens keep positions 0..T-1 (the prefix is a memory without positions). One deliberate difference: the
value half of P starts at zero (`init="zero_values"`), so the adapted model starts as the base, as every bottleneck
adapter here; their code starts P at random (`init="random"` gives that). On GQA models the heads of one key/value
group share a prefix (P has the key/value heads, as every prefix here). Encoder-decoders get it in encoder and
decoder self-attention and in cross-attention, as their BART code.

Learning rate: the term is an unnormalized sum over l prefix vectors (no softmax to bound it) whose values come from
an MLP shared by every layer, so under Adam it grows several times faster than a flat table's and can drown the
head outputs it is added to: MiniLM on SST-2 does not train at 1e-3 (the bottleneck adapters' lr; the term is 7x
the head outputs by step 25), trains at 1e-4, and at 3e-4 the term stays near the heads' size in a 40-step probe
(benchmarks/sst2_mhpa_probe.py); their GLUE script uses 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from ..config import PeftConfig
from ..registry import register_config, register_method
from ..spec import AtAttentionKV, Compose, Form, Insertion, Prefix


@register_config
@dataclass(frozen=True, kw_only=True)
class MultiHeadParallelConfig(PeftConfig):
    peft_type: ClassVar[str] = "MH_PARALLEL_ADAPTER"

    bottleneck_size: int = 30  # l: prefix vectors per head = the bottleneck size
    prefix_projection: bool = True  # P = MLP(E) (their "prefix" mode); False: a flat table ("prefix_nomlp")
    encoder_hidden_size: Union[int, None] = 512  # the MLP's width
    scaling: float = 1.0  # s (their composition "add": 1)
    init: str = "zero_values"  # "zero_values": P_v = 0, the base at init · "random": their code's start
    layers_to_transform: Union[tuple[int, ...], int, None] = None

    def normalized(self) -> dict:
        layers = self.layers_to_transform
        return {**super().normalized(), **({"layers_to_transform": (layers,)} if isinstance(layers, int) else {})}

    def validate(self) -> None:
        self._delta()
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ValueError(f"scaling must be a number, got {self.scaling!r}")

    def _delta(self) -> Prefix:
        if self.init not in ("zero_values", "random"):
            raise ValueError(f"init must be 'zero_values' (the base at init) or 'random', got {self.init!r}")
        return Prefix(length=self.bottleneck_size, projection=self.encoder_hidden_size if self.prefix_projection
                      else None, init=self.init, normalization="relu")

    def insertions(self, model, arch):
        kw = dict(delta=self._delta(), form=Form.PARALLEL, compose=Compose.ADD, scale=float(self.scaling))
        layers = self.layers_to_transform
        ins = (Insertion(position=AtAttentionKV(layers=layers), name="mh_adapter", **kw),)
        if getattr(model.config, "is_encoder_decoder", False):
            ins += (Insertion(position=AtAttentionKV(layers=layers, attention="cross"), name="cross_mh_adapter", **kw),)
        return ins


register_method("multi_head_parallel", MultiHeadParallelConfig,
                "prefix K/V @ every attention · ReLU weights · add before o_proj (l = bottleneck)", "arXiv:2110.04366")

"""The unified view as types (He et al., ICLR 2022, "Towards a Unified View of PETL").

Every PEFT method computes a modification Δh and adds it to a hidden state h. A method is a tuple of
`Insertion`s, each fixed by four choices:

    delta    what Δh is          low-rank · bottleneck · scaling vector · prefix K/V · prompt
    position where it goes       a linear weight · the attention or FFN sublayer · attention K/V · input
    form     what Δh reads       sequential (the sublayer's output) · parallel (the sublayer's input) ·
                                 after_add_norm (the sublayer's output after its residual add and norm)
    compose  how it is combined  add · scale (s·Δh) · multiply (h ⊙ l, IA3) · gate (prefix softmax mass)

A prefix's attention weights are part of its delta (`Prefix.normalization`): a joint softmax with the real keys
composed by `gate` is prefix tuning; a ReLU of each prefix logit composed by `add` is the multi-head parallel
adapter (He et al. §3: the two differ exactly in normalization and composition).

Named methods (LoRA, Houlsby, MAM, ...) are presets that return such tuples; users may build their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

from .names import matches


class Form(str, Enum):
    SEQUENTIAL = "sequential"  # Δ reads h = f(x), the sublayer's output:  x + h + s·Δ(h)
    PARALLEL = "parallel"  # Δ reads x, the sublayer's input:  x + f(x) + s·Δ(x)
    # Δ reads y = N(x + f(x)), the output of the sublayer's "Add & Norm" (N: a post-norm, or the identity in
    # pre-norm models), and is added before N:  N(x + f(x) + s·Δ(y)). Pfeiffer et al.'s placement (AdapterHub).
    AFTER_ADD_NORM = "after_add_norm"


class Compose(str, Enum):
    ADD = "add"  # h + s·Δ, s fixed (1 for plain add, α/r for LoRA, 4 for scaled PA)
    LEARNED = "learned"  # h + s·Δ, s a trained scalar (initialised to `scale`)
    MULTIPLY = "multiply"  # h ⊙ l (IA3); with side="in" the linear's input is scaled instead
    GATE = "gate"  # (1-λ)·h + λ·Δ, λ from softmax mass (prefix attention: implicit in the concat)
    # (at attention K/V, ADD adds s·Δhead_i to each head's output before the output projection)


class Sublayer(str, Enum):
    ATTN = "attn"
    FFN = "ffn"


# ---------------------------------------------------------------- positions: WHERE Δh goes


@dataclass(frozen=True, kw_only=True)
class AtLinear:
    """A weight-level position: chosen linear layers (q, k, v, o, FFN linears).

    `targets` follows HF PEFT: a list of names (a module matches when its name equals one or ends with
    ".<name>"), a regex string (full match on the module name), or "all-linear" (every linear but the
    output head). Methods fill defaults from the architecture table's roles before building positions.
    """

    targets: Union[tuple[str, ...], str]
    exclude: Union[tuple[str, ...], str, None] = None
    layers: Union[tuple[int, ...], None] = None
    # names of the layer lists `layers` indexes (HF PEFT's layers_pattern: "layers", "h", ...); None: the
    # architecture's blocks
    layers_pattern: Union[tuple[str, ...], None] = None
    input_side: Union[tuple[str, ...], str, None] = None  # targets whose delta acts on the input (IA3 FFN)

    def side_of(self, name: str) -> str:
        return "in" if self.input_side is not None and matches(name, self.input_side) else "out"


@dataclass(frozen=True, kw_only=True)
class AtSublayer:
    """A residual position: the attention or FFN sublayer of every (selected) transformer block."""

    sublayer: Sublayer
    layers: Union[tuple[int, ...], None] = None


@dataclass(frozen=True, kw_only=True)
class AtAttentionKV:
    """Prefix keys/values prepended inside every (selected) attention, through one attention seam."""

    layers: Union[tuple[int, ...], None] = None
    attention: str = "self"  # "self" | "cross" (encoder-decoders)
    stack: Union[str, None] = None  # None: every stack · "decoder": only the decoder's blocks (encoder-decoders)
    # HF PEFT's semantics: the prefix occupies positions 0..P-1 as if cached, real tokens' positions start at P
    # (relative position biases see the prefix at those positions too)
    position_shift: bool = False
    # HF PEFT's encoder-decoder table layout: it stacks the table twice (self- and cross-attention copies) and hands
    # each decoder layer l the key/value block 2l mod L, so layers l and l + L/2 share a block and odd blocks go unused
    hf_seq2seq_blocks: bool = False

    def __post_init__(self):
        if self.attention not in ("self", "cross"):
            raise ValueError(f"attention must be 'self' or 'cross', got {self.attention!r}")
        if self.stack not in (None, "decoder"):
            raise ValueError(f"stack must be None (every stack) or 'decoder', got {self.stack!r}")


@dataclass(frozen=True, kw_only=True)
class AtInput:
    """Virtual-token embeddings placed in the input sequence: prepended, or at the slots a template marks
    (input ids < 0, see `unipeft.methods.p_tuning_template.apply_template`). For encoder-decoders, in the encoder input."""

    # True: returned logits include the P virtual positions, as HF PEFT's (real tokens' are logits[:, P:]);
    # False: they are cut, so logits line up with input_ids
    keep_virtual_logits: bool = True


# ---------------------------------------------------------------- deltas: WHAT Δh is


@dataclass(frozen=True, kw_only=True)
class LowRank:
    """Δ(x) = dropout(x)·Aᵀ·Bᵀ with A (r × in), B (out × r). Hu et al. 2021, arXiv:2106.09685."""

    r: int
    dropout: float = 0.0
    # True: A kaiming, B 0 · "gaussian": A ~ N(0, 1/r), B 0 · False: both random · "pissa", "pissa_niter_<n>",
    # "olora": A, B from the host weight's SVD / QR, the host keeping the residual W - s·BA (deltas/lora_init.py)
    init: Union[bool, str] = True

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        check_low_rank_init(self.init)


# inits HF PEFT has that need data, a quantizer or another method: refused, with what to use instead
_REFUSED_INITS = {
    "eva": "EVA needs activations of real data (a data-driven SVD); use init_lora_weights='pissa' (SVD of the weight) "
           "or True",
    "loftq": "LoftQ quantizes the base while initialising; quantize with unipeft.quant and use init_lora_weights=True, "
             "or 'pissa' on the float base before quantizing",
    "corda": "CorDA needs covariance statistics of real data; use init_lora_weights='pissa' or True",
    "lora_ga": "LoRA-GA needs gradients of real data; use init_lora_weights='pissa' or True",
    "orthogonal": "use init_lora_weights='olora' (QR of the weight) or True",
    "mica": "use init_lora_weights='pissa' or True",
}


def check_low_rank_init(init) -> None:
    if init is True or init is False or init in ("gaussian", "pissa", "olora"):
        return
    if isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init):
        return
    if isinstance(init, str) and init.lower() in _REFUSED_INITS:
        raise ValueError(f"init_lora_weights={init!r} is not implemented in unipeft: {_REFUSED_INITS[init.lower()]}")
    raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora', "
                     f"got {init!r}")


@dataclass(frozen=True, kw_only=True)
class Scaling:
    """A learned vector l: h ⊙ l. Liu et al. 2022 (IA3), arXiv:2205.05638."""

    init: bool = True  # True: ones (identity) · False: random (for tests)


@dataclass(frozen=True, kw_only=True)
class Bottleneck:
    """Δ(x) = up(f(down(LN(x)))). Houlsby et al. 2019, arXiv:1902.00751."""

    size: int
    non_linearity: str = "relu"
    layer_norm: bool = False
    dropout: float = 0.0
    bias: bool = True
    init: str = "identity"  # "identity": up = 0 (adapted model == base) · "random": both random (tests)

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("identity", "random"):
            raise ValueError(f"init must be 'identity' or 'random', got {self.init!r}")


@dataclass(frozen=True, kw_only=True)
class Prefix:
    """Per-layer key/value prefixes P_k, P_v (length P) attended to by every query.

    Li & Liang 2021 (arXiv:2101.00190); flat (projection=None) is P-tuning v2 (arXiv:2110.07602).
    With `projection` = m, P = MLP(E) with E (P × d) and a tanh MLP d → m → layers·2·d_kv (reparameterization).

    `normalization` turns head i's prefix logits a = q_i P_kᵀ·scale into weights: "softmax" (jointly with the real
    keys under compose=gate: prefix tuning; over the prefix alone under compose=add) or "relu" (ReLU(a), each row
    on its own; with compose=add the multi-head parallel adapter of He et al. 2022, bottleneck size = length).
    """

    length: int
    projection: Union[int, None] = None
    # "random" | "zeros" (flat table only) | "zero_values": keys random, values 0, so an added prefix (compose=add)
    # starts as the identity, as the bottleneck adapters do
    init: str = "random"
    normalization: str = "softmax"  # "softmax" | "relu"

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.length!r}")
        if self.projection is not None and self.projection <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.projection!r}")
        if self.init not in ("random", "zeros", "zero_values"):
            raise ValueError(f"prefix init must be 'random', 'zeros' or 'zero_values', got {self.init!r}")
        if self.init == "zeros" and self.projection is not None:
            raise ValueError("init='zeros' sets the flat prefix table; with a projection use 'random' or 'zero_values'")
        if self.normalization not in ("softmax", "relu"):
            raise ValueError(f"prefix normalization must be 'softmax' or 'relu', got {self.normalization!r}")


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """Virtual-token embeddings at the input (prompt tuning, arXiv:2104.08691), optionally produced by a
    prompt encoder (P-tuning v1, arXiv:2103.10385: "LSTM" = bi-LSTM + MLP, "MLP" = 2-layer MLP)."""

    length: int
    encoder: Union[str, None] = None  # None | "LSTM" | "MLP"
    encoder_hidden_size: Union[int, None] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    init: str = "RANDOM"  # "RANDOM" | "SAMPLE_VOCAB" | "TEXT"
    init_ids: tuple[int, ...] = ()  # token ids for TEXT init

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.length!r}")
        if self.encoder not in (None, "LSTM", "MLP"):
            raise ValueError(f"encoder_reparameterization_type must be 'LSTM' or 'MLP', got {self.encoder!r}")
        if self.init not in ("RANDOM", "SAMPLE_VOCAB", "TEXT"):
            raise ValueError(f"prompt init must be RANDOM, SAMPLE_VOCAB or TEXT, got {self.init!r}")


@dataclass(frozen=True, kw_only=True)
class Insertion:
    """One point of the design space: a delta at a position, in a form, composed a certain way."""

    delta: object
    position: object
    form: Form = Form.PARALLEL
    compose: Compose = Compose.ADD
    scale: float = 1.0
    name: str = field(default="")  # the attribute the delta module gets on its site (e.g. "lora")

    def describe(self) -> str:
        d = type(self.delta).__name__
        if getattr(self.delta, "normalization", "softmax") != "softmax":
            d += f"({self.delta.normalization})"
        p = type(self.position).__name__
        return f"{d} @ {p} · {self.form.value} · {self.compose.value}" + (
            f"(s={self.scale:g})" if self.compose in (Compose.ADD, Compose.LEARNED) and self.scale != 1 else ""
        )

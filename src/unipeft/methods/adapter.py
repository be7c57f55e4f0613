"""Bottleneck adapters: Δ = up(f(down(x))) at the attention and/or FFN sublayer (forms: see spec.Form).

Presets (He et al. 2022, Table 1):
    houlsby          @ attn + FFN · sequential       · add          Houlsby et al. 2019, arXiv:1902.00751
    pfeiffer         @ FFN        · after add & norm · add          Pfeiffer et al. 2021, arXiv:2005.00247
    parallel         @ FFN        · parallel         · add          He et al. 2022, arXiv:2110.04366
    scaled_parallel  @ FFN        · parallel         · scale s=4    He et al. 2022
(The multi-head parallel adapter is a prefix point, not a bottleneck: methods/mh_parallel.py.)

Houlsby trains the blocks' layer norms too, as the paper does ("we also train the layer normalization
parameters", §2.1; `train_layer_norms=True`): each block norm gets a trainable copy per adapter, as a task head
does (`modules_to_save`: fp32 over a half base, saved with the adapter, the original back after unload()). Its
non-linearity is swish, AdapterHub's choice (the paper does not fix one).

Pfeiffer reads the FFN's Add & Norm output, as AdapterHub's seq_bn does (its `original_ln_before`); reading
the FFN output instead costs ~0.6 pt on SST-2 (benchmarks/results/sst2_pfeiffer_ablation.jsonl).

up = 0 at init, so the adapted model equals the base until it trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Union

from ..arch.resolve import block_norms, resolve_sublayers
from ..config import PeftConfig
from ..registry import register_config, register_method
from ..spec import AtSublayer, Bottleneck, Compose, Form, Insertion, Sublayer

_POSITIONS = {"attn": (Sublayer.ATTN,), "ffn": (Sublayer.FFN,), "both": (Sublayer.ATTN, Sublayer.FFN)}


@register_config
@dataclass(frozen=True, kw_only=True)
class AdapterConfig(PeftConfig):
    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"

    bottleneck_size: Union[int, None] = None  # m; or hidden_size // reduction_factor
    reduction_factor: Union[float, None] = None
    position: str = "ffn"  # "attn" | "ffn" | "both"
    form: str = "sequential"  # "sequential" | "parallel" | "after_add_norm"
    scaling: Union[float, str] = 1.0  # a fixed s, or "learned" (a trained scalar starting at 1)
    non_linearity: str = "relu"
    layer_norm: bool = False
    dropout: float = 0.0
    bias: bool = True
    init: str = "identity"  # "identity" (up = 0) | "random" (tests)
    train_layer_norms: bool = False  # also train the blocks' layer norms (Houlsby et al. 2019 do; the preset sets it)
    heads: int = 1  # older files: always 1 (the block-diagonal multi-head bottleneck is gone, see validate)
    layers_to_transform: Union[tuple[int, ...], int, None] = None

    def validate(self) -> None:
        if self.position not in _POSITIONS:
            raise ValueError(f"position must be one of {list(_POSITIONS)}, got {self.position!r}")
        Form(self.form)
        if self.heads != 1:
            raise ValueError(f"heads={self.heads}: the block-diagonal multi-head bottleneck was not He et al.'s "
                             f"multi-head parallel adapter and is gone; use MultiHeadParallelConfig (the paper's: "
                             f"ReLU prefix attention per head, added before the output projection)")
        if self.bottleneck_size is not None:
            Bottleneck(size=self.bottleneck_size, dropout=self.dropout, init=self.init)
        if self.reduction_factor is not None and not self.reduction_factor > 0:
            raise ValueError(f"reduction_factor must be > 0, got {self.reduction_factor!r}")
        if isinstance(self.scaling, str) and self.scaling != "learned":
            raise ValueError(f"scaling must be a number or 'learned', got {self.scaling!r}")
        from ..functional import activation

        activation(self.non_linearity)

    def normalized(self) -> dict:
        layers = self.layers_to_transform
        return {**super().normalized(), **({"layers_to_transform": (layers,)} if isinstance(layers, int) else {})}

    # presets -------------------------------------------------------------------------------------------
    @classmethod
    def houlsby(cls, **kw) -> "AdapterConfig":
        return cls(**{"position": "both", "form": "sequential", "non_linearity": "swish", "train_layer_norms": True,
                      **_rf(kw)})

    @classmethod
    def pfeiffer(cls, **kw) -> "AdapterConfig":
        return cls(**{"position": "ffn", "form": "after_add_norm", "non_linearity": "relu", **_rf(kw)})

    @classmethod
    def parallel(cls, **kw) -> "AdapterConfig":
        return cls(**{"position": "ffn", "form": "parallel", "non_linearity": "relu", **_rf(kw)})

    @classmethod
    def scaled_parallel(cls, scaling: Union[float, str] = 4.0, **kw) -> "AdapterConfig":
        return cls(**{"position": "ffn", "form": "parallel", "non_linearity": "relu", "scaling": scaling, **_rf(kw)})

    # the design-space point ----------------------------------------------------------------------------
    def resolved(self, model, arch):
        cfg = super().resolved(model, arch)
        if arch is None:  # raises the unknown-architecture error, listing the model's modules
            resolve_sublayers(model, AtSublayer(sublayer=Sublayer.FFN), arch)
        d = getattr(model.config, "hidden_size", None) or model.config.d_model
        size = cfg.bottleneck_size or max(1, int(d // (cfg.reduction_factor or 16)))
        cfg = dataclasses.replace(cfg, bottleneck_size=size)
        if cfg.train_layer_norms:  # each adapter trains its own copy of every block norm (HF's modules_to_save)
            have = tuple(cfg.modules_to_save or ())
            cfg = dataclasses.replace(cfg, modules_to_save=have + tuple(n for n in block_norms(model, arch)
                                                                         if n not in have))
        return cfg

    def insertions(self, model, arch):
        delta = Bottleneck(size=self.bottleneck_size, non_linearity=self.non_linearity, layer_norm=self.layer_norm,
                           dropout=self.dropout, bias=self.bias, init=self.init)
        learned = self.scaling == "learned"
        return tuple(
            Insertion(delta=delta, position=AtSublayer(sublayer=s, layers=self.layers_to_transform),
                      form=Form(self.form), compose=Compose.LEARNED if learned else Compose.ADD,
                      scale=1.0 if learned else float(self.scaling), name="adapter")
            for s in _POSITIONS[self.position]
        )


def _rf(kw: dict) -> dict:
    if kw.get("bottleneck_size") is None and kw.get("reduction_factor") is None:
        kw = {**kw, "reduction_factor": 16}
    return kw


_PAPER = "arXiv:2110.04366"
register_method("houlsby", AdapterConfig.houlsby, "bottleneck @ attn + FFN · sequential · add", "arXiv:1902.00751")
register_method("pfeiffer", AdapterConfig.pfeiffer, "bottleneck @ FFN · after add & norm · add", "arXiv:2005.00247")
register_method("parallel", AdapterConfig.parallel, "bottleneck @ FFN · parallel · add", _PAPER)
register_method("scaled_parallel", AdapterConfig.scaled_parallel, "bottleneck @ FFN · parallel · scale s=4", _PAPER)

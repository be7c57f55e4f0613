"""Where trainable token rows go: the input embedding (or a named one), and any output layer sharing its
weight (tied embeddings), the two sites sharing one delta as HF PEFT's tied TrainableTokensLayer does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from torch import nn

from ..deltas import build_delta
from ..names import matches
from .installers import position_installer
from .weight import LinearDeltaSite


@dataclass(frozen=True, kw_only=True)
class AtTokenRows:
    embedding: Union[str, None] = None  # module name (or ".name" suffix); None: model.get_input_embeddings()


def _find_embedding(model, name):
    if name is None:
        emb = model.get_input_embeddings()
        return next(n for n, m in model.named_modules() if m is emb), emb
    found = [(n, m) for n, m in model.named_modules() if matches(n, (name,))]
    if len(found) != 1 or not isinstance(found[0][1], nn.Embedding):
        embs = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
        raise ValueError(f"trainable_token_indices names {name!r}, which is not exactly one nn.Embedding of "
                         f"{type(model).__name__}; embeddings found: {embs}")
    return found[0]


@position_installer(AtTokenRows)
def _install_token_rows(model, ins, arch, handle) -> list:
    name, emb = _find_embedding(model, ins.position.embedding)
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"trainable_token_indices needs an nn.Embedding at {name}, found {type(emb).__name__}")
    if any(s.host is emb for s in handle.sites):  # this adapter's deltas installed so far
        raise ValueError(f"{name} already holds a delta (it is in target_modules); trainable_token_indices on the "
                         f"same embedding is not supported: drop it from target_modules")
    delta = build_delta(ins.delta, emb.num_embeddings, emb.embedding_dim, host=emb, where=name)
    sites = [LinearDeltaSite(emb, name, ins, delta, handle.switch)]
    tied = [(n, m) for n, m in model.named_modules()
            if m is not emb and isinstance(m, nn.Linear) and m.weight is emb.weight]
    for n, m in tied:
        if m.bias is not None:
            raise ValueError(f"{n} shares {name}'s weight and has a bias; trainable tokens on such a tied layer "
                             f"are not supported")
        sites.append(LinearDeltaSite(m, n, ins, delta, handle.switch))
    return sites

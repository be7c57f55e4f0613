"""Templates for P-tuning v1: virtual tokens anywhere in the input, between anchor text."""

from __future__ import annotations

import re

from ..positions.input import SLOT  # an input id < 0 marks a virtual-token slot; the input position fills them in order


def apply_template(template: str, text: str, tokenizer, add_special_tokens: bool = True) -> list[int]:
    """Token ids for `text` placed in `template`, with SLOT where the template has [P].

    "[P][P] {text} [P] It was [MASK]."  ->  [cls, -1, -1, <text ids>, -1, <It was>, <mask id>, <.>, sep]
    """
    if "{text}" not in template:
        raise ValueError(f"template {template!r} has no {{text}} placeholder")
    ids: list[int] = []
    for piece in re.split(r"(\[P\]|\[MASK\]|\{text\})", template):
        if piece == "[P]":
            ids.append(SLOT)
        elif piece == "[MASK]":
            if tokenizer.mask_token_id is None:
                raise ValueError("the template has [MASK] but the tokenizer has no mask token")
            ids.append(tokenizer.mask_token_id)
        elif piece == "{text}":
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        elif piece.strip():
            ids += tokenizer(piece.strip(), add_special_tokens=False)["input_ids"]
    if not add_special_tokens:
        return ids
    head, tail = _special_tokens(tokenizer)
    return head + ids + tail


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS] … [SEP], <s> …)."""
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []

"""Module paths matched against names, by HF PEFT's rules, in one place (a leaf: imports nothing of unipeft).

    matches(path, targets)   `target_modules`, `exclude_modules`, `modules_to_save`, layer lists, skips:
                             a string is a regex that must match the whole path; a collection of names matches
                             a path equal to one of them or ending in ".<name>" ("q_proj" matches
                             "model.layers.0.self_attn.q_proj", never "model.layers.0.self_attn.xq_proj")
    pattern_layer_index      `layers_pattern`: the index right after the first "<pattern>." segment
    pattern_key              `rank_pattern` / `alpha_pattern`: the first key naming a dotted suffix of the path
"""

from __future__ import annotations

import re


def matches(path: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def pattern_layer_index(path: str, patterns) -> int | None:
    """The layer index in `path` after the first of `patterns` (a layer list's name, e.g. "layers", "h") found."""
    for p in patterns:
        m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path)
        if m:
            return int(m.group("idx"))
    return None


def pattern_key(patterns, path: str):
    """The first key k (a regex) of `patterns` with `(.*\\.)?(k)$` matching `path` from its start, else None."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", path):
            return k
    return None

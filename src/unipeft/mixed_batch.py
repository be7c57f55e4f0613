"""Mixed-adapter batches: `model(..., adapter_names=["a", "b", "__base__", ...])`, one adapter per row.

Each adapter named in the batch is switched on for its group of rows only (`Switch.rows`): every site runs
its delta once on that group (grouped per adapter, not row by row) and leaves the other rows unchanged; rows
named "__base__" see no adapter. Task-head copies run per group too. Prefixes give each row its adapter's
keys/values at the attention seam, padded to the batch's longest and masked (positions.attention_kv); prompts lay
each row out with its own virtual tokens and masked gap positions, and number its positions as alone
(positions.mixed_input); an added prefix term (the multi-head parallel adapter) goes on its own rows' head outputs.
Any mix of methods works; merged adapters are refused (they act on every row).
"""

from __future__ import annotations

import contextlib

import torch

from .mixed_stack import stacked_low_rank
from .positions.mixed_input import mixed_inputs

BASE = "__base__"


def batch_size(args, kwargs) -> int:
    for x in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(x, torch.Tensor):
            return x.shape[0]
    raise ValueError("adapter_names needs input_ids or inputs_embeds to know the batch size")


@contextlib.contextmanager
def mixed_batch(handles: dict, adapter_names, n_rows: int, device):
    names = list(adapter_names)
    if len(names) != n_rows:
        raise ValueError(f"adapter_names has {len(names)} entries but the batch has {n_rows} rows; give one adapter "
                         f"name (or {BASE!r}) per row")
    unknown = sorted(set(names) - set(handles) - {BASE})
    if unknown:
        raise ValueError(f"adapter_names names unknown adapter(s) {unknown}; this model has {list(handles)} "
                         f"(and {BASE!r} for the base model)")
    merged = [n for n, h in handles.items() if h.merged or any(s.merged for s in h.sites)]
    if merged:  # a merged adapter acts on every row, named or not
        raise ValueError(f"adapter(s) {merged} are merged into the weights, so they act on every row; "
                         f"unmerge_adapter() first")
    for name in dict.fromkeys(names):
        h = handles.get(name)
        if h is None:
            continue
        if h.merged or any(s.merged for s in h.sites):
            raise ValueError(f"adapter {name!r} is merged into the weights, so it cannot serve only some rows; "
                             f"unmerge_adapter() first")
        not_rowwise = [type(s).__name__ for s in h.sites if not getattr(s, "rowwise", False)]
        if not_rowwise:
            raise ValueError(f"adapter {name!r} has a {not_rowwise[0]}, which acts on the whole batch and cannot serve "
                             f"a group of rows; run this adapter's rows in a batch of their own")
    rows = {n: torch.tensor([i for i, m in enumerate(names) if m == n], device=device) for n in dict.fromkeys(names)}
    saved = [(h, h.switch.on, h.switch.rows) for h in handles.values()]
    wrappers = {id(c.wrapper): c.wrapper for h in handles.values() for c in h.copies}
    inputs = None
    try:
        for name, h in handles.items():
            h.switch.on, h.switch.rows = name in rows, rows.get(name)
        for w in wrappers.values():
            served = [(a, rows[a]) for a in w.modules_to_save if a in rows]
            rest = [i for i, m in enumerate(names) if m not in dict(served)]
            w.groups = served + ([(None, torch.tensor(rest, device=device))] if rest else [])
        inputs = mixed_inputs(handles, rows, n_rows, device)  # prompts and prefix positions, per row
        with stacked_low_rank(handles, names, device):  # plain LoRA: one gathered computation per host
            yield
    finally:
        if inputs is not None:
            inputs.remove()
        for h, on, r in saved:
            h.switch.on, h.switch.rows = on, r
        for w in wrappers.values():
            w.groups = None

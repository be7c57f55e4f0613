"""Parts of fused projections as targets: `q_proj` on Phi-3 is rows [0, H·d) of `qkv_proj`.

A target name that names a part of a fused linear (ArchSpec.fused) resolves to a `FusedSlice`: the fused
linear and the output rows the part occupies. The part's name is virtual (`...self_attn.q_proj` is not a
module of Phi-3); it is what the part would be called in Llama's layout, so the same target list means the
same thing on both. positions/fused.py places a delta's output into those rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .spec import ArchSpec, FusedLayout


@dataclass(frozen=True, eq=False)
class FusedSlice:
    host: nn.Module  # the fused linear (nn.Linear, or a quantized linear with in/out_features)
    host_name: str  # its path in the model
    part: str  # the part's name (q_proj, gate_proj, ...)
    start: int
    stop: int  # output rows [start, stop) of the fused linear

    @property
    def rows(self) -> int:
        return self.stop - self.start


def part_rows(model: nn.Module, layout: FusedLayout, d_out: int) -> list[tuple[str, int, int]]:
    """(part, start, stop) of each part of one fused linear with `d_out` output rows, from the model config."""
    cfg = model.config
    H = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    fixed = {"heads": H * hd, "kv_heads": (getattr(cfg, "num_key_value_heads", None) or H) * hd}
    shares = sum(rule == "share" for _, rule in layout.parts)
    left = d_out - sum(fixed[rule] for _, rule in layout.parts if rule != "share")
    if left < 0 or (shares and left % shares) or (not shares and left):
        raise ValueError(f"the fused {layout.fused} has {d_out} output rows, which do not split into "
                         f"{[p for p, _ in layout.parts]} by the model config ({H} heads of {hd}, "
                         f"{fixed['kv_heads'] // hd} key/value heads); target {layout.fused} as a whole")
    out, start = [], 0
    for part, rule in layout.parts:
        n = fixed[rule] if rule != "share" else left // shares
        out.append((part, start, start + n))
        start += n
    return out


def fused_slices(model: nn.Module, arch: ArchSpec | None) -> list[tuple[str, FusedSlice]]:
    """Every part of every fused linear of the model, by its virtual name (`<parent>.<part>`)."""
    if arch is None or not arch.fused:
        return []
    out = []
    for name, mod in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        for layout in arch.fused:
            if leaf != layout.fused:
                continue
            if not (hasattr(mod, "in_features") and hasattr(mod, "out_features")):
                continue  # not a linear (quantized linears have both): its parts are not targets
            for part, start, stop in part_rows(model, layout, mod.out_features):
                out.append((f"{parent}.{part}" if parent else part, FusedSlice(mod, name, part, start, stop)))
    return out

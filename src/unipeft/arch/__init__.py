"""Architecture knowledge as data: where the blocks, sublayers and named linears of each family are."""

from .resolve import blocks, default_targets, find_arch, linear_dims, resolve_linears, resolve_sublayers
from .spec import ARCHS, ArchSpec, register_arch

__all__ = [
    "ArchSpec", "ARCHS", "register_arch", "find_arch", "blocks", "default_targets", "linear_dims", "resolve_linears",
    "resolve_sublayers",
]

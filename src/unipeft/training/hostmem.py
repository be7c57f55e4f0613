"""Host (CPU) memory that training frees should leave the process: glibc heap settings and trimming.

PyTorch's CPU tensors come from malloc. glibc serves blocks below its mmap threshold from the heap, and
raises that threshold (up to 32 MB) each time a larger mmapped block is freed — so after the first step
most activations live in the heap, where freed blocks stay resident between allocations that pin the
heap's top. On a LoRA step of SmolLM2-135M that is ~2 GB of resident-but-free memory; on a QLoRA step of
a 1B model, ~300–400 MB: the peak RSS is set by fragmentation, not by live tensors.

`lean_heap()` fixes the threshold low, so every tensor above it is its own mapping and goes back to the
OS when freed; the price is page faults when memory is reused (a few % to ~20 % of step time on the
CPU machines measured, see benchmarks/results/memory.md). It changes a process-wide setting, so it is
opt-in: call it once before training. `release_free_memory()` returns free heap pages once (used after
building a quantized model). Both are no-ops without glibc.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Give free heap pages back to the OS (glibc malloc_trim). True if it ran."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def lean_heap(mmap_threshold: int = 256 * 1024, trim_threshold: int = 4 * 1024 * 1024) -> bool:
    """Serve allocations ≥ `mmap_threshold` bytes by mmap (returned to the OS when freed) and trim the
    heap's top above `trim_threshold`. Process-wide; True if applied."""
    libc = _libc()
    if libc is None:
        logger.info("lean_heap: not a glibc system; nothing changed")
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    release_free_memory()
    return ok

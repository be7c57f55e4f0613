"""Optional fused kernels from other libraries, applied to a model instance (GPU; the torch path is the fallback)."""

from .liger import LIGER_KERNELS, apply_liger, liger_available

__all__ = ["LIGER_KERNELS", "apply_liger", "liger_available"]

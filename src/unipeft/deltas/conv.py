"""LoRA on nn.Conv1d / nn.Conv2d (HF PEFT's layout): A is a conv with the host's kernel, stride and padding
into r channels, B a 1×1 conv back to the host's outputs.

    h' = h + s·B ⋆ (A ⋆ dropout(x)),   ΔW[o, i, …] = Σ_k B[o, k]·A[k, i, …]   (merges into the kernel)

A (r, in, *kernel), B (out, r, 1, …), saved as `lora_A.weight` / `lora_B.weight` like a linear's.
Grouped, dilated or non-zero-padded convs are refused: HF PEFT's A ignores dilation and padding modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora_init import changes_base
from .low_rank import LowRankDelta

_CONV = {3: F.conv1d, 4: F.conv2d}


class ConvLowRankDelta(LowRankDelta):
    host_types = (nn.Conv1d, nn.Conv2d)

    def __init__(self, spec, d_in: int, d_out: int, *, host=None, where: str = "", dtype=None, device=None, **kw):
        if changes_base(spec.init):
            raise ValueError(f"{where}: init_lora_weights={spec.init!r} is for linear layers; a conv takes "
                             f"init_lora_weights=True, False or 'gaussian'")
        if host.groups != 1 or any(d != 1 for d in host.dilation) or host.padding_mode != "zeros":
            raise ValueError(f"{where}: LoRA on a conv with groups={host.groups}, dilation={host.dilation}, "
                             f"padding_mode={host.padding_mode!r} is not supported (only groups=1, dilation 1, "
                             f"zero padding); exclude it from target_modules")
        super().__init__(spec, d_in, d_out, host=host, where=where, dtype=dtype, device=device, **kw)
        k = tuple(host.kernel_size)
        with torch.no_grad():  # the same init as a linear's, on conv-shaped tensors (fan-in includes the kernel)
            self.A = nn.Parameter(self.A.new_empty(spec.r, d_in, *k))
            self.B = nn.Parameter(self.B.new_empty(d_out, spec.r, *(1,) * len(k)))
            self.reset(spec.init)
        self._conv, self._stride, self._padding = _CONV[host.weight.dim()], host.stride, host.padding
        self.siblings = None

    def add_scaled(self, h: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
        z = self._conv(self.dropout(x), self.A.to(x.dtype), None, self._stride, self._padding)
        return h + (self._conv(z, self.B.to(x.dtype)) * s).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:  # (out, in, *kernel), the host's layout
        return torch.einsum("ok,ki...->oi...", self.B.float().flatten(1), self.A.float())

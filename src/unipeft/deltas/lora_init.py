"""LoRA inits that read the host weight and leave the residual in it (the base changes; `restore` undoes it).

    PiSSA (Meng et al. 2024, arXiv:2404.02948): W = U S Vᵀ; with S_r the top r singular values and s the scale,
        A = diag(√(S_r/s))·V_rᵀ,  B = U_r·diag(√(S_r/s)),  W_res = W − s·B·A   (so W_res + s·B·A = W).
        "pissa_niter_<n>": the same from a randomized SVD (torch.svd_lowrank, n subspace iterations; seed-dependent).
    OLoRA (Büyükakyüz 2024, arXiv:2406.01775): W = Q R;  B = Q[:, :r],  A = R[:r],  W_res = W − s·B·A.

HF PEFT is the oracle for the exact formulas. HF computes OLoRA on the weight as stored, which for GPT-2's
Conv1D (stored (in, out)) gives factors of the wrong shape, so transposed hosts are refused for OLoRA here.
"""

from __future__ import annotations

import torch

from ..arch.resolve import linear_dims

BASE_CHANGING = ("pissa", "olora")


def changes_base(init) -> bool:
    return isinstance(init, str) and init.startswith(BASE_CHANGING)


@torch.no_grad()
def factors_from_weight(init: str, W: torch.Tensor, r: int, s: float, where: str = "") -> tuple:
    """(A (r, in), B (out, r), W_res (out, in)) in fp32 from W (out, in)."""
    W = W.float()
    if init == "olora":
        Q, R = torch.linalg.qr(W)
        B, A = Q[:, :r].contiguous(), R[:r].contiguous()
    else:
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            Ur, Sr, Vhr = U[:, :r], S[:r], Vh[:r]
        else:  # pissa_niter_<n>
            Ur, Sr, V = torch.svd_lowrank(W, r, niter=int(init.split("_niter_")[-1]))
            Vhr = V.t()
        if Sr.numel() < r:
            raise ValueError(f"{where}: PiSSA needs r <= min(in, out) = {min(W.shape)}, got r={r}")
        root = torch.sqrt(Sr / s)
        A, B = torch.diag(root) @ Vhr, Ur @ torch.diag(root)
    return A, B, W - s * B @ A


class BaseSnapshot:
    """The host weight before an init changed it, kept in host memory, restored bit-exactly by `restore`."""

    def __init__(self, param: torch.nn.Parameter):
        self.param, self.original = param, param.detach().to("cpu", copy=True)

    @torch.no_grad()
    def restore(self) -> None:
        self.param.copy_(self.original.to(self.param.device))


@torch.no_grad()
def init_from_host(delta, init: str, host, s: float, where: str) -> BaseSnapshot:
    """Fill delta.A, delta.B from the host's weight and leave the residual in the host; return the undo."""
    if getattr(host, "weight", None) is None:  # no layer, or a part of a fused linear (Phi-3's q in qkv_proj)
        raise ValueError(f"init_lora_weights={init!r} reads the weight of the layer it adapts; {where or 'this position'} "
                         f"has none of its own (a fused projection's part? target the fused linear as a whole)")
    W = host.weight
    if not W.is_floating_point():
        raise ValueError(f"{where}: init_lora_weights={init!r} needs a float weight, {type(host).__name__} is "
                         f"quantized; initialise on the float model, then quantize the residual")
    transposed = bool(linear_dims(host)[2])
    if transposed and init == "olora":
        raise ValueError(f"{where} stores its weight transposed (GPT-2 Conv1D); OLoRA on such layers is not "
                         f"supported (HF PEFT factors the stored (in, out) weight); use init_lora_weights='pissa'")
    W_oi = W.t() if transposed else W
    if init == "olora" and delta.r > min(W_oi.shape):
        raise ValueError(f"{where}: OLoRA needs r <= min(in, out) = {min(W_oi.shape)}, got r={delta.r}")
    A, B, W_res = factors_from_weight(init, W_oi, delta.r, s, where)
    delta.A.copy_(A)
    delta.B.copy_(B)
    snap = BaseSnapshot(W)
    W.copy_((W_res.t() if transposed else W_res).to(W.dtype))
    return snap

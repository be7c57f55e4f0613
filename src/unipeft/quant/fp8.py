"""An FP8 frozen linear: the weight quantized once to float8 e4m3 with per-channel scales; the forward x·Wᵀ and the
input gradient g·W run as FP8 GEMMs, their other operand (x, g) quantized per row on the fly.

    x·Wᵀ:  W  ≈ Q_out · s_out   (one scale per output channel: it factors out of the sum over in-features)
    g·W:   Wᵀ ≈ Q_in  · s_in    (one scale per input channel: this sum runs over out-features)
    x      ≈ Q_x · s_x,  g ≈ Q_g · s_g   (one scale per row: per token)

so both products are (Q·Q)·s_row·s_col, the form rowwise-scaled FP8 GEMMs take (Hopper, Ada; the CPU emulates it,
slowly, for tests). The two weight copies hold one byte per weight each: as many bytes as a bf16 weight. Each is W
rounded its own way, so ∂x is g times the rounded-by-input-channel W, not exactly the gradient of the computed y (as
in every FP8 recipe); `dequantize()` returns the forward's copy. There is no weight gradient: the base is frozen (a
trainable bias still gets its gradient). The weights are stored as uint8 so that generic code sees non-floating,
quantized storage (as for bitsandbytes' linears), and the fp32 scales keep their dtype through `.to(dtype)`.
On CUDA the GEMM's output is bf16, so the compute dtype must be bf16 there.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

from ..compat import compile_rows_dynamic, scaled_mm, tensor_version

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
_TINY = 1e-12  # an all-zero row gets scale 1e-12/448 and quantizes to zeros


def quantize_rows_reference(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, k) → e4m3 values and fp32 scales (rows, 1): t ≈ q · s, each row's absmax mapped to 448."""
    s = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX
    return (t.float() / s).to(E4M3), s


_compiled = {}


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_reference`, as one fused reduction + cast on CUDA (torch.compile; eagerly it is six
    memory-bound passes over the activation, which would eat most of what the FP8 GEMM saves). A kernel per width,
    any number of rows; past torch.compile's recompile limit, new shapes run eagerly (never an error)."""
    if t.device.type != "cuda":
        return quantize_rows_reference(t)
    fn = _compiled.get("rows")
    if fn is None:
        fn = _compiled["rows"] = torch.compile(quantize_rows_reference)
    with torch.no_grad():  # one grad mode, so one compiled kernel per width (nothing here has a gradient)
        return fn(compile_rows_dynamic(t))


_last = threading.local()  # the input quantized last: q/k/v (and gate/up) read one x, quantized once for all


def _key(x: torch.Tensor) -> tuple:
    return tensor_version(x), x.data_ptr(), tuple(x.shape), x.stride()


def _quantized_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows quantized, reused while the next linear reads the same tensor unchanged: the same object, storage,
    shape and version counter (writes through `.data` bypass the counter, as they bypass autograd's own check of
    saved tensors). The entry goes when x does. Inference tensors have no version counter: never reused."""
    entry = getattr(_last, "entry", None)
    if x.is_inference():
        return quantize_rows(x.reshape(-1, x.shape[-1]).contiguous())
    if entry and entry[0]() is x and entry[1] == _key(x):
        return entry[2], entry[3]
    xq, sx = quantize_rows(x.reshape(-1, x.shape[-1]).contiguous())
    if entry:
        entry.clear()  # the replaced copy goes now, not when a garbage collection finds its reference cycle
    entry = []  # cleared by x's weakref callback, so the quantized copy never outlives x
    entry.extend((weakref.ref(x, lambda _, e=entry: e.clear()), _key(x), xq, sx))
    _last.entry = entry
    return xq, sx


def unsupported_shape(shape) -> str | None:
    """Why a weight of `shape` cannot be FP8 (None when it can): FP8 GEMMs need both sides divisible by 16."""
    return f"FP8 GEMMs need both sides divisible by 16, not {tuple(shape)}" if any(d % 16 for d in shape) else None


def fp8_supported(device: torch.device) -> bool:
    """FP8 GEMMs run here: the CPU (emulated) or a CUDA GPU of compute capability ≥ 8.9 (Ada, Hopper and later)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class _Float8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_out, s_out, w_in, s_in, bias):
        xq, sx = _quantized_input(x)
        # written through a 2-D view into the (..., out) result, so the result is no view: a LoRA on this linear may
        # add into it in place (deltas/low_rank.py add_scaled)
        y = x.new_empty(*x.shape[:-1], w_out.shape[0])
        scaled_mm(xq, w_out.view(E4M3).t(), sx, s_out.float().view(1, -1), out_dtype=x.dtype, out=y.view(-1, y.shape[-1]))
        if bias is not None:
            y += bias.to(y.dtype)
        ctx.save_for_backward(w_in, s_in)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the quantization has no derivative: a double backward refuses
    def backward(ctx, g):
        w_in, s_in = ctx.saved_tensors
        lead, n = g.shape[:-1], g.shape[-1]
        g2 = g.reshape(-1, n).contiguous()  # the FP8 GEMM takes a row-major first operand
        dx = None
        if ctx.needs_input_grad[0]:
            gq, sg = quantize_rows(g2)
            dx = scaled_mm(gq, w_in.view(E4M3).t(), sg, s_in.float().view(1, -1), out_dtype=g.dtype).view(*lead, -1)
        db = g2.float().sum(0) if ctx.needs_input_grad[5] else None
        return dx, None, None, None, None, db


def check_fp8_device(device: torch.device, compute_dtype: torch.dtype) -> None:
    """Refuse, naming the alternatives, a device without FP8 GEMMs or a compute dtype its FP8 GEMM cannot output."""
    device = torch.device(device)
    if not fp8_supported(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(f"an FP8 base needs FP8 GEMMs: a GPU of compute capability 8.9 or later (Ada, Hopper) or "
                         f"the CPU, and {name} has none; use --quantize int8 or nf4, or a bf16 base")
    if device.type == "cuda" and compute_dtype != torch.bfloat16:
        raise ValueError(f"an FP8 base computes in bf16 on CUDA (the rowwise-scaled FP8 GEMM outputs bf16), not "
                         f"{compute_dtype}: use --precision bf16 (compute_dtype=torch.bfloat16)")


class Float8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is held in float8 e4m3 (see the module docstring). `compute_dtype` is the
    dtype inputs and outputs take (and adapters on it are made for); `dequantize()` gives W back."""

    _SCALES = ("weight_scale", "weight_t_scale")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, device=None):
        nn.Module.__init__(self)
        device = torch.device(device) if device is not None else weight.device
        check_fp8_device(device, compute_dtype)
        why = unsupported_shape(weight.shape)
        if why:
            raise ValueError(f"{why}; leave this linear in full precision (Quantization(skip=...))")
        d_out, d_in = weight.shape
        self.in_features, self.out_features, self.compute_dtype = d_in, d_out, compute_dtype
        W = weight.detach().to(device)
        w_out, s_out = quantize_rows_reference(W)
        w_in, s_in = quantize_rows_reference(W.t().contiguous())
        self.weight = nn.Parameter(w_out.view(torch.uint8), requires_grad=False)
        self.register_buffer("weight_scale", s_out.view(-1))
        self.register_buffer("weight_t", w_in.view(torch.uint8))
        self.register_buffer("weight_t_scale", s_in.view(-1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(device, compute_dtype), requires_grad=False)
        self._checked = {device}

    def _apply(self, fn, recurse=True):
        """Conversions move the scales but keep them fp32 (a bf16 scale is 0.4% off, an fp16 one may underflow)."""
        scales = {n: getattr(self, n) for n in self._SCALES}
        super()._apply(fn, recurse)
        for n, s in scales.items():
            moved = getattr(self, n)
            if moved.dtype != s.dtype:
                setattr(self, n, s.to(moved.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != torch.uint8:
            raise ValueError(f"{prefix}weight is {w.dtype}, not this FP8 linear's uint8 storage: load full-precision "
                             f"weights into the float model, then quantize it (unipeft.quant.quantize_model(..., 'fp8'))")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._checked:  # moved after it was built (e.g. quantized on the CPU, then .to("cuda"))
            check_fp8_device(x.device, self.compute_dtype)
            self._checked.add(x.device)
        x = x.to(self.compute_dtype)
        return _Float8Linear.apply(x, self.weight, self.weight_scale, self.weight_t, self.weight_t_scale, self.bias)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The (out, in) float32 weight the forward multiplies by."""
        return self.weight.view(E4M3).float() * self.weight_scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, compute={self.compute_dtype}"

"""liger-kernel's fused RMSNorm, RoPE and SwiGLU (Triton, CUDA) on one model, through liger's public
`apply_liger_kernel_to_<model_type>(..., model=instance)`.

The loss path stays ours: liger is called with cross_entropy=False and fused_linear_cross_entropy=False, so the
model's forward (and with it unipeft's chunked causal-LM loss, training/losses.py) is untouched; this is checked after
the call, and a liger release that replaced it anyway is refused rather than trained through. Inside that path, liger's
fused linear cross-entropy (its public functional) computes the loss on CUDA: one Triton pass per chunk of bf16
logits where our torch fallback makes seven (forward + backward at a 1B-shape head on an H100: 28.8 vs 55.3 ms,
benchmarks/gpu_selfcheck.py --only loss_kernels). Our deltas are hooks on
the model's own modules, which liger keeps (it rebinds `forward` of the norm and MLP instances), so they still run.

liger also patches module-level names of the architecture's modeling file (RoPE is a module function there, the
norm and MLP classes are replaced for models built later): every model of that architecture made afterwards in
the same process gets the kernels too. liger-kernel and Triton are imported only when this is called.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import torch

LIGER_KERNELS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")
_MODEL_KERNELS = LIGER_KERNELS[:3]  # patched into the model by liger's apply function; the loss is called by ours
# liger's call must accept all of these: the kernels we ask for, both loss switches (to keep them off) and the instance
_NEEDED = (*_MODEL_KERNELS, "cross_entropy", "fused_linear_cross_entropy", "model")


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _base(model):
    """The transformers model under a PeftModel (liger reads `base_model_prefix`, `.layers` and `.norm`)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def liger_function(model):
    """liger's public function for `model`'s architecture; ValueError naming why when there is none we can use."""
    try:
        lt = importlib.import_module("liger_kernel.transformers")
    except ImportError as e:
        raise ImportError(f"liger-kernel is not importable ({e}): pip install liger-kernel (needs CUDA and Triton)") \
            from None
    model_type = getattr(getattr(_base(model), "config", None), "model_type", None)
    fn = getattr(lt, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        raise ValueError(f"liger-kernel has no kernels for model type {model_type!r} (it patches e.g. llama, "
                         "mistral, qwen2, gemma): train without them")
    params = inspect.signature(fn).parameters
    missing = [k for k in _NEEDED if k not in params]
    if missing:
        raise ValueError(f"liger-kernel's {fn.__name__} takes no {', '.join(missing)} argument(s): it cannot be "
                         "applied to one model with its loss left to unipeft; train without liger kernels")
    return fn


class _LigerLinearCE(torch.autograd.Function):
    """Σ cross-entropy / n through liger's public functional, as one autograd node of ours: liger computes ∂loss/∂h in
    its forward and, in its backward, scales that saved tensor in place by the incoming gradient (so a second backward
    through it would be scaled twice). Here liger's backward runs at once with gradient 1 (no scaling), and ours
    scales the result out of place."""

    @staticmethod
    def forward(ctx, h, weight, bias, y, n, ignore_index):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        with torch.enable_grad():
            hd = h.detach().requires_grad_(h.requires_grad)
            loss = liger_fused_linear_cross_entropy(hd, weight, y, bias=bias, ignore_index=ignore_index, reduction="sum")
            (gh,) = torch.autograd.grad(loss, hd) if hd.requires_grad else (None,)
        ctx.save_for_backward(gh)
        ctx.n = n
        return loss.detach() / n

    @staticmethod
    def backward(ctx, g):
        (gh,) = ctx.saved_tensors
        return gh * (g / ctx.n).to(gh.dtype), None, None, None, None, None


def liger_linear_cross_entropy(h, weight, bias, y, n, ignore_index):
    """Σ cross-entropy(h·Wᵀ + b, y) / n over the rows of `h` (N, d) whose target is not `ignore_index`, by liger's fused
    linear cross-entropy; None where it does not serve, so the caller's torch path runs: not CUDA, `h` and the head in
    different dtypes, or a trainable head (liger accumulates its gradient in the head's dtype, and only when `h` needs
    one). liger reads the count of valid rows on the host once per call (its `.item()`)."""
    if not liger_loss_serves(h.device.type, h.dtype, weight, bias):
        return None
    return _LigerLinearCE.apply(h, weight, bias, y, n, ignore_index)


def liger_loss_serves(device_type: str, dtype, weight, bias) -> bool:
    return (device_type == "cuda" and dtype == weight.dtype and not weight.requires_grad
            and (bias is None or (bias.dtype == dtype and not bias.requires_grad)))


def apply_liger(model, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
                fused_linear_cross_entropy: bool = True):
    """Apply liger-kernel's RMSNorm / RoPE / SwiGLU to `model` (a transformers model or a PeftModel) in place, and
    have unipeft's chunked loss call liger's fused linear cross-entropy on CUDA; returns `model`. The model's forward
    and the loss path are left as they are (checked)."""
    base = _base(model)
    fn = liger_function(base)
    own_forward, class_forward, ce = base.__dict__.get("forward"), type(base).forward, torch.nn.functional.cross_entropy
    fn(rms_norm=rms_norm, rope=rope, swiglu=swiglu, cross_entropy=False, fused_linear_cross_entropy=False, model=base)
    if (base.__dict__.get("forward") is not own_forward or type(base).forward is not class_forward
            or torch.nn.functional.cross_entropy is not ce):
        raise RuntimeError(f"liger-kernel's {fn.__name__} replaced the model's forward or the cross-entropy although "
                           "asked not to: unipeft's loss would not run; pin a liger-kernel release that honours "
                           "cross_entropy=False, fused_linear_cross_entropy=False, or train without it")
    on = (rms_norm, rope, swiglu, fused_linear_cross_entropy)
    base._unipeft_liger = tuple(k for k, o in zip(LIGER_KERNELS, on) if o)
    if fused_linear_cross_entropy:  # read by training.losses.ChunkedLoss and causal_lm_loss
        base._unipeft_loss_kernel = liger_linear_cross_entropy
    else:
        base.__dict__.pop("_unipeft_loss_kernel", None)
    return model

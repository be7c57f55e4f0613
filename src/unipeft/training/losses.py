"""Causal-LM loss without the (batch, seq, vocab) logits: fused linear + cross-entropy over row chunks.

    loss = (1/n) Σ_t [ logsumexp(W h_t + b) − (W h_t + b)[y_t] ]      over the n rows with y_t ≠ ignore_index

For each chunk of rows the forward pass computes the logits (in fp32), the loss terms, and at once the
gradients ∂loss/∂h = (softmax − onehot(y))·W / n (and ∂loss/∂W, ∂loss/∂b when those need them); backward
only scales them by the incoming gradient. So no logits are kept between forward and backward, and at most
one chunk of them exists at a time (the idea of Liger-Kernel's fused linear cross-entropy, in plain torch).
A full-vocabulary fp32 logits tensor for 4×256 tokens of a 49k vocabulary is 200 MB; for 1×2048 tokens of
Llama-3's 128k vocabulary it is 1 GB, and HF's loss keeps several tensors of that size alive.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import has_forward_hooks

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# logits per chunk: 12M fp32 = 48 MB (256 rows of a 49k vocabulary). Measured on 2 CPU threads (SmolLM2's head,
# 1024 rows, loss forward + backward, CPU s): 170 rows 2.13, 256 rows 1.91, 340 rows 1.93 (HF's full logits 2.48): the
# head's GEMMs with fewer rows per call run below MKL's rate. Peak RSS of a SmolLM2 LoRA step (4×256): 3583, 3547 MiB
# with 256 rows, 3541, 3612 with 170 (the 16 MB more per chunk is within run-to-run noise).
CHUNK_ELEMENTS = 12 << 20
# on an accelerator: 64M fp32 = 256 MiB (523 rows of Llama-3's 128k vocabulary). The CPU size gave 98-row chunks there,
# and an H100 kernel table of a 1B-shape step (benchmarks/results/gpu_h100_profiles/) showed the loss's GEMMs in
# 104-row tiles at ~40% of the rate of liger's fused loss (123 vs 29 ms a step); not yet re-measured at this size.
ACCELERATOR_CHUNK_ELEMENTS = 64 << 20


def default_chunk(vocab: int, device: torch.device | None = None) -> int:
    """Rows per chunk so that one chunk of fp32 logits is about CHUNK_ELEMENTS on the CPU, ACCELERATOR_CHUNK_ELEMENTS
    elsewhere (at least 16 rows)."""
    budget = CHUNK_ELEMENTS if device is None or device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(16, budget // vocab)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, b, y, n, chunk, grads, valid=None):
        # h (N, d) rows, W (V, d), b (V,) or None, y (N,); valid (N,) bool: rows that count (None: all of them)
        need_h, need_W = grads and h.requires_grad, grads and W.requires_grad
        need_b = grads and b is not None and b.requires_grad
        grads = need_h or need_W or need_b
        wide = torch.float64 if h.dtype == torch.float64 else torch.float32
        loss = torch.zeros((), dtype=wide, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gW = torch.zeros(W.shape, dtype=wide, device=W.device) if need_W else None
        gb = torch.zeros(b.shape, dtype=wide, device=b.device) if need_b else None
        for i in range(0, h.shape[0], chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            vc = None if valid is None else valid[i:i + chunk, None].to(wide)
            z = F.linear(hc, W, b)  # (c, V)
            z = z if z.dtype in (torch.float32, torch.float64) else z.float()
            target = z.gather(1, yc[:, None]).squeeze(1)  # (c,), read before z is overwritten
            m = z.amax(-1, keepdim=True)
            e = z.sub_(m).exp_()  # exp(z − max), in place of the logits: one exp pass and no temporary
            s = e.sum(-1, keepdim=True)
            terms = (m + s.log()).sub_(target[:, None])  # logsumexp − target logit
            loss += (terms if vc is None else terms.mul_(vc)).sum()
            if not grads:
                continue
            if need_h and not (need_W or need_b):
                # (softmax − onehot(y))·W = (e·W)/s − W[y]: the division and the −1 act on the (c, d) product, not on
                # the (c, V) probabilities (two passes over them fewer; ~5 % of the loss's CPU time); an ignored
                # row (vc = 0) gets a zero gradient
                if gh.dtype == W.dtype == e.dtype and vc is None:
                    torch.mm(e, W, out=gh[i:i + chunk]).div_(s).sub_(W[yc])
                else:
                    g = (e.to(W.dtype) @ W).to(wide).div_(s) - W[yc].to(wide)
                    gh[i:i + chunk] = (g if vc is None else g.mul_(vc)).to(h.dtype)
                continue
            # softmax; an ignored row (vc = 0) divides by s/0 = inf, so its gradient is 0 with no extra pass
            p = e.div_(s if vc is None else s / vc)
            p[torch.arange(p.shape[0], device=p.device), yc] -= 1.0 if vc is None else vc[:, 0]  # ∂/∂z of the sum
            if need_h and gh.dtype == W.dtype == p.dtype:
                torch.mm(p, W, out=gh[i:i + chunk])  # straight into its rows
            elif need_h:
                gh[i:i + chunk] = (p.to(W.dtype) @ W).to(h.dtype)
            if need_W:
                gW.addmm_(p.t(), hc.to(wide))
            if need_b:
                gb += p.sum(0)
        ctx.save_for_backward(gh, gW, gb)
        ctx.n, ctx.dtypes = n, (W.dtype, None if b is None else b.dtype)
        return loss / n

    @staticmethod
    def backward(ctx, g):
        gh, gW, gb = ctx.saved_tensors
        s = g / ctx.n
        dh = gh * s.to(gh.dtype) if gh is not None else None
        dW = (gW * s).to(ctx.dtypes[0]) if gW is not None else None
        db = (gb * s).to(ctx.dtypes[1]) if gb is not None else None
        return dh, dW, db, None, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None,
                    chunk: int | None = None, ignore_index: int = IGNORE_INDEX, shift: bool = True,
                    num_items_in_batch=None, kernel=None) -> torch.Tensor:
    """Mean cross-entropy of the LM head `weight` (V, d) (+ `bias`) on `hidden` (B, T, d) against `labels` (B, T).

    `shift=True` follows HF: position t predicts labels[t + 1]. Rows whose target is `ignore_index` cost
    nothing. `num_items_in_batch` replaces the number of valid targets as the divisor (HF's gradient
    accumulation convention). Equal to HF's loss on full logits up to floating-point summation order.
    `kernel(h, W, b, y, n, ignore_index)`, when given, is a fused kernel for the same sum / n over the (N, d) rows
    (`unipeft.kernels.liger.liger_linear_cross_entropy`); it returns None where it does not serve, and this path runs.
    """
    if shift:
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])  # (B·T, d)
    y = labels.reshape(-1).to(hidden.device)
    keep = y != ignore_index
    chunk = chunk or default_chunk(weight.shape[0], h.device)
    if kernel is not None or not reads_are_free(h.device):
        # a kernel, or an accelerator (no host read: dropping the ignored rows needs their count on the host), so
        # they are computed and masked out, and the divisor stays a device tensor
        n = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp_min(1)
        n = n.to(h.device, torch.float32) if torch.is_tensor(n) else float(n)
        # ignored rows zeroed first: a non-finite one (padding overflowing in half precision) would otherwise make
        # the loss and gradients NaN through 0·inf, where the dropping path never sees it
        h = torch.where(keep[:, None], h, h.new_zeros(()))
        loss = None if kernel is None else kernel(h, weight, bias, y, n, ignore_index)
        if loss is not None:
            return loss
        if not reads_are_free(h.device):
            return _FusedLinearCE.apply(h, weight, bias, torch.where(keep, y, 0), n, chunk, torch.is_grad_enabled(),
                                        keep)
    if not bool(keep.all()):
        h, y = h[keep], y[keep]
    n = num_items_in_batch if num_items_in_batch is not None else max(int(y.numel()), 1)
    n = float(n.item() if torch.is_tensor(n) else n)
    return _FusedLinearCE.apply(h, weight, bias, y, n, chunk, torch.is_grad_enabled())


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on `device` costs no wait (the CPU): then the loss drops ignored rows."""
    return device.type == "cpu"


def _inner_and_head(model: nn.Module):
    """(the model without its LM head, the head) of a HF causal LM, or None when the head cannot be fused."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(head, nn.Linear) or inner is None or inner is model:
        return None
    hooked = [m for m in (model, head) if has_forward_hooks(m)]
    if hooked or next(head.children(), None) is not None or getattr(model.config, "final_logit_softcapping", None):
        return None  # a delta on the head, prompt tokens added at the root, or a logit soft-cap: not fusable
    return inner, head


def causal_lm_loss(model: nn.Module, input_ids, attention_mask=None, labels=None, *, chunk: int | None = None,
                   num_items_in_batch=None, **kwargs) -> torch.Tensor:
    """model(input_ids, attention_mask, labels=labels).loss, computed from the inner model's hidden states
    with `chunked_lm_loss` (on an injected model: the standard call with skip_logits=True, see ChunkedLoss). Falls back to the model's own loss (with a warning) when the head is adapted or
    wrapped (prompt tokens, a delta on lm_head, soft-capped logits)."""
    labels = input_ids if labels is None else labels
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_unipeft_chunked_loss", None) is not None:  # injected: the standard call is chunked
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, skip_logits=True,
                     **kwargs).loss
    parts = _inner_and_head(model)
    if parts is None:
        logger.warning("causal_lm_loss: the LM head of %s cannot be fused; using the model's own loss",
                       type(model).__name__)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    inner, head = parts
    out = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return chunked_lm_loss(hidden, head.weight, labels, bias=head.bias, chunk=chunk,
                           num_items_in_batch=num_items_in_batch, kernel=getattr(base, "_unipeft_loss_kernel", None))


# -------------------------------------------------------------------------- the default path: model(..., labels=...)

_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_NO_LOGITS: dict[type, type] = {}


class LogitsNotComputed(AttributeError):
    pass


def _without_logits(out, loss: torch.Tensor):
    """`out`'s type and values with `loss` set and no logits: reading `.logits` raises a clear error, while
    getattr(out, "logits", None) gives None and positions (`out[0]` is the loss) are as transformers makes them."""
    cls = type(out)
    sub = _NO_LOGITS.get(cls)
    if sub is None:
        def __getattribute__(self, name):
            if name == "logits" and object.__getattribute__(self, "__dict__").get("_unipeft_no_logits"):
                raise LogitsNotComputed(
                    "logits were not computed: a training-mode forward with labels computes the loss in chunks "
                    "without the (batch, seq, vocab) logits (unipeft.training.losses.ChunkedLoss). Pass skip_logits=False to "
                    "this call to get them (and HF's loss on them), or call the model in eval mode.")
            return cls.__getattribute__(self, name)

        def __repr__(self):
            return f"{cls.__name__}(logits=<not computed>, " + ", ".join(f"{k}={v!r}" for k, v in self.items()) + ")"

        # no `logits` field either: generic traversals of outputs (FSDP2's root post-forward hook walks every
        # dataclass field for tensors needing gradients) skip it instead of tripping over the error
        fields = {k: v for k, v in getattr(cls, "__dataclass_fields__", {}).items() if k != "logits"}
        sub = _NO_LOGITS[cls] = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__repr__": __repr__,
                                                            "__module__": cls.__module__,
                                                            "__dataclass_fields__": fields})
    new = sub(**{**{k: v for k, v in out.items() if k != "logits"}, "loss": loss})
    new.__dict__["_unipeft_no_logits"] = True
    return new


class ChunkedLoss:
    """Makes `model(input_ids=..., labels=...)` compute its loss with `chunked_lm_loss`: no full fp32 logits.

    Installed by `inject` on generative models whose output embedding is a plain linear (causal LMs: labels shifted,
    HF's `num_items_in_batch` honoured; encoder-decoders: unshifted, decoder inputs from the labels as the model
    would make them). A pre-hook on the root takes the labels out of the call; a pre-hook on the LM head keeps its
    input (the last hidden states) and lets the head project zero rows; a hook on the root computes the loss and
    returns the model's own output type with `loss` set and `logits` None (reading `.logits` raises, naming the way
    to get them). The model's own code runs otherwise, so hooks of adapters, prompts and checkpointing all apply.

    When: `skip_logits` (Liger-Kernel's name) in the call decides; by default a training-mode forward with labels is
    chunked and an eval-mode one computes the logits (evaluation usually wants them). Never chunked, with the
    model's own loss instead: under torch.compile, with `return_dict=False`, `logits_to_keep`, TRL's
    `fused_lm_head`, a head that is adapted, wrapped or swapped (LoRA on lm_head, a trainable copy), or a model
    that scales or caps its logits after the head (Gemma 2's soft-cap, Cohere's/Granite's scales).
    """

    def __init__(self, model: nn.Module):
        self.model, self.head = model, model.get_output_embeddings()
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self._state = None
        self._hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                       self.head.register_forward_pre_hook(self._head_pre),
                       model.register_forward_hook(self._post)]
        model._unipeft_chunked_loss = self

    @staticmethod
    def applies_to(model: nn.Module) -> bool:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        can_generate = getattr(model, "can_generate", None)
        return (type(head) is nn.Linear and callable(can_generate) and bool(can_generate())
                and getattr(model, "_unipeft_chunked_loss", None) is None)

    def _fusable(self, module, kwargs) -> bool:
        cfg = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
        head = module.get_output_embeddings()
        return (head is self.head and next(head.children(), None) is None
                and head.weight.is_floating_point() and not torch.compiler.is_compiling()
                and kwargs.get("return_dict", True) is not False and not kwargs.get("fused_lm_head")
                and _is_zero(kwargs.get("logits_to_keep", 0))
                and getattr(module, "final_logits_bias", None) is None  # BART family: logits + bias after the head
                and getattr(cfg, "router_z_loss_coef", None) is None  # loss terms beyond aux_loss (Switch)
                and all(getattr(cfg, k, None) in (None, 1, 1.0) for k in _LOGIT_SCALES))

    def _pre(self, module, args, kwargs):
        self._state = None
        skip = kwargs.pop("skip_logits", None)
        labels = kwargs.get("labels")
        shift_labels = kwargs.get("shift_labels")
        wanted = skip if skip is not None else module.training and (labels is not None or shift_labels is not None)
        if not wanted or (labels is None and shift_labels is None) or not self._fusable(module, kwargs):
            if skip:
                logger.warning("skip_logits=True ignored: %s computes its loss from full logits here (see "
                               "unipeft.training.losses.ChunkedLoss for when chunking applies)", type(module).__name__)
            return args, kwargs
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        n = kwargs.get("num_items_in_batch")
        if self.seq2seq:
            if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
                kwargs["decoder_input_ids"] = module.prepare_decoder_input_ids_from_labels(labels=labels)
            target, shift, n = labels, False, None  # the model's own loss is the token mean
        else:
            target, shift = (shift_labels, False) if shift_labels is not None else (labels, True)
        self._state = {"labels": target, "shift": shift, "n": n, "hidden": None}
        return args, kwargs

    def _head_pre(self, module, args):
        if self._state is None or self._state["hidden"] is not None:
            return None
        h = args[0]
        self._state["hidden"] = h
        return (h[..., :0, :],) + tuple(args[1:])  # the head projects no rows

    def _post(self, module, args, out):
        state, self._state = self._state, None
        if state is None:
            return out
        if state["hidden"] is None:
            raise RuntimeError(f"{type(module).__name__} did not call its LM head; unipeft's chunked loss cannot be "
                               f"computed (pass skip_logits=False)")
        head, hidden, labels = self.head, state["hidden"], state["labels"]
        extra = hidden.shape[-2] - labels.shape[-1]
        if extra > 0:  # positions prepended after the labels were taken (a prompt adapter added later): no targets
            labels = F.pad(labels, (extra, 0), value=IGNORE_INDEX)
        elif extra < 0:
            raise RuntimeError(f"{type(module).__name__}: {labels.shape[-1]} labels per row for {hidden.shape[-2]} "
                               f"positions; pass skip_logits=False to use the model's own loss")
        loss = chunked_lm_loss(hidden, head.weight, labels, bias=head.bias, shift=state["shift"],
                               num_items_in_batch=state["n"], kernel=getattr(module, "_unipeft_loss_kernel", None))
        aux = out.get("aux_loss") if hasattr(out, "get") else None
        if aux is not None:  # mixture-of-experts load balancing, as the model adds it to its own loss
            loss = loss + module.config.router_aux_loss_coef * aux.to(loss.device)
        return _without_logits(out, loss)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.model, "_unipeft_chunked_loss", None) is self:
            del self.model._unipeft_chunked_loss


def _is_zero(v) -> bool:
    return not torch.is_tensor(v) and v == 0

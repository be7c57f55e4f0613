"""Activation outputs that backward recomputes instead of keeping: a = act(g) saved as g, which is kept anyway.

A gated feed-forward (Llama's down(act(gate(x)) · up(x)), and every GLU variant) saves three (tokens, inner)
tensors per layer for backward: g = gate(x) (act's backward reads its input), a = act(g) and u = up(x) (the
product's backward reads both factors). a is a pure function of g, so keeping g alone and recomputing a when
backward asks for it is exact (the same kernel on the same tensor gives the same bits) and frees one of the
three: on SmolLM2-135M at 4×256 tokens, 6 MB per layer, 180 MB of the step's peak; one act pass per layer is
the cost (about 1 % of the step on CPU).

How: a pre-hook on the model root opens a `torch.autograd.graph.saved_tensors_hooks` window for the forward and
an always-called forward hook closes it (an exception in the forward closes it too); a hook on each activation
module notes (act, g, a) weakly. Inside the window every tensor saved for backward passes `_pack`: a (or a
contiguous view of all of it) is replaced by (act, g) when g itself was saved in the same forward (SiLU and GELU
save their input; ReLU saves its output, so nothing changes there), anything else is kept as is. The window
spans the whole forward because a may be saved outside the module holding act (BERT: the next layer's LoRA). Unpacking recomputes act(g) once per backward (and checks that g was not
modified in place since, as autograd checks its own saved tensors).

Off: under torch.compile (the compiler decides what to keep), while gradient checkpointing is on (it keeps no
activations; its own saved-tensor hooks must stay innermost), in eval/no-grad forwards (nothing is saved),
and for activation modules that hold parameters or buffers (learned activations) or are not known to be
deterministic elementwise functions.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..compat import activation_checkpointing, tensor_version

# pure, deterministic functions of their input: recomputing them gives the same bits
_TORCH_ACTS = (nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU,
               nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus)


def _is_pure_activation(m: nn.Module) -> bool:
    if next(m.parameters(recurse=True), None) is not None or next(m.buffers(recurse=True), None) is not None:
        return False
    if isinstance(m, _TORCH_ACTS):
        return True
    # transformers' ACT2FN modules (SiLUActivation, GELUActivation, NewGELUActivation, ...): stateless functions
    return type(m).__module__ == "transformers.activations" and not list(m.children())


class _Recomputed:
    """What the saved-tensor slot of a = act(g) holds instead of a."""

    __slots__ = ("act", "g", "shape", "version", "value")

    def __init__(self, act: nn.Module, g: torch.Tensor, shape: torch.Size):
        self.act, self.g, self.shape, self.version, self.value = act, g, shape, tensor_version(g), None

    def get(self) -> torch.Tensor:
        if tensor_version(self.g) != self.version:
            raise RuntimeError(_MODIFIED.format(what=f"the input of {type(self.act).__name__} (unipeft recomputes "
                                                     f"its output in backward from it)"))
        if self.value is None:
            self.value = self.act.forward(self.g)  # the forward alone: its hooks ran after our (first) one
        return self.value.view(self.shape)


class _Window:
    """One training forward of the model: the saved-tensor hooks and what they have seen. Activation outputs and
    inputs are held weakly (the window must not keep alive what the graph lets go)."""

    def __init__(self):
        self.saved: dict[int, weakref.ref] = {}  # data_ptr -> the (detached) tensor saved in this forward
        self.outputs: dict[int, tuple] = {}  # data_ptr of a -> (act, data_ptr, shape, stride of g, weakref a, version)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor):
        ptr = t.data_ptr()
        hit = self.outputs.get(ptr)
        if hit is not None:
            act, g_ptr, g_shape, g_stride, a, a_version = hit
            a, g = a(), self.saved.get(g_ptr, _dead)()
            # a itself, or a contiguous view of all of it (a linear's input flattened to 2-D), as act returned it (an
            # in-place change since, such as a.mul_(up), makes it another tensor); g as act read it
            if (a is not None and g is not None and g_ptr != ptr and g.shape == g_shape and g.stride() == g_stride
                    and t.numel() == a.numel() and t.dtype == a.dtype and t.is_contiguous() and a.is_contiguous()
                    and tensor_version(t) == tensor_version(a) == a_version):
                return _Recomputed(act, g, t.shape)
        # with the version autograd would check itself (saved-tensor hooks turn its in-place check off); a result of
        # an op detached (no reference cycle through its own grad_fn when the graph is dropped unused), a leaf as
        # itself (a sharding engine that swaps a parameter's .data before backward must be seen)
        d = t if t.grad_fn is None else t.detach()
        self.saved[ptr] = weakref.ref(d)
        return d, tensor_version(t)

    def close(self) -> None:
        self.hooks.__exit__(None, None, None)
        self.saved.clear()
        self.outputs.clear()
        del self.hooks


def _dead():
    return None


def _unpack(x):
    if isinstance(x, _Recomputed):
        return x.get()
    t, version = x
    if tensor_version(t) != version:
        raise RuntimeError(_MODIFIED.format(what=f"[{t.type()} {list(t.shape)}] is at version {tensor_version(t)}; "
                                                 f"expected version {version} instead"))
    return t


_MODIFIED = "one of the variables needed for gradient computation has been modified by an inplace operation: {what}"


class ActivationRecompute:
    """A saved-tensor window around each training forward of `model` and a hook on each of its pure activation
    modules (see the module doc). Installed by `inject` beside the chunked loss; removed with the adapter."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._window: _Window | None = None
        self._hooks = [act.register_forward_hook(self._act_out, prepend=True)  # sees forward's own output
                       for act in model.modules() if _is_pure_activation(act)]
        self._hooks += [model.register_forward_pre_hook(self._open),
                        model.register_forward_hook(self._close, always_call=True)]  # closed on exceptions too
        model._unipeft_activation_recompute = self

    @staticmethod
    def applies_to(model: nn.Module) -> bool:
        return getattr(model, "_unipeft_activation_recompute", None) is None and any(
            _is_pure_activation(m) for m in model.modules())

    def _open(self, module, args):
        if (self._window is not None or not module.training or not torch.is_grad_enabled()
                or torch.compiler.is_compiling() or activation_checkpointing(module)):
            return None
        self._window = _Window()
        self._window.hooks.__enter__()
        return None

    def _close(self, module, args, out):
        w, self._window = self._window, None
        if w is not None:
            w.close()
        return None

    def _act_out(self, module, args, out):
        w = self._window
        # out.dtype == g.dtype: under autocast an activation on its cast lists computed in another dtype, which a
        # recompute in backward (outside autocast) would not reproduce
        if w is not None and args and torch.is_tensor(out) and torch.is_tensor(args[0]) and out.dtype == args[0].dtype:
            g = args[0]
            w.outputs[out.data_ptr()] = (module, g.data_ptr(), g.shape, g.stride(), weakref.ref(out),
                                         tensor_version(out))
        return None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.model, "_unipeft_activation_recompute", None) is self:
            del self.model._unipeft_activation_recompute

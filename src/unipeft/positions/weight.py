"""Weight-level position: a delta on a linear layer (q, k, v, o, FFN linears), GPT-2 Conv1D included.

    parallel · add       W x + s·Δ(x)          LoRA (s = α/r), linear bottleneck
    multiply · out       (W x + b) ⊙ l         IA3 on keys / values
    multiply · in        W (x ⊙ l) + b         IA3 on feed-forward linears

Mergeable deltas fold into W (and b) exactly; merge/unmerge are inverse in fp32 arithmetic. A quantized
host (integer weight storage) must be dequantized first (`unipeft.quant.dequantize_model`).

Deltas whose dropout can be shared (`delta.dropout.cache`) get the adapter's DropoutCache, so siblings
reading the same x draw one mask; deltas with a `siblings` slot get the adapter's SiblingProjections
(one matmul for the siblings' input projections); deltas offering `add_scaled(h, x, s)` add s·Δ(x) in one op, called as the module (`delta(x, h, s)`) so that
engines hooking module calls (DeepSpeed ZeRO-3) see it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import functional as Fn
from ..arch.resolve import adaptable_dims
from ..compat import autocast_dtype, runs_first_after_forward
from ..deltas.dropout import DropoutCache
from ..deltas.same_input import SameInputGroups
from ..deltas.siblings import SiblingProjections
from ..spec import Compose, Form, Insertion
from .base import ModuleSite, on_rows
from .host_group import HostGroups


def output_is_unshared(module, hook_id: int) -> bool:
    """Whether the forward hook `hook_id` may write into `module`'s output in place: it is the first code to see the
    output (no global hooks, no earlier hook of the module) and torch.compile is not tracing (it schedules itself)."""
    return not torch.compiler.is_compiling() and runs_first_after_forward(module, hook_id)


# device types where a delta offering `linear_with` is computed inside its host linear's GEMMs (HostForward): on a GPU
# the hook's add into the output and autograd's sum of the two input gradients are memory-bound passes that the base
# GEMM's epilogue does for free; on the CPU the hook path (with sibling projections) is what was measured
FUSED_HOST_DEVICES = frozenset({"cuda"})


class HostForward:
    """The instance `forward` of a plain nn.Linear that sites may compute their delta inside (`delta.linear_with`).

    A call fuses at most one site: the one whose output hook is the first code to see the output (so the result is
    what the hook would have made), when it is active on every row, its delta `fuses_into_host`, the weight is frozen,
    a plain tensor (no DeepSpeed partition, no quantized subclass) in x's dtype, autocast (if on) computes in that
    dtype, x is on a device of FUSED_HOST_DEVICES, and nothing has wrapped this forward since; the site's hook then
    passes that output through (it is marked). Anything else runs nn.Linear's forward.
    """

    def __init__(self, host: nn.Linear):
        self.host, self.sites = host, []
        host.forward = self.forward  # an instance attribute: del restores the class's forward

    @staticmethod
    def of(host) -> "HostForward | None":
        """The host's HostForward, made if it can have one (a plain nn.Linear whose forward nobody else replaced)."""
        fwd = host.__dict__.get("forward")
        if isinstance(getattr(fwd, "__self__", None), HostForward):
            return fwd.__self__
        if type(host) is not nn.Linear or fwd is not None:  # e.g. accelerate's hooks replace it
            return None
        return HostForward(host)

    def forward(self, x, *args, **kwargs):
        # not when something wrapped this forward after us (accelerate's hooks, say): its output may be a new tensor,
        # which the site's hook could not tell from an unfused one
        if (not args and not kwargs and torch.is_tensor(x) and x.device.type in FUSED_HOST_DEVICES
                and self.host.__dict__.get("forward") == self.forward):
            for site in self.sites:
                if site.fuses(x):
                    out = site.fused_output(x) if site.host_groups is None else site.host_groups.output(site, x)
                    out._unipeft_fused_by = site  # on the tensor, so concurrent calls (threads) never mix
                    return out
        return nn.Linear.forward(self.host, x, *args, **kwargs)

    def detach(self, site) -> None:
        if site in self.sites:
            self.sites.remove(site)
        if not self.sites and self.host.__dict__.get("forward") == self.forward:
            del self.host.forward


def _fusable_weight(W: torch.Tensor, b, x: torch.Tensor) -> bool:
    if W.requires_grad or x.dtype != W.dtype or (b is not None and b.dtype != W.dtype) or hasattr(W, "ds_id"):
        return False
    if type(W.data) is not torch.Tensor:  # a tensor subclass (torchao's quantized weights, DTensor): F.linear dispatches
        return False
    return autocast_dtype(x.device.type) in (None, W.dtype)


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Switch (one per adapter) -> caches


def adapter_caches(switch) -> tuple[DropoutCache, SiblingProjections, HostGroups]:
    """What the deltas of one adapter (one Switch) share: dropout draws, sibling projections, and host groups (the
    linears reading one x computed in one node)."""
    caches = _CACHES.get(switch)
    if caches is None:
        caches = _CACHES[switch] = (DropoutCache(), SiblingProjections(), HostGroups())
    return caches


class InputPasses:
    """A pre-hook on the model root telling an adapter's same-input groups (SiblingProjections, HostGroups) that a
    forward pass begins (when learned groups may take effect; see deltas/same_input.py). Undone with the adapter."""

    def __init__(self, model, groups: SameInputGroups):
        self.groups = groups
        self._hook = model.register_forward_pre_hook(lambda module, args: groups.new_pass())

    def remove(self) -> None:
        self._hook.remove()


def input_passes(model, sites, extras) -> list:
    """The InputPasses `sites` need that `extras` do not hold yet (one per groups object)."""
    have = {id(e.groups) for e in extras if isinstance(e, InputPasses)}
    out = []
    for s in sites:
        for groups in (getattr(s.delta, "siblings", None), getattr(s, "host_groups", None)):
            if groups is not None and id(groups) not in have:
                have.add(id(groups))
                out.append(InputPasses(model, groups))
    return out


def sharing_scope(host_name: str) -> str:
    """Where deltas reading one tensor may share what they compute from it (deltas/same_input.py): the innermost
    numbered module holding the host (an element of a ModuleList: a transformer block, the unit transformers'
    gradient checkpointing recomputes; T5's `block.N.layer.M`), else its parent. Never across two blocks: T5's decoder
    blocks all read the encoder output. Within one: a parallel block's attention and MLP read one normed x."""
    parts = host_name.split(".")[:-1]
    for i in range(len(parts), 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return ".".join(parts)


class LinearDeltaSite(ModuleSite):
    # (form, compose, side) -> (the host's hook registration, the method computing it): every point a linear computes
    HOOKS = {
        (Form.PARALLEL, Compose.ADD, "out"): ("register_forward_hook", "_parallel"),  # W x + s·Δ(x)
        (Form.PARALLEL, Compose.LEARNED, "out"): ("register_forward_hook", "_parallel"),
        (Form.SEQUENTIAL, Compose.ADD, "out"): ("register_forward_hook", "_sequential"),  # h + s·Δ(h)
        (Form.SEQUENTIAL, Compose.LEARNED, "out"): ("register_forward_hook", "_sequential"),
        (Form.PARALLEL, Compose.MULTIPLY, "out"): ("register_forward_hook", "_scale_output"),  # IA3: h ⊙ l
        (Form.PARALLEL, Compose.MULTIPLY, "in"): ("register_forward_pre_hook", "_scale_input"),  # W (x ⊙ l)
    }
    valid_forms = frozenset((form, compose) for form, compose, _ in HOOKS)
    computes_whole_output = True  # the delta acts on all of the host's output (HostForward may compute it inside)

    def __init__(self, host, host_name: str, ins: Insertion, delta, switch, side: str = "out", attr: str | None = None):
        if (ins.form, ins.compose) in self.valid_forms and (ins.form, ins.compose, side) not in self.HOOKS:
            raise ValueError(f"{host_name}: an additive delta on a linear adds to its output; side={side!r} (the "
                             f"linear's input) is only meaningful with compose=multiply")  # before anything is placed
        super().__init__(host, host_name, ins, delta, switch, attr=attr)  # refuses a (form, compose) it has no hook for
        self.transposed = adaptable_dims(host)[2]  # (in, out) storage: Conv1D, nn.Embedding
        self.side = side
        dropouts, projections, host_groups = adapter_caches(switch)
        scope = sharing_scope(host_name)  # what reads one x shares its draw / projection / node only inside it
        if hasattr(getattr(delta, "dropout", None), "cache"):
            delta.dropout.cache, delta.dropout.scope = dropouts, scope
        if hasattr(delta, "siblings") and ins.compose == Compose.ADD and ins.form == Form.PARALLEL:
            delta.siblings = projections
            projections.set_scope(delta, scope)
        self._fused = callable(getattr(delta, "add_scaled", None)) and ins.compose == Compose.ADD
        register, method = self.HOOKS[(ins.form, ins.compose, side)]
        handle = getattr(host, register)(getattr(self, method))
        self.hook(handle)
        self._hook_id = handle.id
        self._adds_in_place = self._fused and getattr(delta, "adds_in_place", False)
        self._host_forward = (HostForward.of(host) if self.computes_whole_output and self._adds_in_place
                              and hasattr(delta, "linear_with") else None)
        # the linears of this adapter reading one x (q, k, v) computed in one node, when the delta can be
        self.host_groups = host_groups if self._host_forward is not None and hasattr(delta, "linears_with") else None
        if self.host_groups is not None:
            self.host_groups.set_scope(self, scope)
        if self._host_forward is not None:
            self._host_forward.sites.append(self)

    def fused_output(self, x: torch.Tensor) -> torch.Tensor:
        """The host's output with the delta computed inside its GEMMs (when `fuses(x)`)."""
        return self.delta.linear_with(x, self.host.weight, self.host.bias, float(self.s))

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether HostForward may compute this call of the host (x on a fused device) with the delta inside."""
        host = self.host
        return (self.active and self.switch.rows is None and self.delta.fuses_into_host
                and _fusable_weight(host.weight, host.bias, x) and output_is_unshared(host, self._hook_id))

    # hooks -----------------------------------------------------------------------------------------
    def _parallel(self, module, args, out):
        if not self.active:
            return out
        if getattr(out, "_unipeft_fused_by", None) is self:  # HostForward computed it with the delta inside
            del out._unipeft_fused_by
            return out
        if self._fused and self._writes_into(module, out):
            return self.delta(args[0], out, float(self.s), in_place=True)
        if self._fused:
            return on_rows(self.switch, out, lambda h, x: self.delta(x, h, float(self.s)), args[0])
        return on_rows(self.switch, out, lambda h, x: Fn.compose(h, self.delta(x), self.s), args[0])

    def _writes_into(self, module, out) -> bool:
        """Whether the delta may add into the host's output in place: every row is this adapter's, our hook is the
        first code to see the output (so nobody holds it yet), and not under torch.compile (it schedules itself)."""
        return (self._adds_in_place and self.switch.rows is None and torch.is_tensor(out)
                and output_is_unshared(module, self._hook_id))

    def _sequential(self, module, args, out):
        return on_rows(self.switch, out, lambda h: Fn.compose(h, self.delta(h), self.s)) if self.active else out

    def _scale_output(self, module, args, out):
        return on_rows(self.switch, out, lambda h: h * self.delta(h)) if self.active else out

    def _scale_input(self, module, args):
        if not self.active:
            return None
        return (on_rows(self.switch, args[0], lambda x: x * self.delta(x)),) + tuple(args[1:])

    # merge -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, inverse: bool) -> None:
        W, b = self.host.weight, getattr(self.host, "bias", None)
        if not W.is_floating_point():
            raise ValueError(f"{self.host_name} is a quantized linear ({type(self.host).__name__}); merging into "
                             f"integer weights is lossy: dequantize first (unipeft.quant.dequantize_model)")
        if self.ins.compose == Compose.MULTIPLY:
            Fn.scale_linear(W, b, self.delta.l, self.side, self.transposed, inverse)
        elif self.ins.form == Form.PARALLEL and callable(getattr(self.delta, "merge_into", None)):
            self.delta.merge_into(W, float(self.s), self.transposed, inverse)  # a delta that is not W + ΔW (DoRA)
        elif self.ins.form == Form.PARALLEL and self.delta.can_merge():
            s = float(self.s)
            dW = self.delta.delta_weight() * s
            Fn.merge_linear(W, -dW if inverse else dW, self.transposed)
        else:
            super().merge()

    def merge(self) -> None:
        if not self.merged:
            self._apply(inverse=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._apply(inverse=True)
            self.merged = False

    def remove(self) -> None:
        if self._host_forward is not None:
            self._host_forward.detach(self)
            self._host_forward = None
        super().remove()

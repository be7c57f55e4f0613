"""Residual positions: a delta at the attention or FFN sublayer of a block.

    sequential      h = f(x);  h + s·Δ(h)          Houlsby (Δ reads the sublayer's output)
    parallel        f(x) + s·Δ(x)                  parallel / scaled parallel adapters (Δ reads its input)
    after_add_norm  z = x + f(x);  N(z + s·Δ(N z))  Pfeiffer (Δ reads the output of Add & Norm)

after_add_norm needs the residual sum z, which lives on another module than f: in post-norm models (BERT)
it is the input of the norm N, so a pre-hook adds s·Δ(N z) there; in pre-norm models N is the identity and
z is the output of a module (the block, or T5's T5LayerFF), so a forward hook adds s·Δ(z) to it.

f's input and output may sit on different modules (BERT's FFN is `intermediate` → `output.dense`): the
parallel form then captures x with a pre-hook on the input module. Under gradient checkpointing the
recomputation runs the hooks again in the same order, so the capture stays consistent.
"""

from __future__ import annotations

from ..spec import Compose, Form, Insertion
from .base import ModuleSite, first_input, map_output, on_rows
from .. import functional as Fn


class SublayerDeltaSite(ModuleSite):
    def __init__(self, in_module, out_module, out_name: str, ins: Insertion, delta, switch, *, residual=None):
        super().__init__(out_module, out_name, ins, delta, switch)
        self._x = None
        self.HOOKS[ins.form](self, in_module, out_module, residual)

    # hooks by form -------------------------------------------------------------------------------------
    def _hook_sequential(self, in_module, out_module, residual):  # x + h + s·Δ(h), h = f(x)
        self.hook(out_module.register_forward_hook(self._sequential))

    def _hook_parallel(self, in_module, out_module, residual):  # x + f(x) + s·Δ(x)
        if in_module is out_module:
            self.hook(out_module.register_forward_hook(self._parallel_same, with_kwargs=True))
        else:
            self.hook(in_module.register_forward_pre_hook(self._capture, with_kwargs=True))
            self.hook(out_module.register_forward_hook(self._parallel_split))

    def _hook_after_add_norm(self, in_module, out_module, residual):  # N(x + f(x) + s·Δ(y)), y = N(x + f(x))
        module, post_norm = residual
        if post_norm:
            self.hook(module.register_forward_pre_hook(self._before_norm, with_kwargs=True))
        else:  # pre-norm: N is the identity, y is the residual sum
            self.hook(module.register_forward_hook(self._sequential))

    HOOKS = {Form.SEQUENTIAL: _hook_sequential, Form.PARALLEL: _hook_parallel, Form.AFTER_ADD_NORM: _hook_after_add_norm}
    # every form adds s·Δ to the residual stream; multiply and gate have no meaning there
    valid_forms = frozenset((f, c) for f in HOOKS for c in (Compose.ADD, Compose.LEARNED))

    def _sequential(self, module, args, out):
        if not self.active:
            return out
        return map_output(out, lambda h: on_rows(self.switch, h, lambda h: Fn.compose(h, self.delta(h), self.s)))

    def _add_delta_of(self, x):
        return lambda h: on_rows(self.switch, h, lambda h, x: Fn.compose(h, self.delta(x), self.s), x)

    def _parallel_same(self, module, args, kwargs, out):
        if not self.active:
            return out
        return map_output(out, self._add_delta_of(first_input(args, kwargs)))

    def _capture(self, module, args, kwargs):
        self._x = first_input(args, kwargs) if self.active else None

    def _parallel_split(self, module, args, out):
        x, self._x = self._x, None
        if not self.active or x is None:
            return out
        return map_output(out, self._add_delta_of(x))

    def _before_norm(self, norm, args, kwargs):
        if not self.active:
            return None
        z = first_input(args, kwargs)
        # .forward: N z without re-entering this hook
        z = on_rows(self.switch, z, lambda z: Fn.compose(z, self.delta(norm.forward(z)), self.s))
        if args:
            return (z,) + tuple(args[1:]), kwargs
        key = next(k for k in ("hidden_states", "x", "input") if k in kwargs)
        return args, {**kwargs, key: z}

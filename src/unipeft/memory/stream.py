"""Frozen quantized layers that wait in pinned host memory and visit the accelerator one at a time.

A 70B model in NF4 is ~35 GiB of frozen weights; training adapters on it needs only the layer being computed
on the GPU. Each transformer layer's quantized linears are parked on the host; the first of them to run loads
the whole layer, evicting the previously loaded one. Training needs reentrant gradient checkpointing: its first
forward keeps no autograd graph (a graph would hold every layer's device weights until backward), and the
recompute in backward loads each layer again, in reverse, right before its local backward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..compat import keep_own_tensors_on_conversion
from ..quant.bnb import device_tensors, is_quantized


def _pin(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.pin_memory() if torch.cuda.is_available() else t


class LayerStream:
    """Which layer's weights are on `device` now; `park` moves a quantized linear's state to the host."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.host: dict[int, list[tuple[object, str, torch.Tensor]]] = {}  # id(layer) -> (holder, attr, host copy)
        self.resident: nn.Module | None = None
        self.loads = 0  # how many layer loads: a test and the benchmark read it

    @torch.no_grad()
    def park(self, linear: nn.Module) -> None:
        slots = [(obj, attr, _pin(getattr(obj, attr))) for obj, attr in device_tensors(linear)]
        for obj, attr, host in slots:
            setattr(obj, attr, host)
        linear._unipeft_parked = slots
        linear.compute_device = self.device  # adapters on it are made there (unipeft.inject reads it)
        keep_own_tensors_on_conversion(linear)  # model.to(device) must not pull it back; its adapters still move

    def attach(self, model: nn.Module) -> None:
        """Group parked linears by the layer (an element of an nn.ModuleList) holding them. Each linear's
        pre-hook loads its layer: hooks on the linears run inside the layer's forward, so also in the recompute
        of gradient checkpointing (transformers checkpoints `forward`, outside the layer's own hooks)."""
        for lists in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for layer in lists:
                parked = [m for m in layer.modules() if hasattr(m, "_unipeft_parked")]
                if parked:
                    self.host[id(layer)] = [s for m in parked for s in m._unipeft_parked]
                    for m in parked:
                        m.register_forward_pre_hook(functools.partial(self._pre, layer))
        for m in model.modules():
            if hasattr(m, "_unipeft_parked"):
                del m._unipeft_parked
        model._unipeft_stream = self

    def _pre(self, layer: nn.Module, linear: nn.Module, args) -> None:  # not under no_grad: it reads grad mode
        if torch.is_grad_enabled() and not (layer.training and getattr(layer, "gradient_checkpointing", False)):
            raise RuntimeError("this model streams its frozen layers from host memory, so a forward with gradients "
                               "keeps no weights for backward: call gradient_checkpointing_enable() to train, or "
                               "run inference under torch.no_grad()")
        if self.resident is layer:
            return
        if self.resident is not None:
            for obj, attr, host in self.host[id(self.resident)]:
                setattr(obj, attr, host)
        for obj, attr, host in self.host[id(layer)]:
            setattr(obj, attr, host.to(self.device, non_blocking=True))
        self.resident = layer
        self.loads += 1


def stream_layers(model: nn.Module, device) -> LayerStream:
    """Park every quantized linear of `model` in host memory and stream it per layer to `device` (in place).
    `load_quantized(..., stream=True)` does this while building, so the device never holds all layers."""
    s = LayerStream(device)
    for m in model.modules():
        if is_quantized(m):
            s.park(m)
    s.attach(model)
    return s

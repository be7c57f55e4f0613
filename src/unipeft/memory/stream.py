"""Frozen quantized layers that wait in pinned host memory and visit the accelerator one at a time.

A 70B model in NF4 is ~35 GiB of frozen weights; training adapters on it needs only the layer being computed
on the GPU. Each transformer layer's quantized linears are parked on the host; the first of them to run loads
the whole layer, evicting the previously loaded one. Training needs reentrant gradient checkpointing: its first
forward keeps no autograd graph (a graph would hold every layer's device weights until backward), and the
recompute in backward loads each layer again, in reverse, right before its local backward.

On CUDA the next layer (in the direction of travel: forward, or the reverse order of the recompute) is copied
on a side stream while the current one computes; the compute stream waits on an event before using it, and the
copies are recorded on the compute stream so the allocator never hands their memory out while a kernel may still
read it. Two layers are then on the device instead of one. On a CPU nothing is prefetched.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..compat import keep_own_tensors_on_conversion
from ..quant.bnb import device_tensors
from ..quant.schemes import is_quantized


def _pin(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t.pin_memory() if torch.cuda.is_available() else t


class LayerStream:
    """Which layer's weights are on `device` now; `park` moves a quantized linear's state to the host."""

    def __init__(self, device, prefetch: bool | None = None):
        self.device = torch.device(device)
        self.host: dict[int, list[tuple[object, str, torch.Tensor]]] = {}  # id(layer) -> (holder, attr, host copy)
        self.resident: nn.Module | None = None
        self.loads = 0  # how many layer loads: a test and the benchmark read it
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.order: list[nn.Module] = []  # the streamed layers in forward order
        self._index: dict[int, int] = {}
        self._ahead: tuple[nn.Module, list[torch.Tensor], object] | None = None  # (layer, device copies, event)
        self._side = None  # the copy stream, made on first use
        self.prefetched = 0  # loads served by a prefetch (the benchmark's self-check reads it)

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
                    self._index[id(layer)] = len(self.order)
                    self.order.append(layer)
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
        previous = self.resident
        if previous is not None:
            for obj, attr, host in self.host[id(previous)]:
                setattr(obj, attr, host)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is layer:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ahead[2])
            for (obj, attr, _), t in zip(self.host[id(layer)], ahead[1], strict=True):
                t.record_stream(stream)  # used here, made on the side stream
                setattr(obj, attr, t)
            self.prefetched += 1
        else:  # not prefetched (or a wrong guess, dropped): copied on the compute stream
            for obj, attr, host in self.host[id(layer)]:
                setattr(obj, attr, host.to(self.device, non_blocking=True))
        self.resident = layer
        self.loads += 1
        if self.prefetch:
            i = self._index[id(layer)]
            step = -1 if previous is not None and self._index[id(previous)] > i else 1
            if 0 <= i + step < len(self.order):
                self._start_copy(self.order[i + step])

    def _start_copy(self, layer: nn.Module) -> None:
        """Copy `layer`'s tensors to the device on the side stream; the next `_pre` of that layer waits for them."""
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._side):
            copies = [host.to(self.device, non_blocking=True) for _, _, host in self.host[id(layer)]]
            event = torch.cuda.Event()
            event.record(self._side)
        self._ahead = (layer, copies, event)


def stream_layers(model: nn.Module, device, prefetch: bool | None = None) -> LayerStream:
    """Park every quantized linear of `model` in host memory and stream it per layer to `device` (in place).
    `load_quantized(..., stream=True)` does this while building, so the device never holds all layers.
    `prefetch` (default: on CUDA) copies the next layer on a side stream while the current one computes."""
    s = LayerStream(device, prefetch)
    for m in model.modules():
        if is_quantized(m):
            s.park(m)
    s.attach(model)
    return s

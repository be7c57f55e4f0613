"""Gradient checkpointing for any adapted model, optionally holding the checkpointed inputs in host memory.

Non-reentrant checkpointing keeps only each layer's inputs for the backward pass and recomputes the rest;
adapter gradients flow even though the frozen inputs need none. With `offload=True` those inputs are
saved through `torch.autograd.graph.save_on_cpu`, so on an accelerator they wait in (pinned) host memory
and come back for the recompute; on a CPU-only machine the "copy" is the tensor itself and nothing moves.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..compat import set_checkpoint_function


def checkpoint_function(offload: bool = False, **kwargs):
    """A `checkpoint`-like callable (fn, *args, **kw) for transformers' layers; `kwargs` go to checkpoint."""
    kwargs = {"use_reentrant": False, **kwargs}
    if not offload:
        return functools.partial(checkpoint, **kwargs)

    def offloaded(function, *args, **kw):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(function, *args, **kwargs, **kw)

    return offloaded


def enable_gradient_checkpointing(model: nn.Module, *, offload: bool = False, checkpoint_kwargs=None) -> None:
    """Turn on gradient checkpointing in a transformers model (non-reentrant unless told otherwise)."""
    kw = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    if getattr(model, "_unipeft_stream", None) is not None:
        # streamed layers (unipeft.memory.stream): a reentrant first forward keeps no graph, so no layer's
        # device weights outlive its forward; the recompute in backward loads each layer again
        kw["use_reentrant"] = True
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x; the older name warns there
        enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if offload:  # transformers' own offload=True pins host memory, which fails without an accelerator
        set_checkpoint_function(model, checkpoint_function(offload, **kw))

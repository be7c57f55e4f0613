"""Streamed layers' prefetch order (which layer is copied ahead, forward and in the backward recompute), on CPU with
the copy itself stood in for; the CUDA copies are checked on the GPU by benchmarks/gpu_selfcheck.py."""

from __future__ import annotations

import torch
from conftest import batch_for, tiny_llama

from unipeft import LoraConfig, get_peft_model
from unipeft.memory.stream import LayerStream


def test_prefetch_follows_the_direction_of_travel(tmp_path, monkeypatch):
    from unipeft.quant import load_quantized

    m = tiny_llama()
    m.config.num_hidden_layers = 4
    type(m)(m.config).save_pretrained(tmp_path)
    model = load_quantized(tmp_path, "nf4", compute_dtype=torch.float32, stream=True)
    stream = model._unipeft_stream
    assert stream.prefetch is False and len(stream.order) == 4  # CPU: off by default
    layers = list(model.model.layers)
    assert stream.order == layers
    ahead = []
    stream.prefetch = True
    monkeypatch.setattr(LayerStream, "_start_copy", lambda self, layer: ahead.append(layers.index(layer)))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft.train()
    peft.gradient_checkpointing_enable()
    peft(**batch_for("llama")).loss.backward()
    # forward 0..3: each load starts the next; the recompute goes 3 (resident), 2, 1, 0: each starts the one below
    assert ahead == [1, 2, 3, 1, 0], ahead
    assert stream.prefetched == 0  # nothing was really copied ahead here


def test_prefetch_off_on_cpu_keeps_the_plain_path(tmp_path):
    s = LayerStream("cpu")
    assert s.prefetch is False and s._side is None

"""Checkpoint keys: our parameters' paths <-> the names in adapter_model.safetensors.

Keys read `base_model.model.<path in the HF model>` as in HF PEFT. Deltas that exist in HF PEFT declare
their HF names (`hf_keys`, e.g. LoRA's A -> lora_A.weight) and are written under them, so either library
loads the other's files; our own methods keep their parameter paths.
"""

from __future__ import annotations

from torch import nn

PREFIX = "base_model.model."


def file_keys(handle, hf_names: bool) -> dict[str, tuple[str, nn.Parameter]]:
    """file key -> (parameter path in the model, parameter), for every parameter the adapter owns."""
    out: dict[str, tuple[str, nn.Parameter]] = {}
    hf_hosts = set()
    for s in handle.sites:
        hf = hf_names and bool(type(s.delta).hf_keys)
        if hf:
            hf_hosts.add(s.host_name)
        for pname, p in s.delta.named_parameters():
            path = f"{s.path}.{pname}"
            key = f"{s.host_name}.{type(s.delta).hf_keys[pname]}" if hf and pname in type(s.delta).hf_keys else path
            out[PREFIX + key] = (path, p)
    for c in handle.copies:
        for pname, p in c.copy.named_parameters():
            out[f"{PREFIX}{c.name}.{pname}"] = (f"{c.name}.{pname}", p)
    for name, p, _ in handle.trainable_base:
        host = name.rsplit(".", 1)[0]
        key = f"{host}.base_layer.bias" if host in hf_hosts else name  # HF PEFT wraps the biased linear
        out[PREFIX + key] = (name, p)
    return out

"""Checkpoint keys: our parameters' paths <-> the names in adapter_model.safetensors.

Keys read `<prefix><path in the HF model>` with HF PEFT's prefix (`base_model.model.`, or `base_model.` for
prompt learning). Deltas that exist in HF PEFT declare their HF names (`hf_keys`, e.g. LoRA's A ->
lora_A.weight) and are written under them; deltas whose HF form is a derived tensor (a prefix table made by
an MLP, P-tuning's encoder output) export it under its HF name (`hf_tensors`) beside their own weights,
so HF PEFT loads our files and we can still resume training from them.

The model holds each adapter under its name (HF's module layout, `q_proj.lora_A.<adapter>.weight`; see
positions/layout.py); file keys drop that segment, as HF PEFT's files do, so they are computed from the site
(`<host>.<insertion name>.<param>`, or the delta's HF name) and never from the module path.
"""

from __future__ import annotations

from torch import nn

from ..deltas.base import delta_parameters


def _unique_sites(handle):
    seen = set()
    for s in handle.sites:
        if id(s.delta) not in seen:
            seen.add(id(s.delta))
            yield s


def file_keys(handle, hf_names: bool, prefix: str) -> dict[str, tuple[str, nn.Parameter]]:
    """file key -> (parameter path in the model, parameter), for every parameter the adapter owns."""
    out: dict[str, tuple[str, nn.Parameter]] = {}
    where = {id(p): n for n, p in handle.adapter_parameters().items()}  # the paths in the module layout
    hf_hosts = set()
    for s in _unique_sites(handle):
        hf = hf_names and bool(type(s.delta).hf_keys)
        if hf:
            hf_hosts.add(s.host_name)
        for pname, p in delta_parameters(s.delta):
            stem = f"{s.path}.{pname}"
            key = f"{s.host_name}.{type(s.delta).hf_keys[pname]}" if hf and pname in type(s.delta).hf_keys else stem
            out[prefix + key] = (where.get(id(p), stem), p)
    for c in handle.copies:
        for pname, p in c.copy.named_parameters():
            out[f"{prefix}{c.name}.{pname}"] = (where.get(id(p), f"{c.name}.{pname}"), p)
    for name, p, _ in handle.trainable_base:
        host = name.rsplit(".", 1)[0]
        key = f"{host}.base_layer.bias" if host in hf_hosts else name  # HF PEFT wraps the biased linear
        out[prefix + key] = (name, p)
    return out


def exported(handle) -> dict[str, object]:
    """HF export name -> the delta that makes it; names claimed twice are dropped (no HF equivalent)."""
    out, clash = {}, set()
    for s in _unique_sites(handle):
        for name in getattr(type(s.delta), "hf_exports", ()):
            if name in out:
                clash.add(name)
            out[name] = s.delta
    return {k: v for k, v in out.items() if k not in clash}


def clashing_exports(handle) -> set[str]:
    """HF export names that several deltas of this adapter would each make (no single HF counterpart)."""
    seen, clash = set(), set()
    for s in _unique_sites(handle):
        for name in getattr(type(s.delta), "hf_exports", ()):
            (clash if name in seen else seen).add(name)
    return clash


def hf_wrapper_prefixes(handle, prefix: str) -> tuple[str, ...]:
    """Keys HF PEFT writes for its ModulesToSaveWrapper internals (with bias="all": `<head>.original_module.*`,
    `<head>.modules_to_save.*`); they carry nothing the head's own keys don't, so loading skips them."""
    return tuple(f"{prefix}{c.name}.{inner}." for c in handle.copies for inner in ("original_module", "modules_to_save"))


def hf_base_copies(handle, prefix: str) -> dict[str, nn.Parameter]:
    """Keys under which HF PEFT may write a full copy of an adapted layer's own weight (it does for embeddings:
    `<host>.base_layer.weight`, to carry a resized vocabulary) -> the host's weight, to check a file against."""
    return {f"{prefix}{s.host_name}.base_layer.weight": s.host.weight for s in _unique_sites(handle)
            if isinstance(getattr(getattr(s, "host", None), "weight", None), nn.Parameter)}  # input sites: no host

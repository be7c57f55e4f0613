"""A PiSSA / OLoRA adapter as a plain LoRA on the original base (HF PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`).

PiSSA/OLoRA train on a residual base: W = W_res + s·B₀A₀ at init, W_res + s·BA after training. On the
original W the same model is W + s·(BA − B₀A₀) = W + s·[B | −B₀]·[A ; A₀], a LoRA of rank 2r with the same s
(r and α doubled; α·√2 with rsLoRA). B₀, A₀ come from the adapter saved right after initialisation, whose
config is rewritten with init_lora_weights=True (as HF does) so that loading it never decomposes the base again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..io.checkpoint import CONFIG_NAME, load_config_dict, load_tensors
from ..io.atomic import write_text


def to_plain_lora(cfg: dict, tensors: dict[str, torch.Tensor], initial_folder) -> tuple[dict, dict]:
    """(config, tensors) of the trained adapter rewritten as a rank-2r LoRA on the original base."""
    initial_folder = Path(initial_folder)
    if cfg.get("peft_type") != "LORA" or not str(cfg.get("init_lora_weights")).startswith(("pissa", "olora")):
        raise ValueError("path_initial_model_for_weight_conversion converts a PiSSA or OLoRA adapter to LoRA; this "
                         f"adapter's init_lora_weights is {cfg.get('init_lora_weights')!r}")
    if cfg.get("use_dora"):
        raise ValueError("a DoRA adapter cannot be converted to LoRA (its magnitude rescales the whole weight); "
                         "save it without path_initial_model_for_weight_conversion and load it on the original base")
    if cfg.get("use_rslora") and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        raise ValueError("with use_rslora and rank_pattern/alpha_pattern the converted adapter cannot keep each "
                         "layer's scale (HF PEFT has the same limit); save without the conversion")
    initial_cfg = load_config_dict(initial_folder)
    initial = load_tensors(initial_folder)
    out = {}
    for k, v in tensors.items():
        if k.endswith((".lora_A.weight", ".lora_B.weight")):
            if k not in initial or initial[k].shape != v.shape:
                raise ValueError(f"{initial_folder} is not this adapter's initial state: {k} is missing or has "
                                 f"another shape; save the adapter right after get_peft_model and pass that folder")
            v0 = initial[k].to(v.device, v.dtype)
            out[k] = torch.cat([v, v0], 0) if k.endswith(".lora_A.weight") else torch.cat([v, -v0], 1)
        else:
            out[k] = v  # task heads, token rows: unchanged by the conversion
    cfg = dict(cfg, init_lora_weights=True, r=2 * cfg["r"],
               lora_alpha=cfg["lora_alpha"] * (math.sqrt(2) if cfg.get("use_rslora") else 2),
               rank_pattern={k: 2 * v for k, v in (cfg.get("rank_pattern") or {}).items()},
               alpha_pattern={k: 2 * v for k, v in (cfg.get("alpha_pattern") or {}).items()})
    write_text(initial_folder / CONFIG_NAME, json.dumps(dict(initial_cfg, init_lora_weights=True), indent=2,
                                                        sort_keys=True) + "\n")
    return cfg, out

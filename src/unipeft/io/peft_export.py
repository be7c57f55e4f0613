"""The HF PEFT LoRA folder that vLLM and SGLang load, from a saved unipeft adapter folder.

Our save is already HF PEFT's layout (adapter_config.json + adapter_model.safetensors). What serving runtimes add:
they load plain LoRA only (no DoRA, no trained heads or biases, no residual-base inits like PiSSA), and not every
runtime reads `use_rslora`. So rsLoRA's scale α/√r is folded into `lora_alpha` (α' = α·√r with use_rslora off
gives α'/r = α/√r): the same numbers under HF PEFT's LoraConfig semantics and under a runtime that ignores the flag.
With per-module ranks or alphas (`rank_pattern`, `alpha_pattern`) one α' cannot serve every module, so each module's
lora_B is multiplied by √r_m instead (α_m/r_m·√r_m = α_m/√r_m) and the patterns stay as they are.
"""

from __future__ import annotations

import math

# What each runtime loads, and the export format that serves it (the message for adapters that cannot go there).
RUNTIMES = (
    "vLLM, SGLang: a plain LoRA adapter (--format peft) or a merged model (--format merged)",
    "llama.cpp, Ollama: a merged Llama-family model as GGUF (--format gguf)",
    "transformers + HF PEFT: the adapter folder itself for methods HF PEFT has, or a merged model (--format merged)",
    "transformers + unipeft: every method, from the adapter folder (unipeft.PeftModel.from_pretrained)",
)


def runtime_table() -> str:
    return "\n".join("    " + r for r in RUNTIMES)


def lora_blockers(cfg: dict) -> list[str]:
    """Why a saved adapter config is not a plain LoRA a serving runtime loads ([] when it is)."""
    if cfg.get("peft_type") != "LORA":
        return [f"it is a {cfg.get('peft_type')} adapter, not LoRA"]
    out = []
    if cfg.get("use_dora"):
        out.append("it uses DoRA (a magnitude vector runtimes do not apply)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian",):
        out.append(f"init_lora_weights={init!r} changed the base weights (the adapter alone needs the residual base)")
    if cfg.get("modules_to_save"):
        out.append(f"it also trains whole modules {list(cfg['modules_to_save'])} (modules_to_save)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        out.append("it trains biases")
    if cfg.get("trainable_token_indices"):
        out.append("it trains embedding rows (trainable_token_indices)")
    if cfg.get("layer_replication"):
        out.append("it replicates layers (layer_replication)")
    return out


def serving_config(cfg: dict) -> tuple[dict, bool]:
    """The adapter config with use_rslora off, and whether each lora_B must be scaled by √r_m (`rslora_into_B`) for
    the scales to stay what they were (see the module docstring)."""
    out = dict(cfg)
    if not out.get("use_rslora"):
        return out, False
    out["use_rslora"] = False
    if out.get("rank_pattern") or out.get("alpha_pattern"):
        return out, True
    out["lora_alpha"] = out["lora_alpha"] * math.sqrt(out["r"])
    return out, False


def rslora_into_B(tensors: dict) -> dict:
    """HF PEFT adapter tensors with each lora_B (lora_embedding_B) multiplied by √r of its module (the rows of its
    lora_A), computed in fp32 and stored in the tensor's dtype."""
    out = dict(tensors)
    for key, B in tensors.items():
        for a, b in (("lora_A.", "lora_B."), ("lora_embedding_A", "lora_embedding_B")):
            if b in key:
                r = tensors[key.replace(b, a)].shape[0]
                out[key] = (B.float() * math.sqrt(r)).to(B.dtype)
    return out

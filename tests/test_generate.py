"""generate() with the KV cache equals step-by-step greedy decoding with full forward passes, for every
method on decoders and T5, with and without left padding in the batch."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS
from matrix import CORE, PROMPT, cases, config

from unipeft import get_peft_model

STEPS = 8


def _inputs(arch, left_pad: bool):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 96, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        if arch == "t5":  # encoder padding sits on the right
            ids[1, 4:], mask[1, 4:] = 0, 0
        else:
            ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def _greedy_reference(peft, arch, ids, mask):
    """Full forward passes over the whole sequence each step, positions from the mask as generate() does."""
    if arch == "t5":
        dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)  # decoder_start_token_id
        for _ in range(STEPS):
            logits = peft(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return dec
    seq, m = ids, mask
    for _ in range(STEPS):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        logits = peft(input_ids=seq, attention_mask=m, position_ids=pos).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return seq


@pytest.mark.parametrize("left_pad", [False, True], ids=["no_pad", "left_pad"])
@pytest.mark.parametrize("method,arch", cases(CORE + PROMPT, ("llama", "gpt2", "t5")))
def test_generate_equals_full_forward_greedy(method, arch, left_pad):
    peft = get_peft_model(BUILDERS[arch](), config(method, arch, random=True))
    peft.eval()
    peft.generation_config.eos_token_id = None  # always STEPS tokens
    peft.generation_config.pad_token_id = 0
    ids, mask = _inputs(arch, left_pad)
    with torch.no_grad():
        out = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False)
        ref = _greedy_reference(peft, arch, ids, mask)
    assert torch.equal(out, ref), f"\n{out}\n{ref}"


@pytest.mark.parametrize("method", ["prefix", "prompt_tuning", "mam"])
def test_beam_search_runs_and_batch_matches_single_rows(method):
    peft = get_peft_model(BUILDERS["llama"](), config(method, "llama", random=True))
    peft.eval()
    peft.generation_config.eos_token_id = None
    ids, mask = _inputs("llama", left_pad=True)
    with torch.no_grad():
        both = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
        one = peft.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=5, num_beams=3, do_sample=False)
    assert both.shape == (2, 11)
    assert torch.equal(both[0], one[0])

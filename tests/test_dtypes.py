"""Half-precision bases: every method injects in the model's dtype, runs forward/backward, and merges in fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, batch_for
from matrix import CORE, PROMPT, cases, config

from unipeft import get_peft_model


@pytest.mark.parametrize("method,arch", cases(CORE + PROMPT, ("llama",)))
def test_bf16_forward_backward(method, arch):
    model = BUILDERS[arch]().to(torch.bfloat16)
    peft = get_peft_model(model, config(method, arch, random=True))
    assert all(p.dtype == torch.bfloat16 for p in peft.handle.adapter_parameters().values())
    loss = peft(**batch_for(arch)).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in peft.handle.adapter_parameters().values())


def test_bf16_merge_accumulates_in_fp32():
    model = BUILDERS["llama"]().to(torch.bfloat16)
    peft = get_peft_model(model, config("lora", "llama", random=True))
    site = peft.handle.sites[0]
    W = site.host.weight.detach().float().clone()
    peft.merge_adapter()
    expected = (W + site.delta.delta_weight() * site.s).to(torch.bfloat16)
    assert torch.equal(site.host.weight, expected)

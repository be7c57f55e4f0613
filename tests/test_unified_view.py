"""The unified view's identities, as tests (He et al., ICLR 2022)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of

from unipeft import AtLinear, Bottleneck, Compose, Form, Insertion, LoraConfig, get_peft_model, inject


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_lora_equals_parallel_adapter_with_identity_activation(arch):
    """LoRA on W  ≡  a parallel bottleneck at W with f = identity, no bias and scale α/r."""
    r, alpha = 4, 12
    lora_model, pa_model = BUILDERS[arch](), BUILDERS[arch]()
    targets = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value"), "t5": ("q", "v")}[arch]
    peft = get_peft_model(lora_model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    pa = Insertion(delta=Bottleneck(size=r, non_linearity="identity", bias=False, init="random"),
                   position=AtLinear(targets=targets), form=Form.PARALLEL, compose=Compose.ADD, scale=alpha / r,
                   name="adapter")
    handle = inject(pa_model, (pa,))
    assert len(handle.sites) == len(peft.handle.sites) > 0
    with torch.no_grad():
        for ls, ps in zip(peft.handle.sites, handle.sites):
            assert ls.host_name == ps.host_name
            ps.delta.down.copy_(ls.delta.A[None])  # (1, r, in)
            ps.delta.up.copy_(ls.delta.B[None])  # (1, out, r)
        b = batch_for(arch)
        out = logits_of(peft, b)
        assert not torch.allclose(out, logits_of(BUILDERS[arch](), b), atol=1e-4)
        # rtol: LoRA projects sibling inputs in one matmul (deltas/siblings.py), a different summation order
        torch.testing.assert_close(logits_of(pa_model, b), out, rtol=1e-4, atol=1e-5)
        # and the linear bottleneck merges exactly like LoRA
        handle.merge()
        torch.testing.assert_close(logits_of(pa_model, b), out, rtol=0, atol=1e-5)


def test_sequential_adapter_with_zero_up_is_the_base():
    from unipeft import AdapterConfig

    model = BUILDERS["llama"]()
    ref = copy.deepcopy(model)
    peft = get_peft_model(model, AdapterConfig.houlsby(bottleneck_size=8))
    b = batch_for("llama")
    with torch.no_grad():
        torch.testing.assert_close(logits_of(peft, b), logits_of(ref, b), rtol=0, atol=1e-6)


def test_methods_are_presets_over_the_same_space():
    import unipeft

    model = BUILDERS["llama"]()
    rows = {}
    for name, info in unipeft.methods().items():
        cfg = info.factory()
        from unipeft.arch import find_arch

        arch = find_arch(model)
        ins = cfg.resolved(model, arch).insertions(model, arch)
        assert ins and all(isinstance(i, Insertion) for i in ins)
        rows[name] = [i.describe() for i in ins]
    assert rows["lora"] == ["LowRank @ AtLinear · parallel · add"]
    assert rows["houlsby"] == ["Bottleneck @ AtSublayer · sequential · add"] * 2
    assert rows["pfeiffer"] == ["Bottleneck @ AtSublayer · after_add_norm · add"]
    assert rows["scaled_parallel"] == ["Bottleneck @ AtSublayer · parallel · add(s=4)"]
    assert rows["ia3"] == ["Scaling @ AtLinear · parallel · multiply"]


def _last_block_pfeiffer(arch):
    from unipeft import AdapterConfig

    base = BUILDERS[arch]()
    last = base.config.num_hidden_layers - 1
    peft = get_peft_model(BUILDERS[arch](), AdapterConfig.pfeiffer(bottleneck_size=8, init="random",
                                                                   layers_to_transform=last))
    (site,) = peft.handle.sites
    return base, peft, site


def test_pfeiffer_reads_add_and_norm_output_in_post_norm_models():
    """BERT: the FFN's Add & Norm N(z), z = x + f(x), becomes N(z + Δ(N z)) (AdapterHub's seq_bn)."""
    base, peft, site = _last_block_pfeiffer("bert")
    norm = base.bert.encoder.layer[-1].output.LayerNorm
    seen = {}
    norm.register_forward_pre_hook(lambda m, a: seen.update(z=a[0]))
    b = batch_for("bert")
    with torch.no_grad():
        base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        z = seen["z"]
        want = norm(z + site.delta(norm(z)))
        got = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(want, norm(z), atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pfeiffer_in_pre_norm_models_reads_the_block_output():
    """Llama: no norm after the FFN residual, so the block output z becomes z + Δ(z)."""
    base, peft, site = _last_block_pfeiffer("llama")
    seen = {}
    base.model.layers[-1].register_forward_hook(lambda m, a, out: seen.update(z=out[0] if isinstance(out, tuple) else out))
    b = batch_for("llama")
    with torch.no_grad():
        base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        z = seen["z"]
        want = base.lm_head(base.model.norm(z + site.delta(z)))
        got = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_after_add_norm_where_the_residual_is_unreachable_says_so():
    from unipeft import AdapterConfig

    with pytest.raises(ValueError, match=r"after_add_norm.*not available.*position='ffn'"):
        get_peft_model(BUILDERS["llama"](), AdapterConfig(bottleneck_size=8, position="attn", form="after_add_norm"))

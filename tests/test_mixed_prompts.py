"""Mixed-adapter batches with the prompt family (issue 13): prompt tuning, P-tuning v1, prefix tuning, P-tuning v2
and MAM, alone, with adapters of other lengths, with LoRA/bottleneck rows and "__base__" rows in one batch. Each row
must equal its single-adapter run (the whole batch run on that adapter alone, so padding rules are the same) and
generate() must give each row the tokens it generates alone. Logits of prompt methods: `logits[:, Pmax:]` are the
real tokens, a row's P virtual tokens right before them, so a row alone's logits are the last columns of its row."""

from __future__ import annotations

import pytest
import torch
from conftest import BUILDERS, batch_for, logits_of
from matrix import config

import unipeft

FAMILY = ("prompt_tuning", "p_tuning_lstm", "p_tuning_mlp", "prefix", "prefix_proj", "p_tuning_v2", "mam")
SIZED = {"prompt_tuning", "p_tuning_lstm", "p_tuning_mlp", "prefix", "prefix_proj", "p_tuning_v2", "mam"}


@torch.no_grad()
def perturb(peft, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(peft.named_parameters(), key=lambda np: np[0]):
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def build(arch: str, methods: list[str]):
    """Adapter "default" of methods[0], then a0, a1, ... of the others; prompt lengths 4, 3, 5, 7, ..."""
    peft = unipeft.get_peft_model(BUILDERS[arch](), config(methods[0], arch, random=True))
    for i, m in enumerate(methods[1:]):
        kw = {"num_virtual_tokens": 3 + 2 * i} if m in SIZED else {}
        peft.add_adapter(f"a{i}", config(m, arch, random=True, **kw))
    for k, name in enumerate(reversed(list(peft.peft_config))):
        peft.set_adapter(name)
        perturb(peft, 11 + k)
    peft.set_adapter("default")
    return peft.eval()


def padded_batch(arch: str, rows: int):
    """Full rows, a right-padded row and (for every family) a left-padded one in one batch."""
    b = batch_for(arch, batch=rows)
    b["attention_mask"][1, -2:] = 0
    b["attention_mask"][rows - 2, :3] = 0
    return b


def assert_rows_equal_single_runs(peft, arch: str, names: list[str]) -> None:
    b = padded_batch(arch, len(names))
    with torch.no_grad():
        single = {}
        for n in dict.fromkeys(names):
            if n == "__base__":
                with peft.disable_adapter():
                    single[n] = logits_of(peft, b)
            else:
                peft.set_adapter(n)
                single[n] = logits_of(peft, b)
        peft.set_adapter("default")
        kw = {k: v for k, v in b.items() if k != "labels" or arch == "t5"}
        mixed = peft(**kw, adapter_names=names).logits
        for i, n in enumerate(names):
            want = single[n][i]
            got = mixed[i, -want.shape[0]:] if want.dim() == 2 else mixed[i]  # the row's own columns
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"row {i} ({n}): {m}")
        firsts = [single[n][0] if single[n].dim() == 2 else single[n][0, -1] for n in dict.fromkeys(names)]
        assert all(not torch.allclose(x, y, atol=1e-3) for x in firsts for y in firsts if x is not y), \
            "two adapters give the same outputs: the test would be vacuous"
        torch.testing.assert_close(logits_of(peft, b), single["default"], rtol=0, atol=1e-6)  # state restored


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
@pytest.mark.parametrize("method", FAMILY)
def test_prompt_family_rows_equal_single_runs(method, arch):
    """Two adapters of one method with different lengths (4 and 3 virtual tokens), a LoRA and base rows."""
    peft = build(arch, [method, method, "lora"])
    assert_rows_equal_single_runs(peft, arch, ["a0", "default", "__base__", "a1", "default", "a0"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "bert_tok", "t5"])
def test_every_kind_of_adapter_in_one_batch(arch):
    """Prompts, P-tuning, prefixes of three lengths, LoRA and a bottleneck adapter, each on its rows."""
    peft = build(arch, ["prompt_tuning", "prefix", "lora", "p_tuning_v2", "p_tuning_mlp", "houlsby"])
    assert_rows_equal_single_runs(peft, arch, ["a3", "default", "a0", "__base__", "a1", "a2", "a4", "a3"])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("masked", [False, True])
def test_generate_gives_each_row_its_own_tokens(arch, masked):
    peft = build(arch, ["prompt_tuning", "prefix", "lora", "p_tuning_v2", "p_tuning_mlp"])
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 96, (6, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[4, :1] = 0
    names = ["default", "a0", "a1", "a2", "a3", "__base__"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    extra = (lambda i: {"attention_mask": mask[i]}) if masked else (lambda i: {})
    with torch.no_grad():
        mixed = peft.generate(input_ids=ids, adapter_names=names, **extra(slice(None)), **kw)
        outs = set()
        for i, name in enumerate(names):
            ctx = peft.disable_adapter() if name == "__base__" else _using(peft, name)
            with ctx:
                want = peft.generate(input_ids=ids[i:i + 1], **extra(slice(i, i + 1)), **kw)
            assert torch.equal(mixed[i:i + 1], want), f"row {i} ({name}): {mixed[i].tolist()} vs {want[0].tolist()}"
            outs.add(tuple(want[0, -6:].tolist()))
        assert len(outs) > 2, "adapters generate the same tokens: the test would be vacuous"


class _using:
    def __init__(self, peft, name):
        self.peft, self.name = peft, name

    def __enter__(self):
        self.peft.set_adapter(self.name)

    def __exit__(self, *exc):
        self.peft.set_adapter("default")


def test_training_step_loss_and_gradients_per_group():
    """Labels in a mixed batch: the chunked loss (training mode, no full logits) equals the loss of the full logits,
    and each adapter's gradients come from its own rows only."""
    peft = build("llama", ["prompt_tuning", "prefix", "lora"])
    b = batch_for("llama", batch=4)
    names = ["default", "a0", "__base__", "default"]
    for n in peft.peft_config:
        for p in peft._handles[n].adapter_parameters().values():
            p.requires_grad_(True)
    peft.train()
    out = peft(**b, adapter_names=names)
    assert out.__dict__.get("_unipeft_no_logits"), "the mixed batch computed full logits in training"
    with torch.no_grad():
        full = peft(**b, adapter_names=names, skip_logits=False)
        P = full.logits.shape[1] - b["input_ids"].shape[1]  # the longest prompt: 4
        # the rows' own predictions: a prompt row predicts its first token from its last virtual one, a row
        # without a prompt (the prefix and base rows) does not predict its first token
        labels = torch.cat([torch.full((4, P), -100), b["labels"]], 1)
        labels[[1, 2], P] = -100
        ref = torch.nn.functional.cross_entropy(full.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, full.loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(full.loss, ref, rtol=0, atol=1e-5)
    out.loss.backward()
    for n in ("default", "a0"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft._handles[n].adapter_parameters().values())
    assert all(p.grad is None for p in peft._handles["a1"].adapter_parameters().values())


def test_cut_virtual_logits_and_refusals():
    peft = unipeft.get_peft_model(BUILDERS["llama"](), config("prompt_tuning", "llama", keep_virtual_logits=False))
    peft.add_adapter("b", config("prompt_tuning", "llama", num_virtual_tokens=6, keep_virtual_logits=False))
    peft.add_adapter("keep", config("prompt_tuning", "llama"))
    ids = batch_for("llama", batch=3)["input_ids"]
    with torch.no_grad():
        out = peft(input_ids=ids, adapter_names=["b", "default", "__base__"]).logits
        assert out.shape[1] == ids.shape[1]  # lined up with input_ids for every row
        peft.set_adapter("b")
        torch.testing.assert_close(out[0], peft(input_ids=ids).logits[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="keep_virtual_logits"):
        peft(input_ids=ids, adapter_names=["b", "keep", "default"])
    # a shifted prefix (forced: on RoBERTa classification the default resolves unshifted, as HF PEFT has no prefix
    # tuning there) beside rows numbered from padding_idx + 1
    rob = unipeft.get_peft_model(BUILDERS["roberta"](), config("prefix", "roberta", random=True, position_shift=True))
    rob.add_adapter("a0", config("lora", "roberta", random=True))
    rob.eval()
    with pytest.raises(ValueError, match="padding index"):
        rob(input_ids=ids, adapter_names=["default", "a0", "__base__"])


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_inputs_embeds_and_template_slots(arch):
    """Callers giving inputs_embeds get each row's prompts prepended to its embeddings; P-tuning templates (slots,
    ids < 0, where each row wants its prompts) are filled row by row with that row's adapter's prompts."""
    peft = build(arch, ["prompt_tuning", "prompt_tuning", "lora", "prefix"])
    names = ["a0", "default", "a1", "__base__"]
    b = batch_for(arch, batch=4)
    b["attention_mask"][1, -2:] = 0
    dec = {"decoder_input_ids": b["labels"]} if arch == "t5" else {}

    def compare(mixed, run):
        for i, n in enumerate(names):
            with (peft.disable_adapter() if n == "__base__" else _using(peft, n)), torch.no_grad():
                want = run(i)
            got = mixed[i, -want.shape[0]:] if want.dim() == 2 else mixed[i]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"row {i} ({n}): {m}")

    emb = peft.get_input_embeddings()(b["input_ids"]).detach()
    with torch.no_grad():
        mixed = peft(inputs_embeds=emb, attention_mask=b["attention_mask"], adapter_names=names, **dec).logits
    compare(mixed, lambda i: peft(inputs_embeds=emb, attention_mask=b["attention_mask"], **dec).logits[i])

    P = {"a0": 3, "default": 4}  # each row: 2 tokens, its slots, the rest, right-padded to one length
    ids = b["input_ids"]
    rows = [torch.cat([ids[i, :2], torch.full((P.get(n, 0),), -1), ids[i, 2:], torch.zeros(4 - P.get(n, 0),
                                                                                            dtype=ids.dtype)])
            for i, n in enumerate(names)]
    t = torch.stack(rows)
    m = torch.ones_like(t)
    for i, n in enumerate(names):
        m[i, t.shape[1] - (4 - P.get(n, 0)):] = 0
    with torch.no_grad():
        mixed = peft(input_ids=t, attention_mask=m, adapter_names=names, **dec).logits
    compare(mixed, lambda i: peft(input_ids=t[i:i + 1], attention_mask=m[i:i + 1],
                                  **{k: v[i:i + 1] for k, v in dec.items()}).logits[0])
    with pytest.raises(ValueError, match="virtual-token slots"):
        peft(input_ids=t, attention_mask=m, adapter_names=["default", "a0", "a1", "__base__"], **dec)


def test_prompt_layout_with_return_dict_false_is_refused():
    """Encoder rows with shorter prompts have their columns reordered by name; a tuple output cannot be, so refuse."""
    from conftest import tiny_bert

    torch.manual_seed(0)
    peft = unipeft.get_peft_model(tiny_bert(task="token-cls"), unipeft.PromptTuningConfig(task_type="TOKEN_CLS",
                                                                                         num_virtual_tokens=3),
                                  adapter_name="p")
    peft.add_adapter("q", unipeft.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=5))
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft.eval()(input_ids=ids, adapter_names=["p", "q"])  # the named output works
        with pytest.raises(ValueError, match="return_dict=True"):
            peft(input_ids=ids, adapter_names=["p", "q"], return_dict=False)


@pytest.mark.parametrize("left_padded", [False, True])
def test_multi_head_parallel_rows_in_a_mixed_batch_equal_their_single_adapter_runs(left_padded):
    """The added prefix term (MH PA) goes on its own rows' head outputs, beside a joined prefix, LoRA and base rows."""
    from conftest import tiny_llama

    torch.manual_seed(0)
    peft = unipeft.get_peft_model(tiny_llama(), unipeft.MultiHeadParallelConfig(task_type="CAUSAL_LM", bottleneck_size=4,
                                                                               init="random"), adapter_name="m")
    peft.add_adapter("p", unipeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    peft.add_adapter("l", unipeft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"],
                                             init_lora_weights=False))
    peft.eval()
    ids = torch.randint(3, 90, (5, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if left_padded:
        mask[1, :2] = 0
    names = ["m", "m", "p", "l", "__base__"]
    with torch.no_grad():
        mixed = peft(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for b, name in enumerate(names):
            if name == "__base__":
                with peft.disable_adapter():
                    alone = peft(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
            else:
                peft.set_adapter(name)
                alone = peft(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
            real = mask[b].bool()
            torch.testing.assert_close(mixed[b, -6:][real], alone[0, -6:][real], rtol=1e-5, atol=1e-5)
        peft.set_adapter("m")
        assert not torch.allclose(peft(input_ids=ids[:1]).logits, mixed[4:5, -6:], atol=1e-3)  # m is not the base

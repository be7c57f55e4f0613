"""Stacked low-rank deltas in mixed-adapter batches (unipeft.mixed_stack): each row equals its single-adapter run,
gradients equal the grouped path's, and the per-adapter LoRA deltas are really not called on stacked hosts."""

from __future__ import annotations

import contextlib

import pytest
import torch

import unipeft
from unipeft import mixed_batch as mb
from unipeft.deltas.low_rank import LowRankDelta
from tests.conftest import tiny_llama

IDS = torch.randint(3, 96, (6, 7), generator=torch.Generator().manual_seed(5))
NAMES = ["a", "__base__", "b", "c", "a", "b"]


def _lora(r, alpha, targets, **kw):
    return unipeft.LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=targets,
                              init_lora_weights=False, **kw)


def _model(with_ia3: bool = False):
    """Different ranks and alphas, rsLoRA, an adapter on k_proj only; optionally IA3 sharing k, v and down hosts."""
    torch.manual_seed(0)
    peft = unipeft.get_peft_model(tiny_llama(), _lora(4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]), adapter_name="a")
    peft.add_adapter("b", _lora(8, 4, ["q_proj", "v_proj", "up_proj", "down_proj"], use_rslora=True))
    peft.add_adapter("c", _lora(2, 16, ["k_proj"]))
    if with_ia3:
        peft.add_adapter("d", unipeft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]))
        with torch.no_grad():
            for p in peft._handles["d"].adapter_parameters().values():
                p.add_(0.3 * torch.randn(p.shape))
    return peft.eval()


def _single(peft, name, ids):
    if name == "__base__":
        with peft.disable_adapter():
            return peft(input_ids=ids).logits
    peft.set_adapter(name)
    return peft(input_ids=ids).logits


@contextlib.contextmanager
def _count_lora_calls():
    """Every use of a LoRA delta on a host ends in add_scaled (sites call the delta module, which adds through it)."""
    calls = []
    add = LowRankDelta.add_scaled
    LowRankDelta.add_scaled = lambda self, *a, **kw: calls.append(self) or add(self, *a, **kw)
    try:
        yield calls
    finally:
        LowRankDelta.add_scaled = add


@pytest.mark.parametrize("with_ia3", [False, True])
@torch.no_grad()
def test_stacked_rows_equal_single_adapter_runs(with_ia3):
    peft = _model(with_ia3)
    names = NAMES + (["d"] if with_ia3 else [])
    ids = torch.cat([IDS, IDS[:1]]) if with_ia3 else IDS
    with _count_lora_calls() as calls:
        mixed = peft(input_ids=ids, adapter_names=names).logits
    # hosts where only LoRA is active are stacked: no per-adapter LoRA call there; IA3's hosts stay grouped
    grouped = {id(s.delta) for n in "abc" for s in peft._handles[n].sites
               if with_ia3 and s.host_name.split(".")[-1] in ("k_proj", "v_proj", "down_proj")}
    assert {id(d) for d in calls} == grouped
    if with_ia3:
        assert grouped, "the IA3 adapter shares no host with LoRA: the fallback would be untested"
    singles = {n: _single(peft, n, ids) for n in dict.fromkeys(names)}
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], rtol=0, atol=1e-5)
    assert len({round(float(singles[n][0].sum()), 3) for n in singles}) == len(singles), "adapters coincide: vacuous"
    # the sites are told nothing after the batch: a plain forward uses them again
    peft.set_adapter("a")
    with _count_lora_calls() as calls:
        peft(input_ids=ids)
    assert len(calls) == 4 * 2


def test_stacked_gradients_equal_grouped_path(monkeypatch):
    def grads(peft):
        peft.train()
        for n in "abc":
            for p in peft._handles[n].adapter_parameters().values():
                p.requires_grad_(True)
                p.grad = None
        out = peft(input_ids=IDS, adapter_names=NAMES).logits
        (out.float() ** 2).mean().backward()
        return {(n, k): p.grad.clone() for n in "abc" for k, p in peft._handles[n].adapter_parameters().items()}

    peft = _model()
    with _count_lora_calls() as calls:
        stacked = grads(peft)
    assert not calls
    monkeypatch.setattr(mb, "stacked_low_rank", lambda *a: contextlib.nullcontext())
    grouped = grads(peft)
    assert stacked.keys() == grouped.keys() and len(stacked) == 2 * (4 + 4 + 1) * 2
    for k in grouped:
        assert grouped[k].abs().sum() > 0, k
        torch.testing.assert_close(stacked[k], grouped[k], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_stacks_follow_factor_changes_between_calls():
    """Stacks live for one call: a write that moves no version counter (.data, a fused optimizer kernel) is seen."""
    peft = _model()
    before = peft(input_ids=IDS, adapter_names=NAMES).logits
    again = peft(input_ids=IDS, adapter_names=NAMES).logits
    torch.testing.assert_close(again, before, rtol=0, atol=0)
    d = peft._handles["b"].sites[0].delta
    d.B.data.mul_(2.0)  # through .data: no _version bump
    after = peft(input_ids=IDS, adapter_names=NAMES).logits
    want = _single(peft, "b", IDS)
    torch.testing.assert_close(after[2], want[2], rtol=0, atol=1e-5)
    assert not torch.allclose(after[2], before[2], atol=1e-3)


@torch.no_grad()
def test_adapter_names_inside_disable_adapter_give_the_base_model():
    peft = _model()
    with peft.disable_adapter():
        base = peft(input_ids=IDS).logits
        mixed = peft(input_ids=IDS, adapter_names=NAMES).logits
    torch.testing.assert_close(mixed, base, rtol=0, atol=1e-6)


def test_adapter_names_with_gradient_checkpointing_is_refused():
    peft = _model().train()
    peft.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft(input_ids=IDS, adapter_names=NAMES)


@torch.no_grad()
def test_rows_gathered_per_host_when_a_group_gather_would_be_large(monkeypatch):
    """Large batches gather each host's rows at use instead of the whole group's at once: same answers."""
    from unipeft import mixed_stack

    peft = _model()
    once = peft(input_ids=IDS, adapter_names=NAMES).logits
    monkeypatch.setattr(mixed_stack, "_GATHER_ONCE_BYTES", 0)
    built = []
    build = mixed_stack.StackGroup._build
    monkeypatch.setattr(mixed_stack.StackGroup, "_build", lambda self, dt: built.append(b := build(self, dt)) or b)
    per_host = peft(input_ids=IDS, adapter_names=NAMES).logits
    assert built and not any(gathered for _, _, gathered in built)
    torch.testing.assert_close(per_host, once, rtol=0, atol=1e-6)
    for i, n in enumerate(NAMES):
        torch.testing.assert_close(per_host[i], _single(peft, n, IDS)[i], rtol=0, atol=1e-5)


@torch.no_grad()
def test_serving_adds_in_place_and_a_users_hook_sees_the_adapted_output_unchanged_after(monkeypatch):
    """Without grad the stacked delta goes into the linear's fresh output (no out-of-place baddbmm); a hook the user
    added after injection sees the adapted output, as in a single-adapter batch, and nobody changes it afterwards."""
    peft = _model()
    seen = []
    q = peft.get_base_model().model.layers[0].self_attn.q_proj
    handle = q.register_forward_hook(lambda m, a, o: seen.append((o, o.clone())))
    try:
        def no_copy(*a, **kw):
            raise AssertionError("out-of-place baddbmm used where the output was ours alone")
        with monkeypatch.context() as m:
            m.setattr(torch, "baddbmm", no_copy)
            mixed = peft(input_ids=IDS, adapter_names=NAMES).logits
        (held, at_hook), = seen
        assert torch.equal(held, at_hook), "the output a user's hook holds was changed after it saw it"
        for i, n in enumerate(NAMES):
            if n == "__base__":
                continue
            peft.set_adapter(n)
            seen.clear()
            single = peft(input_ids=IDS[i:i + 1]).logits
            torch.testing.assert_close(at_hook[i], seen[0][1][0], rtol=0, atol=1e-5)  # the hook saw the adapted h
            torch.testing.assert_close(mixed[i], single[0], rtol=0, atol=1e-5)
    finally:
        handle.remove()


@torch.no_grad()
def test_a_global_forward_hook_keeps_the_stacked_add_out_of_place():
    peft = _model()
    held = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: held.append((o, o.clone())) if isinstance(o, torch.Tensor) else None)
    try:
        peft(input_ids=IDS, adapter_names=NAMES)
    finally:
        handle.remove()
    assert held and all(torch.equal(o, c) for o, c in held), "a tensor a global hook holds was changed in place"

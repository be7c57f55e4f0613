"""One test per private internal of torch, transformers, bitsandbytes, accelerate and TRL that unipeft relies on
(unipeft/compat.py and unipeft/integrations/compat.py; the table in docs/design-notes.md). Each test is named
after the private thing, so a release that changes it fails here, by name, not in a user's run. A few tests
below the private ones check the public replacements that took the place of earlier private uses."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from unipeft import compat

FAMILIES = ["llama", "gpt2", "bert", "roberta", "t5", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]


def _attention_class(family: str) -> type:
    import importlib

    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    names = [n for n, c in vars(mod).items()
             if isinstance(c, type) and issubclass(c, nn.Module) and n.endswith("Attention") and c.__module__ == mod.__name__]
    assert names, f"no *Attention class in {mod.__name__}"
    # the class that computes attention: BertSelfAttention, T5Attention, LlamaAttention, GPT2Attention, ...
    plain = [n for n in names if n.endswith("SelfAttention") and "Layer" not in n] or sorted(names, key=len)
    return getattr(mod, plain[0])


# ------------------------------------------------------------------------------------------------------- torch


def test_torch_OptimizedModule__orig_mod():
    lin = nn.Linear(2, 2)
    wrapped = torch.compile(lin)  # wrapping compiles nothing until called
    assert compat.is_compiled(wrapped) and compat.compiled_original(wrapped) is lin
    assert not compat.is_compiled(lin) and compat.compiled_original(lin) is lin


def test_torch_Tensor__version():
    p = nn.Parameter(torch.zeros(3))
    v = compat.tensor_version(p)
    assert isinstance(v, int)
    with torch.no_grad():
        p.add_(1.0)  # what an optimizer step does
    assert compat.tensor_version(p) > v
    before = compat.tensor_version(p)
    _ = p * 2  # out-of-place use leaves it
    assert compat.tensor_version(p) == before


def test_torch__scaled_mm():
    # rowwise scales (m, 1) and (1, n), b column-major: (a·b) scaled per row and column, in the asked dtype
    a = torch.tensor([[1.0, 2.0] * 8, [0.5, -1.0] * 8]).to(torch.float8_e4m3fn)  # (2, 16)
    b = torch.arange(256.0).remainder(7).sub(3).view(16, 16).to(torch.float8_e4m3fn).t().contiguous().t()  # column-major
    sa, sb = torch.tensor([[2.0], [3.0]]), torch.arange(1.0, 17.0).view(1, 16)
    y = compat.scaled_mm(a, b, sa, sb, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (a.float() @ b.float()) * sa * sb, rtol=0, atol=0)  # scales on m and n, not k
    out = torch.empty(2, 16)
    compat.scaled_mm(a, b, sa, sb, out_dtype=torch.float32, out=out)
    torch.testing.assert_close(out, y, rtol=0, atol=0)


def test_torch__dynamo_maybe_mark_dynamic_and_mark_static():
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    f = torch.compile(lambda t: t.abs().amax(-1), backend=backend)
    # rows change freely; each width compiles once, and stays static after a width changed (no generic kernel)
    # (unmarked: 3 compiles, rows then width turning dynamic; all static: 8; all dynamic: 1)
    for shape in [(4, 16), (7, 16), (4, 32), (9, 32), (5, 64), (3, 64), (6, 128), (2, 128)]:
        x = torch.randn(shape)
        torch.testing.assert_close(f(compat.compile_rows_dynamic(x)), x.abs().amax(-1))
    assert len(compiles) == 4


def test_torch_Module__apply_is_what_every_conversion_calls():
    # keep_own_tensors_on_conversion: a module's own tensors stay, its children convert
    outer = nn.Linear(3, 3)
    outer.add_module("child", nn.Linear(3, 3))
    compat.keep_own_tensors_on_conversion(outer)
    model = nn.Sequential(outer, nn.Linear(3, 3))
    for convert, dtype in ((lambda m: m.double(), torch.float64), (lambda m: m.to(torch.float16), torch.float16),
                           (lambda m: m.half(), torch.float16), (lambda m: m.float(), torch.float32),
                           (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16)):
        convert(model)
        assert outer.weight.dtype == torch.float32 and outer.bias.dtype == torch.float32
        assert outer.child.weight.dtype == dtype and model[1].weight.dtype == dtype

    # ConvertsItself: the conversion reaches convert(fn) as a tensor -> tensor function
    class Probe(compat.ConvertsItself, nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []
            self.register_buffer("table", torch.zeros(2))

        def convert(self, fn):
            self.seen.append(fn(torch.zeros(1)).dtype)

    p = Probe()
    nn.Sequential(p).to(torch.float64).half()
    assert p.seen == [torch.float64, torch.float16] and p.table.dtype == torch.float32


def test_torch_Module__parameters():
    lin = nn.Linear(2, 2, bias=False)
    assert compat.own_parameter(lin, "weight") is lin.weight
    with pytest.raises(KeyError):
        compat.own_parameter(lin, "bias_that_is_not_there")


def test_torch_Module_forward_hook_dicts():
    """forward_hooks_off empties every forward hook dict of a module tree for the block, and puts the same dicts
    back (so the hooks' handles still remove them)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert set(compat._FORWARD_HOOK_DICTS) <= set(compat._HOOK_DICTS)
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, a: calls.append("pre")) for m in model.modules()]
    handles += [model[1][0].register_forward_hook(lambda mod, a, kw, out: calls.append("post_kw"), with_kwargs=True),
                model[0].register_forward_hook(lambda mod, a, out: calls.append("always"), always_call=True),
                model[0].register_forward_pre_hook(lambda mod, a, kw: calls.append("pre_kw"), with_kwargs=True)]
    x = torch.randn(1, 2)
    with compat.forward_hooks_off(model):
        assert not any(compat.has_forward_hooks(m) for m in model.modules())
        model(x)
    assert calls == []
    model(x)
    assert sorted(calls) == sorted(["pre"] * 4 + ["post_kw", "always", "pre_kw"])
    for h in handles:
        h.remove()
    calls.clear()
    model(x)
    assert calls == []


def test_deepspeed_Stage3_fp32_partitioned_groups_flat():
    """zero_fp32_partitions reads DeepSpeed ZeRO-3's `fp32_partitioned_groups_flat` (the engine-level behaviour is
    tested by tests/test_sharded.py's ZeRO resume across world sizes), and names DeepSpeed when it is gone."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    assert "self.fp32_partitioned_groups_flat" in inspect.getsource(DeepSpeedZeroOptimizer_Stage3)

    class Holder:
        fp32_partitioned_groups_flat = [torch.zeros(3)]

    assert compat.zero_fp32_partitions(Holder())[0] is Holder.fp32_partitioned_groups_flat[0]
    with pytest.raises(TypeError, match="DeepSpeed changed"):
        compat.zero_fp32_partitions(object())


def test_torch_Module_hook_dicts():
    m = nn.Module()
    assert all(isinstance(getattr(m, name), dict) for name in compat._HOOK_DICTS)
    assert all(hasattr(m, name) for name in compat._HOOK_FLAGS)
    old, new = nn.Linear(2, 2), nn.Linear(2, 2)
    assert not compat.has_forward_hooks(old)
    calls = []
    handles = [old.register_forward_pre_hook(lambda mod, a: calls.append("pre")),
               old.register_forward_pre_hook(lambda mod, a, kw: calls.append("pre_kw"), with_kwargs=True),
               old.register_forward_hook(lambda mod, a, out: calls.append("post")),
               old.register_forward_hook(lambda mod, a, kw, out: calls.append("post_kw"), with_kwargs=True),
               old.register_forward_hook(lambda mod, a, out: calls.append("always"), always_call=True),
               old.register_full_backward_pre_hook(lambda mod, g: calls.append("bw_pre")),
               old.register_full_backward_hook(lambda mod, gi, go: calls.append("bw"))]
    assert compat.has_forward_hooks(old)
    compat.move_hooks(old, new)
    new(torch.randn(1, 2, requires_grad=True)).sum().backward()
    assert sorted(calls) == sorted(["pre", "pre_kw", "post", "post_kw", "always", "bw_pre", "bw"])
    assert compat.has_forward_hooks(new)
    for h in handles:  # the old handles remove the hooks from the new module
        h.remove()
    calls.clear()
    new(torch.randn(1, 2, requires_grad=True)).sum().backward()
    assert calls == [] and not compat.has_forward_hooks(new)


def test_torch_Module__forward_hooks_order_and__global_forward_hooks():
    m = nn.Linear(2, 2)
    first = m.register_forward_hook(lambda *a: None)
    second = m.register_forward_hook(lambda *a: None)
    assert compat.runs_first_after_forward(m, first.id) and not compat.runs_first_after_forward(m, second.id)
    front = m.register_forward_hook(lambda *a: None, prepend=True)
    assert compat.runs_first_after_forward(m, front.id) and not compat.runs_first_after_forward(m, first.id)
    g = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not compat.runs_first_after_forward(m, front.id)  # a global hook sees every output first
    finally:
        g.remove()
    assert compat.runs_first_after_forward(m, front.id)


# ------------------------------------------------------------------------------------------------ transformers


def test_transformers_PretrainedConfig__attn_implementation():
    model = tiny_llama(0, attn_implementation="eager")
    assert compat.attn_implementation(model.config) == "eager"
    model.set_attn_implementation("sdpa")  # the public setter is visible through the private getter
    assert compat.attn_implementation(model.config) == "sdpa"
    compat.set_config_attn_implementation(model.config, "eager")
    assert compat.attn_implementation(model.config) == "eager"
    assert model.model.layers[0].self_attn.config is model.config  # attention reads the config it was built with


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_eager_attention_forward_in_each_modeling_file(family):
    cls = _attention_class(family)
    fn = compat.eager_attention_of(cls.__new__(cls))
    assert callable(fn) and fn.__name__ == "eager_attention_forward"
    params = list(inspect.signature(fn).parameters)
    assert params[:5] == ["module", "query", "key", "value", "attention_mask"], params


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_attention_forward_source_names_ALL_ATTENTION_FUNCTIONS(family):
    assert compat.calls_attention_interface(_attention_class(family))

    class OwnAttention(nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.T, -1) @ x

    assert not compat.calls_attention_interface(OwnAttention)


def test_transformers_GradientCheckpointingLayer__gradient_checkpointing_func():
    from torch.utils.checkpoint import checkpoint

    model = tiny_llama(0)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = []

    def spy(function, *args, **kwargs):
        calls.append(function)
        return checkpoint(function, *args, use_reentrant=False, **kwargs)

    compat.set_checkpoint_function(model, spy)
    ids = torch.tensor([[1, 5, 7, 9]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == model.config.num_hidden_layers


def test_transformers_PreTrainedModel__from_config():
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = tiny_llama(0).config
    for cls in (LlamaForCausalLM, AutoModelForCausalLM):  # a concrete class (private), an Auto class (public)
        model = compat.model_from_config(cls, cfg, torch.bfloat16)
        assert isinstance(model, LlamaForCausalLM)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.config.dtype == torch.bfloat16
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # transformers keeps RoPE tables in fp32


# ------------------------------------------------------------------------------------------------ bitsandbytes


def test_bitsandbytes__convert_weight_packed_for_cpu_inverse():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from unipeft.quant import dequantize_weight, quantized_linear

    torch.manual_seed(0)
    W = torch.randn(64, 64) * 0.05
    # bf16 without double quantization: the one setting where bitsandbytes' inverse is exact (it requantizes a
    # nested absmax and rounds fp32 statistics: "best-effort")
    q = quantized_linear(W, None, "nf4", torch.bfloat16, device="cpu", double_quant=False)
    portable = dequantize_weight(q).clone()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
    # what a CPU eval forward does when bitsandbytes picks its AVX512-BF16 kernel
    q.weight.data, q.weight.quant_state = _convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(dequantize_weight(q), portable, rtol=0, atol=0)
    assert not q.weight.quant_state.packing_format_for_cpu  # weight and state unpacked together
    with torch.no_grad():
        torch.testing.assert_close(q(x), y, rtol=0, atol=0)  # the module still computes the same


# ----------------------------------------------------------------- transformers / accelerate / TRL PEFT predicates
# unipeft/integrations/compat.py extends their "is this a PEFT model?" checks; these are the names it touches.


def test_transformers_trainer_utils__is_peft_model():
    import transformers.trainer
    import transformers.trainer_utils

    assert callable(transformers.trainer_utils._is_peft_model)
    assert "_is_peft_model" in vars(transformers.trainer)  # bound by name there: compat rebinds it
    from transformers.integrations import neftune

    assert "_is_peft_model" in vars(neftune)


def test_transformers_trainer_globals_PeftModel_and_is_peft_available_in_Trainer__save():
    import transformers.trainer
    from transformers import Trainer

    assert "is_peft_available" in vars(transformers.trainer)
    src = inspect.getsource(Trainer._save)
    assert "(PreTrainedModel,) if not is_peft_available() else (PreTrainedModel, PeftModel)" in src


def test_transformers_Trainer__load_from_checkpoint_and__load_best_model_call_load_adapter():
    from transformers import Trainer

    assert "model.load_adapter(resume_from_checkpoint, active_adapter, is_trainable=True)" in inspect.getsource(
        Trainer._load_from_checkpoint)
    assert "model.load_adapter(self.state.best_model_checkpoint, active_adapter)" in inspect.getsource(
        Trainer._load_best_model)


def test_accelerate_utils_modeling_is_peft_model_bound_by_name():
    import accelerate.utils
    import accelerate.utils.modeling

    assert callable(accelerate.utils.modeling.is_peft_model)
    assert accelerate.utils.is_peft_model is accelerate.utils.modeling.is_peft_model or \
        getattr(accelerate.utils.is_peft_model, "_unipeft_extends", None) is not None


def test_trl_trainers_global_BaseTunerLayer_read_after_is_peft_model():
    pytest.importorskip("trl")
    import trl.trainer.sft_trainer as sft

    assert "is_peft_model" in vars(sft)
    src = inspect.getsource(sft)
    assert "is_peft_model(model) and isinstance(model.get_output_embeddings(), BaseTunerLayer)" in src


# ------------------------------------------------------------------------- public replacements of private uses


def test_params_on_meta_is_scoped_to_its_thread():
    """quant.build.params_on_meta replaced a global monkeypatch of nn.Module.register_parameter by torch's public
    parameter-registration hook, acting only in the thread inside the scope."""
    from unipeft.quant.build import params_on_meta

    inside, release, seen = threading.Event(), threading.Event(), {}

    def builder():
        with params_on_meta():
            seen["meta"] = nn.Linear(2, 2)
            buf = nn.Module()
            buf.register_buffer("t", torch.ones(2))
            seen["buffer"] = buf
            inside.set()
            release.wait(60)
            seen["nested"] = nn.Linear(2, 2)

    t = threading.Thread(target=builder)
    t.start()
    assert inside.wait(60)
    seen["other"] = nn.Linear(2, 2)  # another thread, while the builder is inside its scope
    release.set()
    t.join(60)
    assert seen["meta"].weight.is_meta and seen["meta"].bias.is_meta and seen["nested"].weight.is_meta
    assert not seen["buffer"].t.is_meta and not seen["other"].weight.is_meta
    assert not nn.Linear(2, 2).weight.is_meta  # and nothing stays installed after the scope
    from torch.nn.modules import module as M

    assert nn.Module.register_parameter is M.Module.register_parameter
    assert inspect.getsourcefile(nn.Module.register_parameter) == inspect.getsourcefile(M)


def test_quantized_linears_built_through_public_bitsandbytes_calls():
    """nf4 through Params4bit.to(device) and int8 through functional.int8_vectorwise_quant (both were the private
    `_quantize`): the stored codes match the papers' formulas."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from unipeft.quant import dequantize_weight, quantized_linear

    torch.manual_seed(0)
    W = torch.randn(64, 128) * 0.05
    q8 = quantized_linear(W, torch.zeros(64), "int8", torch.float32)
    absmax = W.half().float().abs().amax(1)
    torch.testing.assert_close(q8.weight.SCB.float(), absmax, rtol=0, atol=1e-6)
    torch.testing.assert_close(q8.weight.data.float(), torch.round(W.half().float() * 127 / absmax[:, None]),
                               rtol=0, atol=1)  # round-half differences at most one code
    assert q8.weight.dtype == torch.int8 and q8.weight.CB.data_ptr() == q8.weight.data_ptr()
    torch.testing.assert_close(dequantize_weight(q8), W, rtol=0, atol=float(absmax.max()) / 127)
    q4 = quantized_linear(W, None, "nf4", torch.float32)
    assert q4.weight.bnb_quantized and q4.weight.dtype == torch.uint8 and q4.weight.quant_state is not None
    ref, state = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4",
                                              quant_storage=torch.uint8)
    assert torch.equal(q4.weight.data, ref)
    torch.testing.assert_close(dequantize_weight(q4), bnb.functional.dequantize_4bit(ref, state), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefix_seam_switched_through_set_attn_implementation(impl, monkeypatch):
    """Prefix methods switch the model's attention to their seam through the public set_attn_implementation and
    back on unload; the private setter (compat) is left for configs no PreTrainedModel owns."""
    from transformers import PreTrainedModel

    from unipeft import PrefixTuningConfig, get_peft_model

    public, private = [], []
    real = PreTrainedModel.set_attn_implementation
    monkeypatch.setattr(PreTrainedModel, "set_attn_implementation",
                        lambda self, name, **kw: (public.append(name), real(self, name, **kw))[1])
    import unipeft.positions.attention_kv as kv

    monkeypatch.setattr(kv, "set_config_attn_implementation", lambda c, name: private.append(name))
    model = tiny_llama(0, attn_implementation=impl)
    peft = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert compat.attn_implementation(model.config) == f"unipeft_prefix_{impl}"
    assert peft.unload() is model and compat.attn_implementation(model.config) == impl
    assert public == [f"unipeft_prefix_{impl}", impl] and private == []

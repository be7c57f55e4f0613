"""Sharded engines on CPU (gloo): FSDP2 (`fully_shard` per decoder block + root) and DeepSpeed ZeRO-3 through
Accelerate give the adapter one process gives, and save it whole (gathered on every rank, written by rank 0).

Each engine runs once for all methods in `torchrun --nproc_per_node 2` (tests/sharded_worker.py); the oracle is
the same training on one process with the same global batches (sharded_worker.train)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sharded_worker as W
from unipeft import PeftModel

HERE = Path(__file__).resolve().parent
METHODS = ["lora", "houlsby", "prefix", "prompt"]
# methods whose saved table (HF's prompt_embeddings) a network computes from the parameters
DERIVED = ["prefix_mlp", "ptuning_mlp", "ptuning_lstm"]
# tables made by a network: the above, and the MH parallel adapter (its MLP-made prefix; only the MLP's own
# parameters are saved, it has no HF PEFT counterpart)
MLP_MADE = DERIVED + ["mh_parallel"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine: str, out: Path, methods: list[str], nproc: int = 2, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
           str(HERE / "sharded_worker.py"), engine, str(out), *methods]
    src = str(HERE.parent / "src")
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
         **(env or {})}
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{engine} run failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


def reference(method: str, out: Path) -> Path:
    """The one-process run of the same training, saved."""
    peft = W.model(method)
    W.train(peft)
    peft.save_pretrained(out / method)
    return out / method


def assert_same_adapter(got: Path, want: Path, rtol: float = 1e-5) -> None:
    a, b = load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].shape == b[k].shape and a[k].numel() > 0, (k, a[k].shape, b[k].shape)
        err = (a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)
        assert err <= rtol, f"{k}: relative error {err:.2e}"



def assert_trained(folder: Path, method: str) -> None:
    """Training moved every tensor (so equal adapters mean equal training, not two untouched inits)."""
    init, b = W.model(method).adapter_state_dict(), load_file(folder / "adapter_model.safetensors")
    still = [k for k in b if torch.equal(b[k], init[k])]
    assert not still, f"untrained tensors: {still[:3]}"


def logits_of(folder: Path) -> torch.Tensor:
    peft = PeftModel.from_pretrained(W.tiny_llama(seed=0), folder)
    with torch.no_grad():
        return peft(input_ids=W.EVAL_IDS).logits


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    launch("fsdp2", out, METHODS + ["lora@bf16", "lora@nf4"])
    return out


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_trains_and_saves_the_one_process_adapter(fsdp2_run, tmp_path, method):
    want = reference(method, tmp_path)
    assert_trained(want, method)
    assert_same_adapter(fsdp2_run / method, want)
    torch.testing.assert_close(logits_of(fsdp2_run / method), logits_of(want), rtol=1e-5, atol=1e-5)
    assert_same_adapter(fsdp2_run / "reloaded" / method, want)  # load_adapter_weights into sharded parameters


def test_fsdp2_fp32_adapter_on_a_bf16_base(fsdp2_run, tmp_path):
    """fully_shard takes one unit holding frozen bf16 base weights and trainable fp32 adapter weights, with no
    MixedPrecisionPolicy (FSDP2 wants one dtype among the *trainable* parameters only). The adapter stays fp32 and
    matches one process to bf16 precision (the two runs split the bf16 matmuls differently)."""
    assert_same_updates(fsdp2_run, tmp_path, "lora@bf16")


def assert_same_updates(run: Path, tmp_path: Path, method: str) -> None:
    """fp32 adapter, training updates equal to one process's at bf16 precision (2% in norm)."""
    want = reference(method, tmp_path)
    got = load_file(run / method / "adapter_model.safetensors")
    ref, init = load_file(want / "adapter_model.safetensors"), W.model(method).adapter_state_dict()
    assert sorted(got) == sorted(ref)
    assert all(got[k].dtype == torch.float32 and got[k].shape == ref[k].shape for k in ref)
    d_got = torch.cat([(got[k] - init[k]).flatten() for k in ref])  # the training updates
    d_ref = torch.cat([(ref[k] - init[k]).flatten() for k in ref])
    assert d_ref.norm() > 0 and (d_got - d_ref).norm() <= 2e-2 * d_ref.norm()


def test_fsdp2_qlora_nf4_base(fsdp2_run, tmp_path):
    """QLoRA under FSDP2 (NF4 linears sharded with their uint8 storage; bitsandbytes re-attaches the quant state
    after each all-gather): the one-process adapter."""
    assert_same_updates(fsdp2_run, tmp_path, "lora@nf4")  # NF4 computes in bf16


def test_fsdp2_refuses_int8_and_cpu_repacking_nf4_bases():
    from unipeft.distributed import check_quantized_for_fsdp2
    from unipeft.quant import quantize_model

    with pytest.raises(ValueError, match=r"int8 \(LLM.int8\).*SCB"):
        check_quantized_for_fsdp2(quantize_model(W.tiny_llama(seed=0), "int8"))
    nf4 = quantize_model(W.tiny_llama(seed=0), "nf4")
    check_quantized_for_fsdp2(nf4)  # unipeft's NF4 layers keep one layout: accepted
    nf4.model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu = True
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is an NF4 linear .*in place"):
        check_quantized_for_fsdp2(nf4)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    launch("zero3", out, METHODS + MLP_MADE, env={"DS_ACCELERATOR": "cpu"})
    return out


@pytest.mark.parametrize("method", METHODS + MLP_MADE)
def test_zero3_through_accelerate_trains_and_saves_the_one_process_adapter(zero3_run, tmp_path, method):
    """ZeRO-3 partitions every parameter (an adapter tensor reads as empty outside a forward); the file holds full
    tensors of the right shapes, equal to one process's training, and loads with the same logits."""
    sizes = json.loads((zero3_run / method / "partitioned.json").read_text())
    assert sizes and all(n == 0 and math.prod(shape) > 0 for n, shape in sizes.values()), sizes
    # every delta is reached through a module call, so ZeRO-3's module hooks (registered on it) gather what it uses
    calls = json.loads((zero3_run / method / "calls.json").read_text())
    assert calls and all(n >= W.STEPS and hooks >= 1 for n, hooks in calls.values()), calls
    want = reference(method, tmp_path)
    assert_same_adapter(zero3_run / method, want)
    torch.testing.assert_close(logits_of(zero3_run / method), logits_of(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS + MLP_MADE)
def test_zero3_trainer_style_save_with_a_gathered_state_dict(zero3_run, tmp_path, method):
    """transformers.Trainer.save_model under ZeRO-3: the engine consolidates the trainable parameters on rank 0,
    which alone calls save_pretrained(dir, state_dict=...). Tables a network derives from them (prefix MLP, P-tuning
    MLP/LSTM, MH parallel adapter) are computed from those values with the engine's module hooks off (no gather on
    rank 0 alone): the file equals the one-process save."""
    want = reference(method, tmp_path)
    got = zero3_run / "state_dict" / method
    assert_same_adapter(got, want)
    if method in DERIVED:
        assert "prompt_embeddings" in load_file(got / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def zero3_reload(zero3_run):
    """A second torchrun (fresh processes, one engine per method): zero3_run's adapters loaded into fresh
    ZeRO-3-partitioned models on every rank, saved again, and run forward."""
    launch("zero3_reload", zero3_run, METHODS + MLP_MADE, env={"DS_ACCELERATOR": "cpu"})
    return zero3_run / "reloaded"


@pytest.mark.parametrize("method", METHODS + MLP_MADE)
def test_zero3_reload_into_a_fresh_partitioned_model(zero3_reload, tmp_path, method):
    """assign_full's ZeRO-3 branch (gather, write on rank 0, re-partition): the reloaded model saves the adapter
    it was given and computes one process's logits."""
    want = reference(method, tmp_path)
    assert_same_adapter(zero3_reload / method, want)
    torch.testing.assert_close(torch.load(zero3_reload / method / "logits.pt"), logits_of(want), rtol=1e-5, atol=1e-5)


# (ZeRO stage, processes that save, processes that resume)
ZERO_RESUMES = [(3, 2, 1), (3, 1, 2)]


def test_zero2_name_keyed_optimizer_state_is_refused_on_load(tmp_path):
    """ZeRO-2: the state is saved by name, but loading it is refused, naming the stage and what to use."""
    launch("zero_resume", tmp_path, ["first", "2", "lora"], nproc=2, env={"DS_ACCELERATOR": "cpu"})
    launch("zero_resume", tmp_path, ["second", "2", "lora"], nproc=1, env={"DS_ACCELERATOR": "cpu"})
    msg = (tmp_path / "refused.txt").read_text()
    assert "ZeRO stage 1/2" in msg and "same number of processes" in msg and "Use ZeRO-3" in msg, msg


@pytest.mark.parametrize("stage,saved_on,resumed_on", ZERO_RESUMES)
def test_zero_checkpoint_resumes_on_another_number_of_processes(tmp_path, stage, saved_on, resumed_on):
    """DeepSpeed ZeRO with AdamW: after 2 steps the trainable tensors and the optimizer state, gathered by name
    (unipeft.distributed.zero_optimizer_state), are saved on `saved_on` processes; fresh processes (another
    torchrun, `resumed_on` of them) load them (load_zero_optimizer_state: each keeps its partition) and train
    2 more steps. The adapter is the one-process AdamW run's over 4 steps; resuming without the optimizer state
    would not be (checked, so the tolerance can tell the two apart)."""
    launch("zero_resume", tmp_path, ["first", str(stage), "lora"], nproc=saved_on, env={"DS_ACCELERATOR": "cpu"})
    launch("zero_resume", tmp_path, ["second", str(stage), "lora"], nproc=resumed_on, env={"DS_ACCELERATOR": "cpu"})
    peft = W.model("lora")
    W.train_adam(peft)
    peft.save_pretrained(tmp_path / "want")
    assert_same_adapter(tmp_path / "resumed_lora", tmp_path / "want", rtol=1e-4)  # Adam: ±lr steps on tiny gradients

    fresh_optimizer = W.model("lora")  # negative control: the same 4 steps with a new AdamW after step 2
    params = [p for p in fresh_optimizer.parameters() if p.requires_grad]
    steps = list(W.batches(steps=W.RESUME_STEPS))
    for part in (steps[:W.RESUME_AT], steps[W.RESUME_AT:]):
        opt = torch.optim.AdamW(params, lr=W.ADAM_LR)
        for ids in part:
            fresh_optimizer(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    fresh_optimizer.save_pretrained(tmp_path / "no_state")
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_adapter(tmp_path / "no_state", tmp_path / "want", rtol=1e-2)


def test_zero_optimizer_state_refuses_a_non_zero_optimizer():
    """A plain torch optimizer (no DeepSpeed engine prepared it) is refused, naming what to pass."""
    from unipeft.distributed import load_zero_optimizer_state

    with pytest.raises(TypeError, match="not .*a DeepSpeed ZeRO optimizer"):
        load_zero_optimizer_state([("a", torch.nn.Parameter(torch.ones(1)))], torch.optim.SGD([torch.ones(1)], lr=1),
                                  {"state": {}, "master": {}, "param_groups": []})


TRAINER_METHODS = ["lora", "prefix_mlp"]


@pytest.fixture(scope="module")
def trainer_ddp_run(tmp_path_factory):
    """transformers.Trainer under DDP (torchrun, 2 gloo processes): tests/trainer_worker.py."""
    out = tmp_path_factory.mktemp("trainer_ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(HERE / "trainer_worker.py"), str(out), *TRAINER_METHODS]
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
         "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"Trainer DDP run failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return out


@pytest.mark.parametrize("method", TRAINER_METHODS)
def test_trainer_ddp_checkpoints_final_save_and_resume(trainer_ddp_run, method):
    """Trainer on 2 processes: every checkpoint is adapter-only with complete tensors (the one-process model's
    keys and shapes), trained; the final save_model loads on one process with the trained model's logits; and
    resume_from_checkpoint (checkpoint-2, optimizer and scheduler included) ends where the uninterrupted run ends."""
    import json

    home = trainer_ddp_run / method
    init = W.model(method).adapter_state_dict()
    state = json.loads((home / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert len(list((home / "full" / "checkpoint-2").glob("rng_state_*.pth"))) == 2  # it ran on 2 processes
    for folder in [home / "full" / "checkpoint-2", home / "full" / "checkpoint-4", home / "final"]:
        names = {p.name for p in folder.iterdir()}
        assert "adapter_model.safetensors" in names and not names & {"model.safetensors", "pytorch_model.bin"}, names
        got = load_file(folder / "adapter_model.safetensors")
        assert sorted(got) == sorted(init) and all(got[k].shape == init[k].shape for k in init)
        assert not [k for k in init if torch.equal(got[k], init[k])], f"{folder.name}: untrained tensors"
    assert_same_adapter(home / "final", home / "full" / "checkpoint-4", rtol=0)
    torch.testing.assert_close(logits_of(home / "final"), torch.load(home / "logits.pt"), rtol=1e-5, atol=1e-5)
    assert_same_adapter(home / "resumed_final", home / "final")


def test_save_pretrained_writes_on_the_main_process_only(tmp_path):
    peft = W.model("lora")
    peft.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    peft.save_pretrained(tmp_path / "main", is_main_process=True)
    assert (tmp_path / "main" / "adapter_model.safetensors").is_file()


def test_save_pretrained_takes_values_from_a_gathered_state_dict(tmp_path):
    """What transformers.Trainer passes under ZeRO-3 (rank 0 only, so no collective may run): the file holds the
    state dict's values, derived tensors (an MLP-made prefix table) computed from them."""
    from unipeft import PrefixTuningConfig, get_peft_model

    peft = get_peft_model(W.tiny_llama(seed=0), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                   prefix_projection=True, encoder_hidden_size=8))
    sd = {k: v.clone() for k, v in peft.state_dict().items()}
    emb = next(k for k in sd if k.endswith("prefix.default.embedding"))
    sd[emb] += 1.0
    peft.save_pretrained(tmp_path, state_dict=sd)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    own = next(k for k in saved if k.endswith(".embedding"))
    torch.testing.assert_close(saved[own], sd[emb])
    delta = next(m for n, m in peft.named_modules() if n.endswith("prefix.default"))
    with torch.no_grad():
        want = delta.transform(sd[emb])
    torch.testing.assert_close(saved["prompt_embeddings"], want)
    assert not torch.equal(saved["prompt_embeddings"], peft.adapter_state_dict()["prompt_embeddings"])
    with pytest.raises(KeyError, match="state_dict lacks"):
        peft.save_pretrained(tmp_path / "partial", state_dict={})


@pytest.mark.parametrize("method", DERIVED)
def test_state_dict_save_computes_derived_tables_from_its_values_without_module_hooks(tmp_path, method):
    """One process, every derived-table method: the file written from a state dict equals what the model saves
    after loading that state dict (the independent route); the network making the table runs without its module
    hooks (an engine's would gather, here one that raises), and the hooks are back afterwards."""
    peft = W.model(method)
    sd = {k: v + 0.01 * torch.randn_like(v) for k, v in peft.state_dict().items() if v.is_floating_point()}
    derived_net = next(m for n, m in peft.named_modules() if n.endswith(("transform.0", "mlp.0")))

    def engine_hook(module, args):
        raise RuntimeError("an engine hook ran")

    handle = derived_net.register_forward_pre_hook(engine_hook)
    peft.save_pretrained(tmp_path / "sd", state_dict=sd)
    with pytest.raises(RuntimeError, match="an engine hook ran"):
        peft.save_pretrained(tmp_path / "own")  # no state_dict: the module runs as usual, hooks included
    handle.remove()
    got = load_file(tmp_path / "sd" / "adapter_model.safetensors")
    peft.load_state_dict(sd, strict=False)
    want = peft.adapter_state_dict()
    assert sorted(got) == sorted(want) and "prompt_embeddings" in got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_default_main_process_is_the_first_of_each_node(monkeypatch):
    """Not global rank 0 only: Trainer(save_on_each_node=True) saves from local rank 0 of every node."""
    from unipeft.distributed import is_main_process

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_main_process()
    monkeypatch.delenv("LOCAL_RANK")
    assert is_main_process()  # one process, no torch.distributed

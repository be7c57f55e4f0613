"""One training run of a tiny Llama with an adapter, on one process or under a sharded engine; used by
tests/test_sharded.py (`torchrun --nproc_per_node 2 tests/sharded_worker.py ENGINE OUT METHOD...`).

Every run sees the same global batches (4 rows per step, seed-fixed); under an engine each rank takes its 2
rows, so the mean loss over ranks is the one-process loss and the final adapter must be the same (SGD, dropout 0).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_llama  # noqa: E402

STEPS, ROWS, T, LR = 3, 4, 8, 0.5
EVAL_IDS = torch.arange(2 * T).reshape(2, T) % 90 + 3


def config(method: str):
    from unipeft import (AdapterConfig, LoraConfig, MultiHeadParallelConfig, PrefixTuningConfig, PromptEncoderConfig,
                         PromptTuningConfig)

    return {
        "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "houlsby": lambda: AdapterConfig.houlsby(task_type="CAUSAL_LM", bottleneck_size=8),
        "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        # saved tensors derived by a network from the parameters (HF's prompt_embeddings)
        "prefix_mlp": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                                 encoder_hidden_size=8),
        "ptuning_mlp": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8),
        "ptuning_lstm": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8,
                                                    encoder_reparameterization_type="LSTM"),
        "mh_parallel": lambda: MultiHeadParallelConfig(task_type="CAUSAL_LM", bottleneck_size=4, encoder_hidden_size=8,
                                                       init="random"),
    }[method]()


def model(method: str):
    """`method`, or `method@bf16` (a bfloat16 base; the adapter stays fp32), or `method@nf4` (QLoRA)."""
    from unipeft import get_peft_model

    from unipeft.quant import quantize_model

    method, _, base_kind = method.partition("@")
    base = tiny_llama(seed=0)
    if base_kind == "nf4":  # QLoRA: NF4 linears in the blocks, fp32 compute
        base = quantize_model(base, "nf4")
    elif base_kind:
        base = base.to({"bf16": torch.bfloat16}[base_kind])
    return get_peft_model(base, config(method))


def batches(rank: int = 0, world: int = 1, steps: int = STEPS):
    g = torch.Generator().manual_seed(1234)
    per = ROWS // world
    for _ in range(steps):
        ids = torch.randint(3, 90, (ROWS, T), generator=g)
        yield ids[rank * per:(rank + 1) * per]


RESUME_STEPS, RESUME_AT, ADAM_LR = 4, 2, 0.02


def train_adam(peft):
    """The one-process oracle of run_zero_resume: torch AdamW, RESUME_STEPS steps of the same global batches."""
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=ADAM_LR)
    for ids in batches(steps=RESUME_STEPS):
        peft(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def train(peft, rank: int = 0, world: int = 1, step=None):
    """SGD on the trainable parameters; `step(loss)` does the backward and update when an engine owns them."""
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=LR)
    for ids in batches(rank, world):
        loss = peft(input_ids=ids, labels=ids).loss
        if step is None:
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            step(loss)
    return opt


def shard_fsdp2(peft):
    """fully_shard each decoder block, then the root (unipeft.distributed.shard_fsdp2)."""
    from torch.distributed.device_mesh import init_device_mesh

    from unipeft.distributed import shard_fsdp2

    return shard_fsdp2(peft, mesh=init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),)))


def run_fsdp2(out: str, methods: list[str]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for method in methods:
        peft = shard_fsdp2(model(method))
        train(peft, rank, world)
        peft.save_pretrained(os.path.join(out, method))  # every rank: gathers; rank 0 writes
        dist.barrier()
        # the file back into a fresh sharded model (every rank keeps its shard), saved again: the same adapter
        from safetensors.torch import load_file

        fresh = shard_fsdp2(model(method))
        fresh.load_adapter_weights(load_file(os.path.join(out, method, "adapter_model.safetensors")))
        fresh.save_pretrained(os.path.join(out, "reloaded", method))
    dist.barrier()
    dist.destroy_process_group()


def count_delta_calls(model) -> dict:
    """delta module name -> [calls so far, forward pre-hooks on it besides ours (the engine's)]."""
    from unipeft.deltas.base import DeltaModule

    calls = {}
    for name, m in model.named_modules():
        if isinstance(m, DeltaModule):
            calls[name] = [0, len(m._forward_pre_hooks)]
            m.register_forward_pre_hook(lambda mod, args, kwargs, n=name: calls[n].__setitem__(0, calls[n][0] + 1),
                                        with_kwargs=True)
    return calls


def zero3_accelerator(stage: int = 3):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    cfg = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, "train_micro_batch_size_per_gpu": ROWS // int(os.environ["WORLD_SIZE"]),
           "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "bf16": {"enabled": False}}
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))


def run_zero(out: str, methods: list[str], stage: int = 3) -> None:
    """DeepSpeed ZeRO through Accelerate, fp32 (DS_ACCELERATOR=cpu on a machine without GPU)."""
    acc = zero3_accelerator(stage)
    # torch.distributed's view: Accelerate reports num_processes=1 for a DeepSpeed launch on CPU, yet ZeRO's
    # collectives span every rank, so each rank must take its own rows for the data-parallel comparison to mean anything
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == int(os.environ["WORLD_SIZE"]) > 1, world
    for method in methods:
        acc.deepspeed_engine_wrapped = None  # accelerator.backward() drives the engine prepared first: this one
        peft = model(method)
        opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=LR)
        engine, opt = acc.prepare(peft, opt)
        if rank == 0:  # evidence that ZeRO-3 partitioned the adapter: each tensor reads as empty between forwards
            sizes = {n: [p.numel(), list(getattr(p, "ds_shape", p.shape))] for n, p in engine.module.named_parameters()
                     if p.requires_grad}
            os.makedirs(os.path.join(out, method), exist_ok=True)
            with open(os.path.join(out, method, "partitioned.json"), "w") as f:
                json.dump(sizes, f)

        calls = count_delta_calls(engine.module)

        def step(loss):
            acc.backward(loss)
            opt.step()
            opt.zero_grad()

        for ids in batches(rank, world):
            step(engine(input_ids=ids, labels=ids).loss)
        if rank == 0:
            with open(os.path.join(out, method, "calls.json"), "w") as f:
                json.dump(calls, f)
        acc.unwrap_model(engine).save_pretrained(os.path.join(out, method))  # every rank: gathers; rank 0 writes
        if stage == 3:  # as transformers.Trainer.save_model under ZeRO-3 with a PEFT model: the engine consolidates
            # the trainable parameters on rank 0 (every rank takes part), then rank 0 alone saves with state_dict=
            sd = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
            if rank == 0:
                acc.unwrap_model(engine).save_pretrained(os.path.join(out, "state_dict", method), state_dict=sd,
                                                         is_main_process=True)
        acc.wait_for_everyone()


def run_zero_resume(out: str, args: list[str]) -> None:
    """`first STAGE METHOD`: ZeRO-STAGE with AdamW for RESUME_AT steps, then the trainable tensors and the
    name-keyed optimizer state (unipeft.distributed.zero_optimizer_state) saved to OUT/ckpt_METHOD.pt;
    `second STAGE METHOD` (a fresh torchrun, any number of processes): both loaded into a fresh engine, the
    remaining steps trained, the adapter saved to OUT/resumed_METHOD."""
    from unipeft.distributed import assign_full, full_parameters, load_zero_optimizer_state, zero_optimizer_state

    phase, stage, method = args[0], int(args[1]), args[2]
    acc = zero3_accelerator(stage)
    rank, world = dist.get_rank(), dist.get_world_size()
    peft = model(method)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=ADAM_LR)
    engine, opt = acc.prepare(peft, opt)
    named = [(n, p) for n, p in acc.unwrap_model(engine).named_parameters() if p.requires_grad]
    ckpt = os.path.join(out, f"ckpt_{method}.pt")
    steps = list(batches(rank, world, RESUME_STEPS))
    if phase == "second":
        saved = torch.load(ckpt, weights_only=True)
        for n, p in named:
            assign_full(p, saved["trainable"][n])
        try:
            load_zero_optimizer_state(named, opt, saved["optimizer"])
        except ValueError as e:  # the refusal (ZeRO stage 1/2), recorded for the test
            if rank == 0:
                with open(os.path.join(out, "refused.txt"), "w") as f:
                    f.write(str(e))
            return
    for ids in steps[:RESUME_AT] if phase == "first" else steps[RESUME_AT:]:
        acc.backward(engine(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    if phase == "first":
        with full_parameters(acc.unwrap_model(engine), [p for _, p in named]):
            trainable = {n: p.detach().clone() for n, p in named}
        state = zero_optimizer_state(named, opt)
        if rank == 0:
            torch.save({"trainable": trainable, "optimizer": state}, ckpt)
    else:
        acc.unwrap_model(engine).save_pretrained(os.path.join(out, f"resumed_{method}"))
    acc.wait_for_everyone()


def run_zero3_reload(out: str, methods: list[str]) -> None:
    """Fresh processes (a second torchrun after run_zero): each method's saved adapter loaded into a fresh
    ZeRO-3-partitioned model on every rank (unipeft.distributed.assign_full: gather, write on rank 0,
    re-partition), then saved again on every rank and run forward; never two engines for one method."""
    from safetensors.torch import load_file

    acc = zero3_accelerator(3)
    rank = dist.get_rank()
    for method in methods:
        acc.deepspeed_engine_wrapped = None
        peft = model(method)
        opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=LR)
        engine, opt = acc.prepare(peft, opt)
        fresh = acc.unwrap_model(engine)
        fresh.load_adapter_weights(load_file(os.path.join(out, method, "adapter_model.safetensors")))
        still = {n: p.numel() for n, p in fresh.named_parameters() if p.requires_grad and p.numel()}
        assert not still, f"loading un-partitioned {still}"  # each rank kept only its partition
        fresh.save_pretrained(os.path.join(out, "reloaded", method))  # every rank: gathers; rank 0 writes
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=EVAL_IDS).logits
        if rank == 0:
            torch.save(logits, os.path.join(out, "reloaded", method, "logits.pt"))
        acc.wait_for_everyone()


if __name__ == "__main__":
    torch.set_num_threads(1)
    engine, out, *methods = sys.argv[1:]
    {"fsdp2": run_fsdp2, "zero3": run_zero, "zero2": lambda o, m: run_zero(o, m, 2),
     "zero3_reload": run_zero3_reload, "zero_resume": run_zero_resume}[engine](out, methods)

"""A user's script: train an adapter with Accelerate on any number of processes, save it with save_pretrained.

    torchrun --nproc_per_node 2 tests/programs_ddp/train_api.py OUT            # LoRA, Houlsby, prefix, prompt
    torchrun --nproc_per_node 2 tests/programs_ddp/train_api.py OUT --all      # + every method, 2 steps each

Each optimizer step takes one global batch of GLOBAL rows; each process trains on its share of it. The rows have
no padding, so the mean loss over a share, averaged over the processes by DDP, is the global batch's mean loss:
the adapter equals the one trained by a single process (tests/test_distributed.py checks it to 1e-5).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

GLOBAL, SEQ, VOCAB, STEPS = 8, 6, 96, 3
CASES = {  # method -> (registered name, options); dropout 0 so that the comparison is exact
    "lora": ("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "houlsby": ("houlsby", {"bottleneck_size": 8}),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 4, "prefix_projection": True,
                                        "encoder_hidden_size": 16}),
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 4}),
}
EVERY = {  # the rest of the registry, for the "no unused parameters" check
    "ia3": {}, "pfeiffer": {"bottleneck_size": 8}, "parallel": {"bottleneck_size": 8},
    "scaled_parallel": {"bottleneck_size": 8}, "multi_head_parallel": {"bottleneck_size": 8},
    "mam": {"num_virtual_tokens": 4, "encoder_hidden_size": 16, "bottleneck_size": 8},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "p_tuning_v2": {"num_virtual_tokens": 4},
}


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2))


def peft_model(method: str, options: dict):
    import unipeft

    torch.manual_seed(1)  # the adapter's initialization: the same on every process
    return unipeft.get_peft_model(base_model(), unipeft.methods()[method].factory(task_type="CAUSAL_LM", **options))


def data(steps: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (steps, GLOBAL, SEQ), generator=torch.Generator().manual_seed(7))


def train(accelerator, method: str, options: dict, steps: int = STEPS):
    """The adapted model after `steps` optimizer steps; this process trains on its share of each global batch."""
    model = peft_model(method, options)
    # SGD: its update is linear in the gradient, so the comparison sees the processes' arithmetic, not Adam's
    # normalisation magnifying float rounding of near-zero gradients (the CLI's test covers AdamW)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    model.train()
    n, r = accelerator.num_processes, accelerator.process_index
    for batch in data(steps):
        ids = batch[r * GLOBAL // n:(r + 1) * GLOBAL // n].to(accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    return accelerator.unwrap_model(model)


def main(out: Path, every: bool) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    for name, (method, options) in CASES.items():
        peft = train(acc, method, options)
        peft.save_pretrained(out / name, is_main_process=acc.is_main_process)  # every process calls it
    if every and acc.num_processes > 1:
        # the check can fail: a trainable parameter that no forward uses is an error under DDP
        from torch import nn

        bad = peft_model("lora", CASES["lora"][1])
        bad.register_parameter("unused", nn.Parameter(torch.zeros(2)))
        bad, bad_opt = acc.prepare(bad, torch.optim.SGD([p for p in bad.parameters() if p.requires_grad], lr=0.1))
        try:
            for batch in data(2):
                acc.backward(bad(input_ids=batch[:2], labels=batch[:2]).loss)
                bad_opt.step()
            raise SystemExit("an unused parameter went unnoticed: the check below proves nothing")
        except RuntimeError as e:
            assert "unused" in str(e) or "reduction" in str(e), e
        if acc.is_main_process:
            print("ok the control: an unused parameter is an error", flush=True)
        for method, options in EVERY.items():
            train(acc, method, options, steps=2)  # DDP (find_unused_parameters=False) fails on an unused one
            if acc.is_main_process:
                print(f"ok {method}", flush=True)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--all" in sys.argv)

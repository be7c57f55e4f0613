"""transformers.Trainer on N processes, unchanged user code (`torchrun --nproc_per_node 2 tests/trainer_worker.py
OUT METHOD...`, DDP with gloo on CPU); used by tests/test_sharded.py.

For each method: a 4-step run saving checkpoints at steps 2 and 4 and a final save_model, the trained model's
logits on EVAL_IDS (rank 0, OUT/METHOD/logits.pt); then a second Trainer resumed from a copy of the first run's
checkpoint-2 (a run stopped after step 2) to step 4.

Not here: Trainer with DeepSpeed ZeRO-3 on CPU (DS_ACCELERATOR=cpu) trains and writes the adapter of checkpoint-2
from the consolidated state_dict, then hangs in DeepSpeed's own checkpoint save (optimizer partitions) on gloo.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharded_worker as W  # noqa: E402

STEPS, SAVE_EVERY, PER_DEVICE = 4, 2, 2


def data():
    from datasets import Dataset

    g = torch.Generator().manual_seed(7)
    rows = torch.randint(3, 90, (16, W.T), generator=g).tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * W.T] * 16, "labels": rows})


def trainer(method: str, out: str):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out, max_steps=STEPS, save_steps=SAVE_EVERY, save_strategy="steps",
                             per_device_train_batch_size=PER_DEVICE, learning_rate=0.1, optim="adamw_torch",
                             lr_scheduler_type="linear", seed=0, data_seed=0, report_to="none", logging_steps=1,
                             dataloader_num_workers=0, use_cpu=True)
    return Trainer(model=W.model(method), args=args, train_dataset=data())


def run(out: str, methods: list[str]) -> None:
    for method in methods:
        home = os.path.join(out, method)
        t = trainer(method, os.path.join(home, "full"))
        t.train()
        t.save_model(os.path.join(home, "final"))
        if dist.get_rank() == 0:
            peft = t.accelerator.unwrap_model(t.model).eval()
            with torch.no_grad():
                torch.save(peft(input_ids=W.EVAL_IDS).logits, os.path.join(home, "logits.pt"))
            # a run stopped after step 2: only its first checkpoint exists
            shutil.copytree(os.path.join(home, "full", "checkpoint-2"), os.path.join(home, "resumed", "checkpoint-2"))
        dist.barrier()
        t = trainer(method, os.path.join(home, "resumed"))
        t.train(resume_from_checkpoint=os.path.join(home, "resumed", "checkpoint-2"))
        t.save_model(os.path.join(home, "resumed_final"))
        dist.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, *methods = sys.argv[1:]
    run(out, methods)

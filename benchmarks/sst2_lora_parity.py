"""Is a LoRA gap between unipeft and HF PEFT on SST-2 systematic, or the seed's noise?

Both libraries draw their LoRA init and dropout masks from the global RNG, but not in the same order
(HF PEFT builds lora_A/lora_B as nn.Linear, drawing each twice; unipeft draws A once; unipeft shares one
dropout draw between sibling deltas reading the same x). So for a given seed the two runs start from
different A matrices and see different masks: the accuracies differ by run-to-run noise.

This script removes those two sources and nothing else: it builds HF PEFT's LoRA (r=8, α=16, query,value),
saves it, loads the same A, B and classifier head into unipeft (PeftModel.from_pretrained, is_trainable),
sets lora_dropout to 0 on both sides, reseeds right before training (same base-model dropout masks), and
trains both with the benchmark protocol. Equal losses/accuracy mean the two compute the same training.

    .venv/bin/python benchmarks/sst2_lora_parity.py --train-rows 1600 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sst2  # noqa: E402  (sets the environment)
import sst2_protocol as P  # noqa: E402


def pair(mdir: str, data: P.Data, seed: int, lr: float, dropout: float) -> dict:
    import peft
    import unipeft

    P.seed_everything(seed)
    hf = peft.get_peft_model(sst2._base(mdir), peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["query", "value"]))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        P.seed_everything(seed)  # the same base model and head init
        ours = unipeft.PeftModel.from_pretrained(sst2._base(mdir), d, is_trainable=True)
    out = {}
    for name, model in (("peft", hf), ("unipeft", ours)):
        P.torch.manual_seed(10_000 + seed)  # same base-model dropout masks on both sides
        r = P.train_and_eval(model, data, seed=seed, lr=lr, log=None)
        out[name] = {k: r[k] for k in ("acc", "final_loss", "trainable_params", "head_init_checksum")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--train-rows", type=int, default=1600)
    ap.add_argument("--val-rows", type=int, default=None)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    mdir = sst2.model_dir()
    data = P.load_data(mdir, train_rows=args.train_rows, val_rows=args.val_rows)
    res = {"train_rows": len(data.train), "val_rows": len(data.val), "lora_dropout": args.lora_dropout,
           "git": sst2.git_state(), "versions": P.versions(), "seeds": {}}
    for s in args.seeds:
        res["seeds"][s] = pair(mdir, data, s, sst2.LORA_LR, args.lora_dropout)
        print(s, json.dumps(res["seeds"][s]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""AdapterHub `adapters` side of the SST-2 benchmark. Runs in its own venv (.venv-adapters:
adapters 1.3 pins transformers 4.57), started by benchmarks/sst2.py as a subprocess.

Each run appends one JSON line to --out. The adapter configs are AdapterHub's own named configs,
with reduction_factor=16 passed explicitly for every method:
    houlsby          "double_seq_bn"   (DoubleSeqBnConfig: attn + FFN, sequential, swish, init "bert")
    pfeiffer         "seq_bn"          (SeqBnConfig: FFN after the original LN, residual_before_ln, relu, init "bert")
    scaled_parallel  "scaled_parallel" (ParBnConfig(scaling="learned"), whose own default reduction_factor is 2;
                                        here 16 for the same parameter budget as ours; init "mam_adapter")
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sst2_protocol as P  # noqa: E402

CONFIGS = {"houlsby": "double_seq_bn", "pfeiffer": "seq_bn", "scaled_parallel": "scaled_parallel"}


def build(model_dir: str, method: str, reduction_factor: float, overrides: dict | None = None):
    import adapters
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    adapters.init(model)
    cfg = adapters.AdapterConfig.load(CONFIGS[method], reduction_factor=reduction_factor, **(overrides or {}))
    model.add_adapter("sst2", config=cfg)
    model.train_adapter("sst2")  # freezes the encoder (base_model) only; the classifier head stays trainable
    model.set_active_adapters("sst2")
    head = [n for n, p in model.named_parameters() if n.startswith("classifier.")]
    if not head or not all(p.requires_grad for n, p in model.named_parameters() if n in head):
        raise RuntimeError(f"classifier head is not trainable: {head}")
    return model, cfg.to_dict()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data-dir", default=str(P.DEFAULT_DATA_DIR))
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reduction-factor", type=float, default=16)
    ap.add_argument("--train-rows", type=int, default=P.TRAIN_ROWS)
    ap.add_argument("--val-rows", type=int, default=None)
    ap.add_argument("--out", required=True, help="JSON-lines file to append results to")
    ap.add_argument("--override", default="{}", help="ablations: JSON of BnConfig fields to change, e.g. "
                    "'{\"init_weights\": \"mam_adapter\"}'")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch_threads = P.NUM_THREADS
    import torch

    torch.set_num_threads(torch_threads)
    overrides = json.loads(args.override)
    data = P.load_data(args.model_dir, args.data_dir, args.train_rows, args.val_rows)
    vers, mach = P.versions(), P.machine()
    for seed in args.seeds:
        for method in args.methods:
            print(f"[adapters] {method} seed {seed} lr {args.lr}", flush=True)
            t = time.perf_counter()
            P.seed_everything(seed)
            model, cfg = build(args.model_dir, method, args.reduction_factor, overrides)
            res = P.train_and_eval(model, data, seed=seed, lr=args.lr, log=lambda s: print(s, flush=True))
            res.update(method=method, lib="adapters", seed=seed, lr=args.lr, config=cfg,
                       config_name=CONFIGS[method], overrides=overrides, versions=vers, machine=mach,
                       wall_s=time.perf_counter() - t)
            print(f"[adapters] {method} seed {seed}: acc {res['acc']:.4f} "
                  f"({res['s_per_step']:.3f} s/step, {res['trainable_params']} trainable)", flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

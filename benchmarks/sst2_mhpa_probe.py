"""Probe: why the multi-head parallel adapter (MH PA) does or does not train on the SST-2 protocol at a given lr.

    .venv/bin/python benchmarks/sst2_mhpa_probe.py --lrs 1e-3 1e-4 --steps 30

The first `--steps` steps of the benchmarks/sst2.py protocol (seed 0, same order, warmup and schedule as the
full 250-step epoch) for MiniLM + MultiHeadParallelConfig(bottleneck_size=24), logging per step: the loss, the
ReLU prefix weights (mean over tokens of Σ_p ReLU(q P_kᵀ/√d), the unnormalized mass a head's term carries),
the RMS of the added term relative to the RMS of the head outputs it is added to (max over layers), and the
spread of the [CLS] representations over the batch (std over rows / mean norm: near 0 = every row the same).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sst2_protocol as P  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 1e-4])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", default="{}", help="extra MultiHeadParallelConfig fields as JSON")
    ap.add_argument("--out", default=None, help="JSON lines, one per step")
    args = ap.parse_args(argv)

    from transformers import AutoModelForSequenceClassification

    import unipeft.positions.attention_kv as akv
    from unipeft import MultiHeadParallelConfig
    from sst2 import REDUCTION, model_dir

    stats: list[dict] = []
    base_with_added = akv._with_added

    def with_added(site, module, query, out, pk, pv, kwargs):  # measure, then compute as the library does
        new = base_with_added(site, module, query, out, pk, pv, kwargs)
        with torch.no_grad():
            a = F.relu(query @ pk.transpose(-1, -2) * query.shape[-1] ** -0.5)  # (B, H, T, P)
            stats.append({"mass": float(a.sum(-1).mean()), "pos": float((a > 0).float().mean()),
                          "ratio": float((new - out).pow(2).mean().sqrt() / out.pow(2).mean().sqrt()),
                          "pv_rms": float(pv.pow(2).mean().sqrt()), "pk_rms": float(pk.pow(2).mean().sqrt())})
        return new

    akv._with_added = with_added
    mdir = model_dir()
    data = P.load_data(mdir, P.DEFAULT_DATA_DIR, P.TRAIN_ROWS, 64)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    batches = [order[i:i + P.BATCH_SIZE] for i in range(0, len(order), P.BATCH_SIZE)]
    total, warmup = len(batches), math.ceil(P.WARMUP_RATIO * len(batches))
    out = open(args.out, "w") if args.out else None
    for lr in args.lrs:
        P.seed_everything(args.seed)
        torch.set_num_threads(args.threads)
        base = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2)
        cfg = MultiHeadParallelConfig(task_type="SEQ_CLS", bottleneck_size=384 // REDUCTION,
                                      **json.loads(args.config))
        from unipeft import get_peft_model

        model = get_peft_model(base, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, eps=P.ADAM_EPS, weight_decay=0.0)
        sched = P.linear_warmup_decay(opt, warmup, total)
        model.train()
        print(f"lr {lr:g} {args.config}: step loss | mass Σ_p ReLU (mean over layers) | frac>0 | max layer "
              f"RMS(Δ)/RMS(head) | P_v rms | CLS spread | grad norm", flush=True)
        for step, idx in enumerate(batches[:args.steps], 1):
            stats.clear()
            inputs, labels = data.train.batch(idx)
            res = model(**inputs, output_hidden_states=True)
            loss = F.cross_entropy(res.logits.float(), labels)
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(params, P.MAX_GRAD_NORM))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            cls = res.hidden_states[-1][:, 0].detach()
            spread = float(cls.std(0).norm() / cls.norm(dim=-1).mean())
            row = {"lr": lr, "step": step, "loss": loss.item(), "grad_norm": gn, "cls_spread": spread,
                   "mass": sum(s["mass"] for s in stats) / len(stats), "pos": sum(s["pos"] for s in stats) / len(stats),
                   "ratio_max": max(s["ratio"] for s in stats), "pv_rms": max(s["pv_rms"] for s in stats),
                   "config": json.loads(args.config)}
            print(f"  {step:3d} {row['loss']:.4f} | {row['mass']:8.3f} | {row['pos']:.2f} | {row['ratio_max']:9.3f} | "
                  f"{row['pv_rms']:8.4f} | {spread:.3f} | {gn:.3f}", flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

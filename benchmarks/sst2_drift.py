"""Does a unipeft row of results/sst2.md still compute what it did? Run this under two checkouts' src/ (PYTHONPATH)
and compare the JSON it prints: per method (sst2.py's keys, our side only), the trainable count, the eval logits of
8 SST-2 validation rows and the losses of 3 training steps at the method's lr, all from seed 0.

    PYTHONPATH=<old checkout>/src .venv/bin/python benchmarks/sst2_drift.py multi_head_parallel > old.json
    PYTHONPATH=src .venv/bin/python benchmarks/sst2_drift.py multi_head_parallel > new.json

Equal logits and losses: runs made at the two checkouts are runs of one computation (seeds can be pooled).
The same check for results/nlu_prompt.md is nlu_prompt_drift.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sst2_protocol as P  # noqa: E402
from sst2 import METHODS, model_dir  # noqa: E402


def main(argv=None) -> int:
    keys = (sys.argv[1:] if argv is None else argv) or ["multi_head_parallel"]
    bad = [k for k in keys if k not in METHODS or METHODS[k].lib != "unipeft"]
    if bad:
        raise SystemExit(f"unknown or not-unipeft methods {bad}; choose from "
                         f"{[k for k, m in METHODS.items() if m.lib == 'unipeft']}")
    mdir = model_dir()
    data = P.load_data(mdir, P.DEFAULT_DATA_DIR, 64, 8)
    out = {}
    for key in keys:
        m = METHODS[key]
        P.seed_everything(0)
        model, _ = m.build(mdir)
        params = P.trainable_parameters(model)
        opt = torch.optim.AdamW(params, lr=m.lr, eps=P.ADAM_EPS, weight_decay=0.0)
        inputs, _ = data.val.batch(list(range(8)))
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        res = {"lr": m.lr, "trainable": sum(p.numel() for p in params),
               "logits_sum": float(logits.double().sum()), "logits": logits.flatten()[:6].tolist()}
        model.train()
        torch.manual_seed(1)
        losses = []
        for s in range(3):
            b, y = data.train.batch(list(range(s * 16, s * 16 + 16)))
            loss = F.cross_entropy(model(**b).logits.float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, P.MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        res["losses"] = losses
        out[key] = res
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

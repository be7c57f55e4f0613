"""Has a method of results/nlu_prompt.md changed since its rows were produced? Run this under two checkouts'
src/ (PYTHONPATH) and compare the JSON it prints: per method and task head, the trainable count, the eval logits
of 8 SST-2 validation rows and the losses of 3 training steps, all from seed 0 (the benchmark's configs).

    PYTHONPATH=<old checkout>/src .venv/bin/python benchmarks/nlu_prompt_drift.py > old.json
    PYTHONPATH=src .venv/bin/python benchmarks/nlu_prompt_drift.py > new.json
    PYTHONPATH=src .venv/bin/python benchmarks/nlu_prompt_drift.py '{"prefix_tuning": {"position_shift": false}}'

Equal eval logits and losses: the method computes what it did. Equal logits but other losses: only the random
stream of dropout moved. The optional JSON argument overrides config fields (and limits the run to those methods).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sst2_protocol as P  # noqa: E402
from nlu_prompt import METHODS  # noqa: E402
from sst2 import model_dir  # noqa: E402


def main(argv=None) -> int:
    import unipeft
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    argv = sys.argv[1:] if argv is None else argv
    extra = json.loads(argv[0]) if argv else {}
    mdir = model_dir()
    data = P.load_data(mdir, P.DEFAULT_DATA_DIR, 64, 8)
    out = {}
    for key, (name, opts, lrs) in METHODS.items():
        if extra and key not in extra:
            continue
        for task in ("sst2", "conll"):
            if task == "conll" and key not in ("lora", "p_tuning_v2"):  # the CoNLL rows of the table
                continue
            P.seed_everything(0)
            if task == "sst2":
                base, tt, n = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2), "SEQ_CLS", 2
            else:
                base, tt, n = AutoModelForTokenClassification.from_pretrained(mdir, num_labels=9), "TOKEN_CLS", 9
            model = unipeft.get_peft_model(base, unipeft.methods()[name].factory(task_type=tt,
                                                                                 **{**opts, **extra.get(key, {})}))
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lrs[task], eps=1e-8, weight_decay=0.0)
            inputs, _ = data.val.batch(list(range(8)))
            model.eval()
            with torch.no_grad():
                logits = model(**inputs).logits
            res = {"trainable": sum(p.numel() for p in params), "logits_sum": float(logits.double().sum()),
                   "logits": logits.flatten()[:6].tolist()}
            model.train()
            torch.manual_seed(1)
            losses = []
            for s in range(3):
                b, y = data.train.batch(list(range(s * 16, s * 16 + 16)))
                lg = model(**b).logits
                if task == "conll":  # synthetic token labels: only equality between checkouts matters
                    lg = lg[:, -b["input_ids"].shape[1]:]
                    y = (b["input_ids"] % n).masked_fill(b["attention_mask"] == 0, -100)
                    loss = F.cross_entropy(lg.reshape(-1, n).float(), y.reshape(-1), ignore_index=-100)
                else:
                    loss = F.cross_entropy(lg.float(), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            res["losses"] = losses
            out[f"{key}/{task}"] = res
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The SST-2 benchmark protocol shared by every side (unipeft, HF PEFT, AdapterHub `adapters`).

Pure torch plus a transformers tokenizer: this module must import, and behave identically, under
transformers 5.x (our venv) and transformers 4.57 (the `adapters` venv). It knows nothing about any
PEFT library: it takes a built model whose trainable tensors have requires_grad=True, trains it and
returns the accuracy, the training time, the step count and the peak RSS.

Protocol (the earlier baseline, reproduced exactly for every side):
  - data: the first 8,000 rows of train.jsonl; all 872 rows of validation.jsonl
  - tokenizer truncation at max_length 64; dynamic padding per batch (right padding, pad id, mask 0)
  - 1 epoch, batch 32 (= 250 steps); order from torch.randperm with torch.Generator().manual_seed(seed)
  - AdamW (default betas, eps 1e-8, weight_decay 0), one lr for all trainable tensors (classifier head
    included); linear warmup over the first ceil(6%) of the steps (15), then linear decay to 0
  - gradient-norm clipping at 1.0; dropout on (model defaults); cross-entropy on the logits
  - eval: argmax accuracy on all validation rows, batch 64, in file order, model.eval() and no_grad
  - torch.manual_seed(seed) before building the model (the caller does this: see `seed_everything`);
    torch.set_num_threads(2), OMP_WAIT_POLICY=PASSIVE (speed only)
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Sleep rather than spin while waiting at OpenMP barriers: on a shared 2-core machine the default (spinning)
# makes 2-thread steps 3-6x slower whenever another process runs. Numerics are unchanged. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TRAIN_ROWS = 8000
MAX_LENGTH = 64
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 64
WARMUP_RATIO = 0.06
MAX_GRAD_NORM = 1.0
ADAM_EPS = 1e-8
NUM_THREADS = 2

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = (REPO / ".." / "shared" / "data" / "sst2").resolve()


# -- data -----------------------------------------------------------------------------------------------

def load_rows(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


@dataclass
class Encoded:
    """Token ids (unpadded, one list per row) and labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """sha256 of the ids and labels: equal across sides means the models saw the same inputs."""
        h = hashlib.sha256()
        for ids, y in zip(self.input_ids, self.labels):
            h.update(json.dumps([ids, y]).encode())
        return h.hexdigest()[:16]

    def batch(self, idx: list[int]) -> tuple[dict, torch.Tensor]:
        """Dynamic padding to the longest row of this batch (right padding)."""
        n = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        tt = torch.zeros((len(idx), n), dtype=torch.long) if self.token_type_ids is not None else None
        for r, i in enumerate(idx):
            k = len(self.input_ids[i])
            ids[r, :k] = torch.tensor(self.input_ids[i])
            mask[r, :k] = 1
            if tt is not None:
                tt[r, :k] = torch.tensor(self.token_type_ids[i])
        inputs = {"input_ids": ids, "attention_mask": mask}
        if tt is not None:
            inputs["token_type_ids"] = tt
        return inputs, torch.tensor([self.labels[i] for i in idx], dtype=torch.long)


def encode(tokenizer, rows: list[dict], max_length: int = MAX_LENGTH) -> Encoded:
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=max_length)
    tt = enc.get("token_type_ids")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(list(enc["input_ids"]), list(tt) if tt is not None else None, [int(r["label"]) for r in rows], pad)


@dataclass
class Data:
    train: Encoded
    val: Encoded

    def fingerprint(self) -> str:
        return f"{self.train.fingerprint()}:{self.val.fingerprint()}"


def load_data(model_dir: str, data_dir: str | os.PathLike = DEFAULT_DATA_DIR, train_rows: int = TRAIN_ROWS,
              val_rows: int | None = None) -> Data:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    data_dir = Path(data_dir)
    return Data(encode(tok, load_rows(data_dir / "train.jsonl", train_rows)),
                encode(tok, load_rows(data_dir / "validation.jsonl", val_rows)))


# -- reproducibility ---------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Call right before building the model: the seed then fixes the head's (and adapters') init."""
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(seed)


# -- memory ---------------------------------------------------------------------------------------------------

class PeakRSS:
    """Samples this process's resident set size in a thread; `peak_mb` is the maximum seen."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


# -- train / eval -------------------------------------------------------------------------------------------

def linear_warmup_decay(optimizer, warmup: int, total: int):
    """Same schedule as transformers.get_linear_schedule_with_warmup (pure torch)."""

    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def evaluate(model, data: Encoded, batch_size: int = EVAL_BATCH_SIZE) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for s in range(0, len(data), batch_size):
        inputs, labels = data.batch(list(range(s, min(s + batch_size, len(data)))))
        logits = model(**inputs).logits
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(data)


def train_and_eval(model, data: Data, *, seed: int, lr: float, batch_size: int = BATCH_SIZE,
                   warmup_ratio: float = WARMUP_RATIO, max_grad_norm: float = MAX_GRAD_NORM, log_every: int = 50,
                   log=print) -> dict:
    """Train `model`'s trainable tensors for one epoch of `data.train`, then evaluate on `data.val`."""
    torch.set_num_threads(NUM_THREADS)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    head_sum = _head_checksum(model)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    total = len(batches)
    warmup = math.ceil(warmup_ratio * total)
    opt = torch.optim.AdamW(params, lr=lr, eps=ADAM_EPS, weight_decay=0.0)
    sched = linear_warmup_decay(opt, warmup, total)
    losses = []
    gc.collect()  # earlier runs' garbage out of the way of this run's memory figures
    with PeakRSS() as mem:
        rss_start = mem.peak
        model.train()
        t0 = time.perf_counter()
        for step, idx in enumerate(batches, 1):
            inputs, labels = data.train.batch(idx)
            loss = F.cross_entropy(model(**inputs).logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if log and log_every and (step % log_every == 0 or step == total):
                log(f"    step {step}/{total} loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f} "
                    f"({time.perf_counter() - t0:.0f}s)")
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        acc = evaluate(model, data.val)
        eval_s = time.perf_counter() - t1
    return {
        "acc": acc, "train_s": train_s, "steps": total, "s_per_step": train_s / total, "eval_s": eval_s,
        "peak_rss_mb": round(mem.peak_mb, 1), "rss_start_mb": round(rss_start / 2**20, 1),
        "peak_rss_delta_mb": round((mem.peak - rss_start) / 2**20, 1), "warmup_steps": warmup, "final_loss": sum(losses[-25:]) / len(losses[-25:]),
        "trainable_params": n_trainable, "total_params": n_total, "head_init_checksum": head_sum,
        "train_rows": len(data.train), "val_rows": len(data.val), "data_fingerprint": data.fingerprint(),
    }


def _head_checksum(model) -> float | None:
    """Sum of |w| of the classifier head before training (shows whether sides start from the same head)."""
    for name, p in model.named_parameters():
        if name.endswith("classifier.weight") or name.endswith("classifier.modules_to_save.default.weight"):
            return round(float(p.detach().abs().sum()), 6)
    return None


# -- provenance ------------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "tokenizers", "peft", "adapters", "unipeft"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (not installed in this venv)
            pass
    return out


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "platform": platform.platform()}

"""The training loop: AdamW + warmup/decay schedule, gradient accumulation and clipping, mixed precision and
devices through Accelerate, periodic evaluation with best-adapter keeping, and exact resume.

Exact resume: a checkpoint holds the trainable tensors, optimizer, scheduler, every RNG (as of the end of the
last finished step) and the data position (epoch, batch). Batches come from a per-epoch permutation seeded by
(seed, epoch), so the order after a resume is the order the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import TrainingStopped
from .evaluate import run_eval
from .optim import make_optimizer

CKPT = "checkpoint"


@dataclass
class State:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # next accumulation group within the epoch
    best: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    last_saved_step: int | None = None
    train_loss: float | None = None
    elapsed_s: float = 0.0


def rng_snapshot() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    snap = {"python": [py[0], list(py[1]), py[2]], "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def rng_restore(snap: dict) -> None:
    v, s, g = snap["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, cached = snap["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])


class Trainer:
    def __init__(self, accelerator, peft, task, train_feats, eval_feats, args: dict, out: Path, log, save_adapter):
        self.acc, self.peft, self.task, self.args, self.out, self.log = accelerator, peft, task, args, out, log
        self.train_feats, self.eval_feats = train_feats, eval_feats
        self.save_adapter = save_adapter  # callable(folder): writes the adapter (+ task metadata)
        self.named = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
        self.bs, self.accum = args["batch_size"], max(1, args["grad_accum"])
        nproc = accelerator.num_processes
        per_epoch = len(train_feats) // (self.bs * nproc) if nproc > 1 else math.ceil(len(train_feats) / self.bs)
        if per_epoch == 0:
            raise TrainingStopped(f"{len(train_feats)} training examples cannot fill one batch of {self.bs} on each "
                                  f"of {nproc} processes", "lower --batch-size or add data")
        self.steps_per_epoch = math.ceil(per_epoch / self.accum)
        self.total = args["max_steps"] or max(1, math.ceil(args["epochs"] * self.steps_per_epoch))
        w = args["warmup"] or 0
        self.warmup = int(w * self.total) if w < 1 else int(w)
        opt = make_optimizer(args.get("optimizer") or "adamw", [p for _, p in self.named], args["lr"],
                             args["weight_decay"])
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(args["scheduler"], args["scheduler"])
        self.sched = get_scheduler(name, opt, num_warmup_steps=self.warmup, num_training_steps=self.total)
        self.model, self.opt = accelerator.prepare(peft, opt)
        self.state = State()
        self._rng = rng_snapshot()
        self._stop = False

    # data order ----------------------------------------------------------------------------------------------
    def groups(self, epoch: int) -> list[list[list[int]]]:
        n, nproc, rank = len(self.train_feats), self.acc.num_processes, self.acc.process_index
        g = torch.Generator().manual_seed(self.args["seed"] * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        gb = self.bs * nproc
        batches = [perm[i:i + gb] for i in range(0, n, gb)]
        if nproc > 1:
            batches = [b[rank * self.bs:(rank + 1) * self.bs] for b in batches if len(b) == gb]
        return [batches[i:i + self.accum] for i in range(0, len(batches), self.accum)]

    # checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        acc, final = self.acc, self.out / CKPT
        tmp = self.out / f".{CKPT}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in self.named}, tmp / "trainable.safetensors")
            torch.save(self.opt.state_dict(), tmp / "optimizer.pt")
            torch.save(self.sched.state_dict(), tmp / "scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
            self.save_adapter(tmp / "adapter")
        acc.wait_for_everyone()
        torch.save(self._rng, tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.state.last_saved_step = self.state.step
            (tmp / "state.json").write_text(json.dumps(asdict(self.state), indent=2))
            old = self.out / f".{CKPT}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load_checkpoint(self) -> None:
        folder = self.out / CKPT
        try:
            tensors = load_file(folder / "trainable.safetensors")
            with torch.no_grad():
                for n, p in self.named:
                    p.copy_(tensors[n].to(p.device, p.dtype))
            if set(tensors) != {n for n, _ in self.named}:
                raise KeyError(sorted(set(tensors) ^ {n for n, _ in self.named})[:3])
            self.opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu"))
        except (KeyError, RuntimeError, ValueError, OSError) as e:
            raise TrainingStopped(f"the checkpoint in {folder} does not fit this model and method ({type(e).__name__}: "
                                  f"{str(e)[:200]})", "resume with the run's own options (drop method flags), or "
                                  "start a new run with --overwrite", exit_code=2) from None
        self.sched.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        if self.acc.scaler is not None and (folder / "scaler.pt").is_file():
            self.acc.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        self.state = State(**json.loads((folder / "state.json").read_text()))
        rng = folder / f"rng_{self.acc.process_index}.pt"
        self._rng = torch.load(rng if rng.is_file() else folder / "rng_0.pt", weights_only=True)
        rng_restore(self._rng)

    # evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        st = self.state
        m = run_eval(self.acc.unwrap_model(self.model), self.task, self.eval_feats, self.args["batch_size"], self.acc)
        st.last_eval_step = st.step
        value = m.get(self.task.metric, m.get("eval_loss"))
        better = st.best is None or (value > st.best if self.task.greater_is_better else value < st.best)
        if better and math.isfinite(value):
            st.best, st.best_step = value, st.step
            if self.acc.is_main_process:
                self.save_adapter(self.out / "adapter")
        if self.acc.is_main_process:
            self.log.write({"step": st.step, "epoch": round(st.epoch + st.batch / max(1, self.steps_per_epoch), 4),
                            **m, "best": st.best_step == st.step})
        self.acc.wait_for_everyone()
        return m

    # the loop ------------------------------------------------------------------------------------------------
    def _on_sigint(self, *_):
        if self._stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True
        if self.acc.is_main_process:
            print("\nCtrl-C: finishing this step and saving a resumable checkpoint (Ctrl-C again to abort)",
                  flush=True)

    def run(self, bar) -> State:
        st, acc, args = self.state, self.acc, self.args
        self.model.train()
        stop_at = int(os.environ.get("UNIPEFT_STOP_AT_STEP", "0") or 0)  # tests: an interrupt at a known step
        old = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        t0, tokens, window = time.time(), 0, []
        try:
            while st.step < self.total:
                epoch, groups = st.epoch, self.groups(st.epoch)
                while st.epoch == epoch and st.step < self.total:
                    loss, ntok = self.train_step(groups[st.batch])
                    st.step += 1
                    st.batch += 1
                    self._rng = rng_snapshot()
                    tokens += ntok
                    window.append(loss)
                    st.train_loss = loss
                    rate = tokens / max(time.time() - t0, 1e-9)
                    lr = self.sched.get_last_lr()[0]
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                    if st.step % args["log_every"] == 0 or st.step == self.total:
                        if acc.is_main_process:
                            self.log.write({"step": st.step, "epoch": round(st.epoch + st.batch / len(groups), 4),
                                            "loss": sum(window) / len(window), "lr": lr, "tokens_per_s": rate,
                                            "elapsed_s": round(st.elapsed_s + time.time() - t0, 2)})
                        window = []
                    if st.batch >= len(groups):
                        st.epoch, st.batch = st.epoch + 1, 0
                    ev = args["eval_every"]
                    if self.eval_feats and ((ev and st.step % ev == 0) or (not ev and st.batch == 0)
                                            or st.step == self.total):
                        self.evaluate()
                    if st.step % args["save_every"] == 0 and st.step < self.total:
                        self.save_checkpoint()
                    if self._stop or (stop_at and st.step == stop_at):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            st.elapsed_s += time.time() - t0
            self.save_checkpoint()
            if not self.eval_feats and acc.is_main_process:
                self.save_adapter(self.out / "adapter")
            raise TrainingStopped(f"interrupted at step {st.step}/{self.total}; a resumable checkpoint is in "
                                  f"{self.out / CKPT}", f"continue with: unipeft train --output {self.out} --resume",
                                  exit_code=130) from None
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        st.elapsed_s += time.time() - t0
        if not self.eval_feats and acc.is_main_process:
            self.save_adapter(self.out / "adapter")
        self.save_checkpoint()
        return st

    def train_step(self, group) -> tuple[float, int]:
        acc, total_loss, ntok = self.acc, 0.0, 0
        for i, idx in enumerate(group):
            batch = self.task.collate([self.train_feats[j] for j in idx])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = i == len(group) - 1
            with (nullcontext() if sync else acc.no_sync(self.model)), acc.autocast():
                loss = self.model(**batch).loss
                if not _all_finite(acc, loss):
                    self._nonfinite(float(loss))
                acc.backward(loss / len(group))
            total_loss += float(loss.detach()) / len(group)
            ntok += int(batch["attention_mask"].sum())
        if self.args["max_grad_norm"]:
            norm = acc.clip_grad_norm_([p for _, p in self.named], self.args["max_grad_norm"])
            # fp16's loss scaler skips steps with inf gradients by design; elsewhere they are fatal
            if acc.scaler is None and not _all_finite(acc, torch.as_tensor(norm)):
                self._nonfinite(float(norm), what="gradient norm")
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return acc.reduce(torch.tensor(total_loss, device=acc.device), "mean").item(), ntok

    def _nonfinite(self, value: float, what: str = "loss"):
        st = self.state
        kept = (f"the last good checkpoint is step {st.last_saved_step} in {self.out / CKPT}"
                if st.last_saved_step is not None else "no checkpoint had been saved yet")
        raise TrainingStopped(f"the {what} became {value} at step {st.step + 1}; training stopped and {kept}"
                              + (f"; the best adapter (step {st.best_step}) is in {self.out / 'adapter'}"
                                 if st.best_step is not None else ""),
                              "lower --lr (or raise --warmup, or use --precision fp32), then rerun "
                              + (f"or continue with --resume" if st.last_saved_step is not None else ""),
                              exit_code=3)


def _all_finite(acc, t) -> bool:
    bad = torch.tensor(0.0 if torch.isfinite(t.detach().float()).all() else 1.0, device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, "sum")
    return bad.item() == 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

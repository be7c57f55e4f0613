"""The training loop: AdamW + warmup/decay schedule, gradient accumulation and clipping, mixed precision and
devices through Accelerate, periodic evaluation with best-adapter keeping, and exact resume.

Exact resume: a checkpoint holds the trainable tensors, optimizer, scheduler, every RNG (as of the end of the
last finished step) and the data position (epoch, batch). Batches come from a per-epoch permutation seeded by
(seed, epoch), so the order after a resume is the order the uninterrupted run would have seen.

Several processes: the data order does not depend on their number. Optimizer step k takes global batch k, rows
perm[k*G:(k+1)*G] with G = batch_size x processes x grad_accum fixed when the run starts (and kept in the
checkpoint), cut into micro-batches of batch_size rows; process r runs micro-batches r, r+N, r+2N, ... Each
micro-batch's loss is weighted N/M (M micro-batches in the step) and DDP/FSDP/ZeRO average over the N processes,
so the gradient is the mean of the M micro-batch losses' gradients whatever N is: a run saved on 2 processes
resumes on 1 (or 4) exactly. A process with fewer micro-batches (the last, short global batch) runs a
zero-weight one, so every process takes part in every gradient reduction.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import TrainingStopped
from .evaluate import run_eval
from .optim import make_optimizer
from .schedule import make_schedule
from .step_stats import StepStats

CKPT = "checkpoint"
SAME_CTRL_C_S = 3.0  # SIGINTs this close together are one Ctrl-C (delivered directly and forwarded by the launcher)


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
    global_batch: int | None = None  # rows per optimizer step, fixed for the whole run (any number of processes)


def rng_state() -> tuple:
    """Every RNG's state as its library returns it (taken after each step: an abort mid-step saves the state as of
    the last finished step, which a snapshot taken later could not give); rng_snapshot makes it saveable."""
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def rng_snapshot(state: tuple | None = None) -> dict:
    py, (name, keys, pos, has_gauss, cached), cpu, cuda = state or rng_state()
    snap = {"python": [py[0], list(py[1]), py[2]], "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            "torch": cpu}
    if cuda is not None:
        snap["cuda"] = cuda
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
    def __init__(self, accelerator, peft, task, train_feats, eval_feats, args: dict, out: Path, log, save_adapter,
                 global_batch: int | None = None, collate=None):
        self.acc, self.peft, self.task, self.args, self.out, self.log = accelerator, peft, task, args, out, log
        self.train_feats, self.eval_feats = train_feats, eval_feats
        self.collate = collate or task.collate  # training batches (packing.collate_packed for --packing)
        self.save_adapter = save_adapter  # callable(folder): writes the adapter (+ task metadata); every process
        self.bs, nproc = args["batch_size"], accelerator.num_processes
        # a resumed run keeps its global batch, whatever the number of processes now
        self.global_batch = global_batch or self.bs * nproc * max(1, args["grad_accum"])
        self.accum = math.ceil(self.global_batch / (self.bs * nproc))  # micro-batches per process and step
        self.steps_per_epoch = math.ceil(len(train_feats) / self.global_batch)
        if len(train_feats) == 0:
            raise TrainingStopped("no training examples", "check --train")
        self.total = args["max_steps"] or max(1, math.ceil(args["epochs"] * self.steps_per_epoch))
        w = args["warmup"] or 0
        self.warmup = int(w * self.total) if w < 1 else int(w)
        params = [p for p in peft.parameters() if p.requires_grad]
        opt = make_optimizer(args.get("optimizer") or "adamw", params, args["lr"], args["weight_decay"])
        # each group's parameter names, taken before prepare (ZeRO-3 then empties the groups): the checkpoint's
        # name-keyed optimizer state lists them as torch's full optimizer state dict does
        by_id = {id(p): n for n, p in peft.named_parameters()}
        self._group_names = [[by_id[id(p)] for p in g["params"]] for g in opt.param_groups]
        self.sched = make_schedule(args["scheduler"], opt, self.warmup, self.total)
        if _is_fsdp2(peft) and not accelerator.is_fsdp2:
            # sharded by torch's FSDP2 already (a CPU launch, where Accelerate would wrap it in DDP): the optimizer
            # only (it was built on the sharded parameters)
            self.model, self.opt = peft, accelerator.prepare(opt)
        else:
            self.model, self.opt = accelerator.prepare(peft, opt)
        # after prepare: FSDP2 swaps parameters for sharded ones, so a list taken before would be stale
        self.named = [(n, p) for n, p in accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad]
        self.state = State(global_batch=self.global_batch)
        self._rng = rng_state()  # as of the end of the last finished step (see run)
        self._stats = StepStats(accelerator.device)
        self._stop, self._stop_at = False, 0.0  # this process saw Ctrl-C, and when
        self._agreed_stop = False  # some process saw it, as of the last step (every process agrees)

    # data order ----------------------------------------------------------------------------------------------
    def global_batches(self, epoch: int) -> list[list[int]]:
        """Row indices of each optimizer step of an epoch; the same for any number of processes."""
        g = torch.Generator().manual_seed(self.args["seed"] * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train_feats), generator=g).tolist()
        return [perm[i:i + self.global_batch] for i in range(0, len(perm), self.global_batch)]

    def my_micro_batches(self, rows: list[int]) -> list[tuple[list[int], float]]:
        """This process's micro-batches of one global batch, each with its loss weight (see the module doc)."""
        micros = [rows[i:i + self.bs] for i in range(0, len(rows), self.bs)]
        n, rank = self.acc.num_processes, self.acc.process_index
        mine = [(m, n / len(micros)) for m in micros[rank::n]]
        return mine + [(micros[0], 0.0)] * (math.ceil(len(micros) / n) - len(mine))

    # checkpoints ---------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Every process takes part (sharded tensors are gathered); the main process writes."""
        acc, final = self.acc, self.out / CKPT
        tmp = self.out / f".{CKPT}.tmp"
        stage = _zero_stage(acc)
        if stage is not None:  # ZeRO: the fp32 master weights (the module's are bf16 under bf16), the state by name
            from ..distributed import zero_optimizer_state

            opt_state = zero_optimizer_state(self.named, self.opt)
            trainable = opt_state.pop("master")
            opt_state["param_groups"] = [{**g, "params": names} for g, names in
                                         zip(opt_state["param_groups"], self._group_names, strict=True)]
        else:
            trainable = _full_tensors(self.named)
            opt_state = _optimizer_state(self.acc, self.model, self.opt)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(trainable, tmp / "trainable.safetensors")
            torch.save(opt_state, tmp / "optimizer.pt")
            torch.save(self.sched.state_dict(), tmp / "scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        acc.wait_for_everyone()
        if stage in (1, 2):  # ZeRO-1/2 load only these: each process its partition of the optimizer state
            torch.save(self.opt.optimizer.state_dict(), tmp / f"optimizer_{acc.process_index}.pt")
        self.save_adapter(tmp / "adapter")
        torch.save(rng_snapshot(self._rng), tmp / f"rng_{acc.process_index}.pt")
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
            if set(tensors) != {n for n, _ in self.named}:
                raise KeyError(sorted(set(tensors) ^ {n for n, _ in self.named})[:3])
            with torch.no_grad():
                _load_full(self.named, tensors)
            stage, partitions = _zero_stage(self.acc), len(list(folder.glob("optimizer_*.pt")))
            if stage in (1, 2):
                # ZeRO-1/2 map each parameter to its slice of the optimizer state when they partition it, before any
                # state exists, so a name-keyed state cannot be written into them: only their own per-process files
                mine = folder / f"optimizer_{self.acc.process_index}.pt"
                if partitions != self.acc.num_processes or not mine.is_file():
                    raise _Refused(f"{folder} holds {partitions or 'no'} ZeRO-1/2 optimizer partition(s), this "
                                   f"ZeRO-{stage} run has {self.acc.num_processes} processes: ZeRO-1/2 load only "
                                   f"their own per-process partitions, on the same number of processes (they cannot "
                                   f"take the checkpoint's name-keyed optimizer state)",
                                   "resume with --distributed zero3, ddp or fsdp (any number of processes), or "
                                   "with zero2 on the number of processes that saved it")
                self.opt.optimizer.load_state_dict(torch.load(mine, weights_only=False, map_location="cpu"))
            elif partitions and not (folder / "optimizer.pt").is_file():  # an older ZeRO-1/2 checkpoint: partitions only
                raise _Refused(f"{folder} was saved by a DeepSpeed ZeRO-1/2 run on {partitions} processes: its "
                               f"optimizer state is per-process partitions, which only that engine on that number "
                               f"of processes can load", f"resume it under torchrun --nproc_per_node {partitions} "
                               f"with --distributed zero2 (ZeRO-3 checkpoints resume on any number of processes)")
            else:
                saved = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
                if stage == 3:  # the name-keyed state of a run on any number of processes, DDP/FSDP2 or ZeRO
                    from ..distributed import load_zero_optimizer_state

                    load_zero_optimizer_state(self.named, self.opt, {**saved, "master": tensors})
                else:
                    _load_optimizer_state(self.model, self.opt, saved)
        except _Refused as e:
            raise TrainingStopped(e.args[0], e.args[1], exit_code=2) from None
        except (KeyError, RuntimeError, ValueError, OSError) as e:
            raise TrainingStopped(f"the checkpoint in {folder} does not fit this model and method ({type(e).__name__}: "
                                  f"{str(e)[:200]})", "resume with the run's own options (drop method flags), or "
                                  "start a new run with --overwrite", exit_code=2) from None
        self.sched.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        if self.acc.scaler is not None and (folder / "scaler.pt").is_file():
            self.acc.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
        self.state = State(**json.loads((folder / "state.json").read_text()))
        self.state.global_batch = self.global_batch
        # each process its own RNG; a process the saving run did not have continues from the main one's
        rng = folder / f"rng_{self.acc.process_index}.pt"
        rng_restore(torch.load(rng if rng.is_file() else folder / "rng_0.pt", weights_only=True))
        self._rng = rng_state()

    # evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        st = self.state
        m = run_eval(self.acc.unwrap_model(self.model), self.task, self.eval_feats, self.args["batch_size"], self.acc)
        st.last_eval_step = st.step
        value = m.get(self.task.metric, m.get("eval_loss"))
        better = st.best is None or (value > st.best if self.task.greater_is_better else value < st.best)
        if better and math.isfinite(value):
            st.best, st.best_step = value, st.step
            self.save_adapter(self.out / "adapter")
        if self.acc.is_main_process:
            self.log.write({"step": st.step, "epoch": round(st.epoch + st.batch / max(1, self.steps_per_epoch), 4),
                            **m, "best": st.best_step == st.step})
        self.acc.wait_for_everyone()
        return m

    # the loop ------------------------------------------------------------------------------------------------
    def _on_sigint(self, *_):
        now = time.monotonic()
        if self._stop and now - self._stop_at > SAME_CTRL_C_S:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if self._stop:  # the same Ctrl-C again: a terminal signals every process and torchrun forwards it too
            return
        self._stop, self._stop_at = True, now
        if self.acc.is_main_process:
            print("\nCtrl-C: finishing this step and saving a resumable checkpoint (Ctrl-C again to abort)",
                  flush=True)

    def run(self, bar) -> State:
        """Per-step values stay on the device (StepStats); the host reads them only at a logging, evaluation or
        checkpoint boundary, on an interrupt and at the end, and each read first stops on a non-finite step, so
        nothing (checkpoint, best adapter, final adapter) is written after one."""
        st, acc, args = self.state, self.acc, self.args
        self.model.train()
        stop_at = int(os.environ.get("UNIPEFT_STOP_AT_STEP", "0") or 0)  # tests: an interrupt at a known step
        old = signal.signal(signal.SIGINT, self._on_sigint) if _main_thread() else None
        t0, tokens = time.time(), 0
        self._stats = StepStats(acc.device)
        try:
            while st.step < self.total:
                epoch, groups = st.epoch, self.global_batches(st.epoch)
                while st.epoch == epoch and st.step < self.total:
                    loss, ntok = self.train_step(self.my_micro_batches(groups[st.batch]))
                    st.step += 1
                    st.batch += 1
                    self._rng = rng_state()  # each step (host only): a mid-step abort must save this one
                    self._stats.add(loss)
                    tokens += ntok
                    stopping = self._agreed_stop or (stop_at and st.step == stop_at)
                    saving = st.step % args["save_every"] == 0 and st.step < self.total
                    logging = st.step % args["log_every"] == 0 or st.step == self.total
                    epoch_pos = round(st.epoch + st.batch / len(groups), 4)
                    if st.batch >= len(groups):
                        st.epoch, st.batch = st.epoch + 1, 0
                    ev = args["eval_every"]
                    evaluating = self.eval_feats and ((ev and st.step % ev == 0) or (not ev and st.batch == 0)
                                                      or st.step == self.total)
                    bar.update(1)
                    if logging or evaluating or saving or stopping:
                        r = self._read_stats()  # one host sync; raises on a non-finite step
                        rate = tokens / max(time.time() - t0, 1e-9)
                        lr = self.sched.get_last_lr()[0]
                        bar.set_postfix(loss=f"{r.last:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                        if logging:
                            if acc.is_main_process:
                                self.log.write({"step": st.step, "epoch": epoch_pos, "loss": r.window_mean,
                                                "lr": lr, "tokens_per_s": rate,
                                                "elapsed_s": round(st.elapsed_s + time.time() - t0, 2)})
                            self._stats.new_window()
                    if evaluating:
                        self.evaluate()
                    if saving:
                        self.save_checkpoint()
                    if stopping:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            st.elapsed_s += time.time() - t0
            self._read_stats()  # a non-finite step since the last read: stop with it, write nothing
            self.save_checkpoint()
            if not self.eval_feats:
                self.save_adapter(self.out / "adapter")
            raise TrainingStopped(f"interrupted at step {st.step}/{self.total}; a resumable checkpoint is in "
                                  f"{self.out / CKPT}", f"continue with: unipeft train --output {self.out} --resume",
                                  exit_code=130) from None
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        st.elapsed_s += time.time() - t0
        self._read_stats()
        if not self.eval_feats:
            self.save_adapter(self.out / "adapter")
        self.save_checkpoint()
        return st

    def _read_stats(self):
        """The device-side step values on the host (one sync); stops training on a non-finite loss or gradient
        norm, naming its step, before anything is written."""
        r = self._stats.read()
        if r.last is not None:
            self.state.train_loss = r.last
        if r.bad_step is not None:
            self._nonfinite(r.bad_value, what=r.bad_what, step=r.bad_step)
        return r

    def train_step(self, micro: list[tuple[list[int], float]]) -> tuple[torch.Tensor, int]:
        """One optimizer step over this process's weighted micro-batches; gradients are reduced across processes
        only in the last backward (no_sync before it). Returns the step's loss as a device tensor (no host read
        with one process) and the run's tokens of the step."""
        acc, ntok, losses, step_loss = self.acc, 0, [], None
        for i, (idx, weight) in enumerate(micro):
            feats = [self.train_feats[j] for j in idx]
            batch = self.collate(feats)
            batch.pop("num_tokens", None)  # packed rows (no attention_mask): counted from the features below
            batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            sync = i == len(micro) - 1
            acc.sync_gradients = sync  # DeepSpeed steps at a boundary only; Accelerate's optimizer steps likewise
            with (nullcontext() if sync else _no_sync(acc, self.model)), acc.autocast():
                loss = self.model(**batch).loss
                acc.backward(loss * weight)
            losses.append(loss.detach().float())
            step_loss = losses[-1] * weight if step_loss is None else step_loss + losses[-1] * weight
            # every collate's attention mask (or packed row) covers exactly the features' tokens: counted on the host
            ntok += sum(len(f["input_ids"]) for f in feats) if weight else 0
        step = self.state.step + 1
        if acc.num_processes > 1:
            # one collective (and one host read) per step for what every process must agree on: the step's loss
            # (the mean of its micro-batch losses; the weights sum to N over the processes), the tokens of all
            # processes (the logged rate is the run's), whether any process saw Ctrl-C (all stop after the same
            # step, or one would wait in a collective forever), and whether any loss was not finite (all stop)
            own = torch.stack(losses)
            bad = (~torch.isfinite(own)).any().to(torch.float64)
            t = torch.stack([step_loss.to(torch.float64), _full(ntok, acc.device), _full(float(self._stop), acc.device),
                             bad])
            t = acc.reduce(t, "sum")
            total, ntok, stop, nbad = t.tolist()
            self._agreed_stop = stop > 0
            if nbad > 0:
                self._nonfinite(next((x for x in own.tolist() if not math.isfinite(x)), float("nan")), step=step)
            step_loss, ntok = t[0] / acc.num_processes, int(ntok)
        else:
            self._stats.check(step, torch.stack(losses), "loss")
            self._agreed_stop = self._stop
        if self.args["max_grad_norm"]:
            norm = acc.clip_grad_norm_([p for _, p in self.named], self.args["max_grad_norm"])
            # fp16's loss scaler skips steps with inf gradients by design; elsewhere they are fatal
            # (DeepSpeed clips inside its own step and returns no norm here). The norm is the same on every
            # process (reduced gradients, or FSDP2's norm over all shards), so the deferred check agrees.
            if hasattr(norm, "full_tensor"):  # a DTensor (FSDP2): the norm over every shard
                norm = norm.full_tensor()
            if norm is not None and acc.scaler is None:
                self._stats.check(step, torch.as_tensor(norm, device=acc.device), "gradient norm")
        # a non-finite loss or norm no longer stops this step's update (that would need a host read): the step's
        # parameters are never written, since every boundary reads the flags first and stops (see run)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return step_loss, ntok

    def _nonfinite(self, value: float, what: str = "loss", step: int | None = None):
        st = self.state
        kept = (f"the last good checkpoint is step {st.last_saved_step} in {self.out / CKPT}"
                if st.last_saved_step is not None else "no checkpoint had been saved yet")
        raise TrainingStopped(f"the {what} became {value} at step {step or st.step + 1}; training stopped and {kept}"
                              + (f"; the best adapter (step {st.best_step}) is in {self.out / 'adapter'}"
                                 if st.best_step is not None else ""),
                              "lower --lr (or raise --warmup, or use --precision fp32), then rerun "
                              + (f"or continue with --resume" if st.last_saved_step is not None else ""),
                              exit_code=3)


def _is_fsdp2(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _no_sync(acc, model):
    """Accelerate's no_sync, and FSDP2's own switch for a model sharded outside Accelerate (a CPU launch)."""
    if _is_fsdp2(model) and not acc.is_fsdp2:
        return _fsdp2_no_sync(model)
    return acc.no_sync(model)


@contextmanager
def _fsdp2_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _gathered(params):
    """DeepSpeed ZeRO-3 keeps each parameter partitioned; its public context gathers them (a collective)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return nullcontext()


def _full_tensors(named) -> dict[str, torch.Tensor]:
    """The trainable tensors whole, on the CPU (FSDP2 shards and ZeRO-3 partitions are gathered: collectives, so
    every process calls)."""
    from torch.distributed.tensor import DTensor

    with _gathered([p for _, p in named]):
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().contiguous().clone()
                for n, p in named}


def _load_full(named, tensors: dict[str, torch.Tensor]) -> None:
    """Each trainable parameter <- its whole tensor: FSDP2 keeps its shard, ZeRO-3 writes on rank 0 inside DeepSpeed's
    gathering context and partitions again (a collective: every process calls, same order)."""
    from ..distributed import assign_full

    for n, p in named:
        assign_full(p, tensors[n])


class _Refused(Exception):
    """(problem, fix): a checkpoint this engine or process count cannot resume."""


def _zero_stage(acc) -> int | None:
    """The DeepSpeed ZeRO stage of this run, None without DeepSpeed."""
    plugin = acc.state.deepspeed_plugin
    return None if plugin is None else int(plugin.zero_stage)


def _optimizer_state(acc, model, opt) -> dict:
    """The optimizer state keyed by parameter name, whole tensors: loadable on any number of processes and
    whatever wraps the model (DDP, FSDP2; torch's distributed-checkpoint API gathers FSDP2 shards). DeepSpeed
    ZeRO has its own: unipeft.distributed.zero_optimizer_state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt.optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))


def _load_optimizer_state(model, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt.optimizer, state, options=StateDictOptions(full_state_dict=True))


def _full(value: float, device) -> torch.Tensor:
    """A float64 scalar made on the device by a fill kernel (torch.tensor(x, device=cuda) copies from pageable host
    memory, which waits for the stream)."""
    return torch.full((), float(value), dtype=torch.float64, device=device)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

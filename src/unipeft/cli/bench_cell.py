"""One cell of `unipeft bench` (a task x a method x an implementation x a seed), run in its own process.

The bench's forkserver preloads this module (torch, transformers, unipeft), so each cell starts without the
import cost and gives all its memory back when it exits. Rows are encoded and scored by the CLI's task classes
(cli/tasks.py, cli/lm.py) and evaluated by the CLI's `run_eval` / `generation_eval`. The training loop is the
shared protocol (bench_plan.py) written out here rather than the CLI's Trainer, because the full fine-tuning and
HF PEFT rows must run through the same loop, and the Trainer checkpoints whole trainable sets (135M parameters
for full fine-tuning) that a bench does not need. The loss is computed here from the logits, the same way for
every row: implementations that keep virtual-token positions in their logits (HF PEFT's prompt methods) are
aligned by cutting those leading positions.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sleep at OpenMP barriers: the CPU is shared
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import unipeft  # noqa: E402,F401  (registers the methods)

from . import bench_plan as BP  # noqa: E402
from . import options as O  # noqa: E402
from .data import read_rows  # noqa: E402
from .evaluate import generation_eval, run_eval  # noqa: E402
from .modeling import load_model, load_tokenizer  # noqa: E402
from .schedule import linear_schedule  # noqa: E402
from .task_table import task_class  # noqa: E402


# Resolved here, in the forkserver, so that each cell's process starts with them loaded (transformers imports
# model and tokenizer modules lazily, which cost seconds per cell on a busy CPU)
from transformers import (AutoTokenizer, BertForSequenceClassification, BertForTokenClassification,  # noqa: E402,F401
                          LlamaForCausalLM, PreTrainedTokenizerFast)


class Refused(Exception):
    """The implementation refuses this method on this model/task: the cell cannot exist (the reason is kept)."""


def model_path(model: str) -> str:
    from .embedded import embedded_path, minilm_path

    return str({"minilm": minilm_path, "smollm2": embedded_path}[model]())


def seed_all(seed: int) -> None:
    """random, numpy and torch (every device) seeded, the RNGs transformers.set_seed seeds. Not that function: its
    first call imports transformers.trainer_utils, which imports HF PEFT when installed (so every cell, ours too,
    ran with HF PEFT loaded) and costs ~1.8 CPU seconds per cell."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rows(task: BP.TaskPlan, budget: BP.Budget, data_dir: Path) -> tuple[list[dict], list[dict], str]:
    folder = data_dir / task.folder
    train_path, eval_path = folder / task.train_file, folder / task.eval_file
    for p in (train_path, eval_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (data dir {data_dir}); pass --data-dir DIR holding {task.folder}/")
    train = _head(train_path, budget.train_rows)
    if task.eval_from_end:
        rows = read_rows(str(eval_path), "--eval")
        ev = rows[-budget.eval_rows:]
        if len(rows) - budget.eval_rows < budget.train_rows:
            raise ValueError(f"{eval_path}: train and eval rows overlap (fewer than {budget.train_rows} + "
                             f"{budget.eval_rows} rows)")
    elif task.distinct_eval_key:
        seen, ev = set(), []
        for r in read_rows(str(eval_path), "--eval"):
            if r[task.distinct_eval_key] not in seen:
                seen.add(r[task.distinct_eval_key])
                ev.append(r)
            if len(ev) >= budget.eval_rows:
                break
    else:
        ev = read_rows(str(eval_path), "--eval", budget.eval_rows)
    if task.prompt:
        conv = lambda r: {"instruction": task.prompt.format(**r), "output": r[task.response]}  # noqa: E731
        train, ev = [conv(r) for r in train], [conv(r) for r in ev]
    return train, ev, str(train_path)


def _head(path: Path, n: int) -> list[dict]:
    """The first n rows of a JSONL file, without reading the rest (SST-2 train has 67k rows)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(rows) >= n:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


class Aligned(torch.nn.Module):
    """The model with logits lined up with input_ids: leading virtual-token positions (if any) cut."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        logits, T = out.logits, inputs["input_ids"].shape[1]
        if logits.dim() == 3 and logits.shape[1] > T:
            logits = logits[:, -T:]
        return transformers.modeling_outputs.ModelOutput(logits=logits)

    def generate(self, **kw):
        return self.model.generate(**kw)

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)


def task_loss(cli_task: str, logits, labels):
    """The same loss for every row: cross-entropy over classes, tags (-100 ignored) or next tokens."""
    if cli_task == "seq-cls":
        return F.cross_entropy(logits.float(), labels)
    if cli_task == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _build(plan: BP.MethodPlan, impl: str, task: BP.TaskPlan, model):
    if plan.method is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, {}
    if impl == "unipeft":
        from .. import get_peft_model

        options = plan.options_for(task.model)
        try:
            cfg = O.build_method_config(plan.method, task.cli_task, options)
            return get_peft_model(model, cfg), options
        except Exception as e:  # the library's own refusal: this cell cannot exist
            raise Refused(f"unipeft refuses {plan.method} here: {_msg(e)}") from None
    try:
        import peft  # HF PEFT: a dev dependency, imported only for its reference rows
    except ImportError:
        raise Refused("HF PEFT is not installed (pip install peft): its reference row needs it") from None
    options = plan.hf_options_for(task.model)
    try:
        cfg = getattr(peft, plan.hf_config)(task_type=O.TASK_TYPES[task.cli_task], **options)
        return peft.get_peft_model(model, cfg), options
    except Exception as e:
        raise Refused(f"HF PEFT {peft.__version__} refuses {plan.hf_config}({_fmt(options)}) here: {_msg(e)}") from None


def _msg(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _fmt(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _probe(model, task, feats, cli_task, impl: str):
    """One forward + backward on two rows before training. HF PEFT objects to some models only in the forward
    (prefix tuning on BERT: "Model does not support past key values"): its ValueError there is its refusal and
    the cell gets that reason. Anything else failing here (and any failure of our own rows) is a failure."""
    batch = task.collate(feats[:2])
    labels = batch.pop("labels")
    try:
        task_loss(cli_task, Aligned(model)(**batch).logits, labels).backward()
    except (ValueError, NotImplementedError) as e:
        if impl != "peft":
            raise
        raise Refused(f"HF PEFT fails in its first forward: {_msg(e)}") from None
    model.zero_grad(set_to_none=True)


def train(model, task, feats, budget: BP.Budget, lr: float, seed: int, cli_task: str) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, eps=BP.ADAM_EPS, weight_decay=0.0)
    steps = budget.steps
    sched = linear_schedule(opt, math.ceil(BP.WARMUP_RATIO * steps), steps)
    perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed)).tolist()
    aligned = Aligned(model).train()
    losses, t0 = [], time.perf_counter()
    for s in range(steps):
        batch = task.collate([feats[i] for i in perm[s * budget.batch_size:(s + 1) * budget.batch_size]])
        labels = batch.pop("labels")
        loss = task_loss(cli_task, aligned(**batch).logits, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {float(loss)} at step {s + 1}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, BP.MAX_GRAD_NORM)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 4):]
    return {"steps": steps, "train_s": round(train_s, 3), "s_per_step": round(train_s / steps, 4),
            "first_loss": losses[0], "last_loss": sum(tail) / len(tail)}


def _merged_eval(model, encoder, feats, budget, before: dict, metric: str) -> dict:
    """Inference latency after merging (the LoRA paper's claim): the same evaluation on merge_and_unload()'s
    model, where the implementation can merge this method; its eval loss (and the metric, when the evaluation
    pass computes it; BLEU comes from generation) must equal the unmerged ones."""
    merge = getattr(model, "merge_and_unload", None)
    if merge is None:
        return {}
    try:
        merged = merge()
    except Exception as e:  # a method that does not merge (prompts, non-linear adapters): its own message
        return {"merge": f"not mergeable: {_msg(e)[:200]}"}
    t0 = time.perf_counter()
    after = run_eval(Aligned(merged), encoder, feats, budget.batch_size * 2)
    out = {"eval_merged_s": round(time.perf_counter() - t0, 3),
           "merged_eval_loss_delta": after["eval_loss"] - before["eval_loss"]}
    if metric in after and metric in before:
        out["merged_metric_delta"] = after[metric] - before[metric]
    return out


def _cpu_s() -> float:
    """CPU seconds of this process, all its threads, user + system. A cell's process is forked from the forkserver
    and the kernel starts a child's counts at zero, so this is the cell's own cost (the preloaded imports are not
    in it). CPU seconds, unlike wall seconds, do not grow when other jobs share the cores."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Phases:
    """CPU seconds per phase of a cell (setup, probe, train, eval, gen, merged_eval), to show fixed costs."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self._t = _cpu_s()

    def done(self, name: str) -> None:
        t = _cpu_s()
        self.cpu[name] = round(self.cpu.get(name, 0.0) + t - self._t, 3)
        self._t = t


def run(spec: dict, phases: _Phases | None = None) -> dict:
    phases = phases or _Phases()
    task, plan = BP.TASKS[spec["task"]], BP.METHODS[spec["row"]]
    budget, impl, seed = task.budgets[spec["budget"]], spec["impl"], spec["seed"]
    torch.set_num_threads(spec.get("threads") or 2)
    path = model_path(task.model)
    tok = load_tokenizer(path, task.cli_task)
    train_rows, eval_rows, train_src = _rows(task, budget, Path(spec["data_dir"]))
    encoder = task_class(task.cli_task).from_data(tok, budget.max_length, train_rows, Path(train_src).name,
                                                  {"train": train_src})
    train_feats, _ = encoder.encode(train_rows, "train")
    eval_feats, _ = encoder.encode(eval_rows, "eval")
    seed_all(seed)
    model = load_model(path, encoder, tok)
    total = sum(p.numel() for p in model.parameters())
    model, options = _build(plan, impl, task, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    phases.done("setup")  # tokenizer, rows, encoding, model load, method wrapping
    _probe(model, encoder, train_feats, task.cli_task, impl)
    phases.done("probe")
    seed_all(seed)
    lr = plan.lr_for(task.name)
    out = {"status": "ok", "trainable": trainable, "base_params": total, "trainable_pct": 100 * trainable / total,
           "lr": lr, "options": options}
    out.update(train(model, encoder, train_feats, budget, lr, seed, task.cli_task))
    phases.done("train")
    t0 = time.perf_counter()
    metrics = run_eval(Aligned(model), encoder, eval_feats, budget.batch_size * 2)
    out["eval_s"] = round(time.perf_counter() - t0, 3)
    phases.done("eval")
    if budget.gen_rows and encoder.generates:
        t0 = time.perf_counter()
        g, pairs = generation_eval(Aligned(model), encoder, tok, eval_feats, budget.gen_rows, budget.max_new_tokens,
                                   budget.batch_size)
        metrics.update(g)
        out["gen_s"] = round(time.perf_counter() - t0, 3)
        out["samples"] = [{"prediction": p, "reference": r} for p, r in pairs[:2]]
        phases.done("gen")
    out.update(_merged_eval(model, encoder, eval_feats, budget, dict(metrics), task.metric))
    phases.done("merged_eval")
    out["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    out["metric"] = metrics.get(task.metric)
    if out["metric"] is None:
        raise KeyError(f"the evaluation gave no {task.metric!r} (it gave {sorted(metrics)})")
    return out


def run_cell(spec: dict, out_file: str) -> None:
    """Process entry point: run the cell and write its record atomically (a killed cell leaves no file)."""
    from ..io.atomic import write_text

    rss0, t0, phases = _rss_mb(), time.time(), _Phases()
    try:
        rec = run(spec, phases)
    except Refused as e:
        rec = {"status": "n/a", "reason": str(e)}
    except Exception as e:  # a failure, not a cell that cannot exist: reported as such, rerun on resume
        rec = {"status": "failed", "reason": _msg(e), "traceback": traceback.format_exc()[-3000:]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec.update(spec=spec, fingerprint=spec.get("fingerprint"), wall_s=round(time.time() - t0, 2),
               cpu_s=round(_cpu_s(), 2), cpu_phases_s=phases.cpu, peak_rss_mb=round(peak, 1),
               peak_mem_mb=round(peak - rss0, 1), versions=_versions())
    write_text(Path(out_file), json.dumps(rec, indent=1, default=str) + "\n")


def _versions() -> dict:
    import sys

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "unipeft": unipeft.__version__}
    if "peft" in sys.modules:
        out["peft"] = sys.modules["peft"].__version__
    return out

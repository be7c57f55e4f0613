"""`unipeft train`: resolve options, read and encode data, build the adapted model, run the loop, report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from datetime import datetime
from pathlib import Path

from . import options as O
from .data import read_rows
from .errors import CliError
from .evaluate import generation_eval, run_eval
from .fast_path import apply_liger_or_explain, base_dtype, trainable_in_fp32
from .loop import CKPT, Trainer
from .modeling import infer_task, load_model, load_quantized_model, load_tokenizer, resolve_model
from .packing import check_isolation, collate_packed, pack, refuse_virtual_tokens
from .report import MetricsLog, box, fmt_metrics, human, plot_losses, size_of, write_json
from .task_table import task_class

logger = logging.getLogger("unipeft.cli")
RUN_FILES = ("run.yaml", "metrics.jsonl", "eval_results.json", "loss.png", "adapter", CKPT, f".{CKPT}.tmp", "labels.json")
TASK_FILE = "unipeft_task.json"


def prepare_output(opts: dict) -> Path:
    """Check the output folder before any work; nothing is written or cleared yet."""
    out = Path(opts["output"])
    if opts["resume"]:
        if not (out / CKPT / "state.json").is_file():
            raise CliError(f"nothing to resume in {out}: no {CKPT}/ folder from an earlier run",
                           "drop --resume to start a new run, or point --output at the run to continue")
    elif _has_run(out) and not opts["overwrite"]:
        raise CliError(f"--output {out} already holds a run (run.yaml / adapter / checkpoint)",
                       "pass --resume to continue it, --overwrite to replace it, or choose another --output")
    return out


def claim_output(out: Path, opts: dict) -> None:
    """Clear the old run for --overwrite and create the folder (main process), once the setup has succeeded:
    a bad column or option then leaves the folder as it was, not emptied or half-made."""
    if _has_run(out) and not opts["resume"]:
        for f in RUN_FILES:
            p = out / f
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _has_run(out: Path) -> bool:
    return any((out / f).exists() for f in ("run.yaml", CKPT, "adapter", "metrics.jsonl"))


_SET_BY_PLUGIN: set[str] = set()


def make_accelerator(precision: str, distributed: str | None = None, batch_size: int = 1, max_grad_norm: float = 0.0):
    """Accelerate's Accelerator for this launch. One process: plain. Launched on several (torchrun or `accelerate
    launch`, WORLD_SIZE > 1): DDP by default, `--distributed fsdp` FSDP2, `zero2`/`zero3` DeepSpeed; an
    `accelerate launch --config_file` choice (ACCELERATE_USE_FSDP / _DEEPSPEED, ACCELERATE_MIXED_PRECISION) is
    kept, and contradicting it is an error."""
    import os

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    flag = lambda k: k not in _SET_BY_PLUGIN and os.environ.get(k, "false").lower() in ("1", "true", "yes")  # noqa: E731
    configured = "fsdp" if flag("ACCELERATE_USE_FSDP") else "deepspeed" if flag("ACCELERATE_USE_DEEPSPEED") else None
    wanted = {"fsdp": "fsdp", "zero2": "deepspeed", "zero3": "deepspeed", "ddp": None}.get(distributed or "", configured)
    if distributed and configured and wanted != configured:
        raise CliError(f"--distributed {distributed} contradicts the Accelerate config this was launched with "
                       f"(it enables {configured})", "drop --distributed to use the config's engine, or launch with "
                       "a config (or torchrun) that matches it")
    cpu_engine = wanted and not torch.cuda.is_available()
    if cpu_engine and configured:
        # Accelerate (1.15) sets FSDP and DeepSpeed up only for GPU-type launches: from a config on CPU, FSDP would
        # silently become DDP and DeepSpeed N independent one-process runs
        raise CliError(f"an Accelerate config with {'FSDP' if wanted == 'fsdp' else 'DeepSpeed'} needs GPUs "
                       f"(Accelerate runs a CPU launch as DDP only)", "on CPU launch with torchrun and pass "
                       "--distributed fsdp|zero2|zero3 (torch's FSDP2 / DeepSpeed's CPU accelerator), or run on GPUs")
    if cpu_engine and wanted == "deepspeed":
        _cpu_deepspeed(distributed)
    kw: dict = {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=False)]}
    if precision == "auto" and os.environ.get("ACCELERATE_MIXED_PRECISION"):
        mp = None  # the launch config's choice
    else:
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}.get(precision)
        if precision == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mp == "fp16" and not torch.cuda.is_available():
        raise CliError("--precision fp16 needs a GPU", "use --precision bf16 or fp32 on CPU")
    if mp is not None:
        kw["mixed_precision"] = mp
    if cpu_engine and wanted == "deepspeed":
        from accelerate.utils import InitProcessGroupKwargs

        # Accelerate starts DeepSpeed's process group only for a non-CPU launch, and with no backend named it counts
        # the processes as 1 (each would think it is the main one): name gloo
        kw["kwargs_handlers"].append(InitProcessGroupKwargs(backend="gloo"))
    elif not torch.cuda.is_available():
        kw["cpu"] = True  # Accelerate sets up gloo for a CPU launch only when told it is one
    if distributed == "fsdp" and not configured and not cpu_engine:  # on CPU: shard_for_cpu_fsdp, after the model
        from accelerate import FullyShardedDataParallelPlugin

        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2)
    elif distributed in ("zero2", "zero3") and not configured:
        from accelerate import DeepSpeedPlugin

        kw["deepspeed_plugin"] = DeepSpeedPlugin(zero_stage=int(distributed[-1]))
    launched = int(os.environ.get("WORLD_SIZE") or 0)  # torchrun / accelerate launch (mpirun sets PMI_SIZE)
    before = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")}
    acc = Accelerator(**kw)
    # Accelerator sets ACCELERATE_USE_* for a plugin it is given: a later run in this process (tests, notebooks)
    # must not read them as a launch config
    _SET_BY_PLUGIN.update(k for k, v in before.items() if v is None and os.environ.get(k) is not None)
    if launched and acc.num_processes != launched:  # never N independent runs racing on one output folder
        raise CliError(f"launched on {launched} processes but Accelerate set up {acc.num_processes} "
                       f"({acc.distributed_type})", "launch with torchrun or accelerate launch on a supported device")
    if acc.state.deepspeed_plugin is not None:
        # the loop accumulates and weights micro-batches itself (see loop.py); DeepSpeed steps at each boundary
        cfg = acc.state.deepspeed_plugin.deepspeed_config
        cfg["train_micro_batch_size_per_gpu"] = batch_size
        cfg["gradient_accumulation_steps"] = 1
        cfg.pop("train_batch_size", None)
        cfg["gradient_clipping"] = max_grad_norm or 0.0
    return acc


def _cpu_deepspeed(distributed: str) -> None:
    """DeepSpeed on CPU: its CPU accelerator (DS_ACCELERATOR=cpu), under a launcher that gives every process its rank."""
    import os
    import sys

    if int(os.environ.get("LOCAL_RANK", -1)) == -1:
        raise CliError(f"--distributed {distributed} on CPU runs DeepSpeed under a launcher",
                       f"launch with torchrun --nproc_per_node N -m unipeft.cli train ... --distributed {distributed}")
    chosen = os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if chosen != "cpu" or "deepspeed" in sys.modules and _ds_accelerator() != "cpu":
        raise CliError(f"--distributed {distributed} on a machine without CUDA needs DeepSpeed's CPU accelerator, "
                       f"but DS_ACCELERATOR={chosen}", "unset DS_ACCELERATOR (or set it to cpu)")


def _ds_accelerator() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def shard_for_cpu_fsdp(peft, acc, distributed: str | None):
    """`--distributed fsdp` where Accelerate will not set FSDP up (a CPU launch): torch's own FSDP2, `fully_shard`
    on every block and the root (unipeft.distributed.shard_fsdp2) over the launch's processes. One process without
    a launcher runs unsharded (the same computation; e.g. resuming a sharded run on one process)."""
    import torch.distributed as dist

    if distributed != "fsdp" or acc.is_fsdp2 or not dist.is_initialized():
        return peft
    from torch.distributed.device_mesh import init_device_mesh

    from ..distributed import shard_fsdp2

    try:
        return shard_fsdp2(peft, mesh=init_device_mesh("cpu", (acc.num_processes,)))
    except ValueError as e:
        raise CliError(f"--distributed fsdp: {e}", "use --distributed ddp for this model") from None


@contextlib.contextmanager
def _whole_base(acc):
    """ZeRO-3: the base is loaded whole on every process and partitioned when the engine is prepared, not loaded
    partitioned (transformers' zero.Init loading, on while Accelerate's ZeRO-3 config is registered): adapters are
    built from the base's weights (a task head's trainable copy, initializations reading the weight), which a
    partitioned base holds as empty tensors."""
    plugin = acc.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3 or getattr(plugin, "dschf", None) is None:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def load_data(opts, tok, task_name):
    train_rows = read_rows(opts["train"], "--train", opts["max_train_samples"])
    src = Path(opts["train"]).name
    task = task_class(task_name).from_data(tok, opts["max_length"], train_rows, src, opts)
    train_feats, t_trunc = task.encode(train_rows, src)
    eval_feats, e_trunc = [], 0
    if opts["eval"]:
        eval_rows = read_rows(opts["eval"], "--eval", opts["max_eval_samples"])
        esrc = Path(opts["eval"]).name
        task.check_columns(eval_rows, esrc)
        eval_feats, e_trunc = task.encode(eval_rows, esrc)
    return task, train_feats, eval_feats, (t_trunc, e_trunc)


def method_config(opts, model, task_name):
    """The method's config; target_roles (a method default) become target_modules from the architecture table."""
    from .. import methods

    info = methods().get(opts["method"])
    mopts = dict(opts.get("method_options") or {})
    roles = opts.get("target_roles")
    fields = O.method_fields(info) if info else {}
    if roles and "target_modules" in fields and "target_modules" not in mopts:
        from ..arch import find_arch
        from ..arch.resolve import default_targets

        try:
            mopts["target_modules"] = list(default_targets(model, find_arch(model), tuple(roles)))
        except (ValueError, KeyError):
            pass  # unknown architecture: the method's own default (or its clear error) applies
    return O.build_method_config(opts["method"], task_name, mopts)


def adapter_saver(peft, task, opts, model_spec, acc):
    """Called on every process: save_pretrained gathers sharded tensors (a collective) and the main process writes."""
    def save(folder: Path):
        folder = Path(folder)
        peft.save_pretrained(folder, is_main_process=acc.is_main_process)
        if acc.is_main_process:
            meta = {"task": task.name, "method": opts["method"], "model": model_spec,
                    "max_length": opts["max_length"], **task.meta}
            (folder / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        acc.wait_for_everyone()
    return save


def train_command(opts: dict) -> int:
    t_start = time.time()
    if not opts.get("train"):
        raise CliError("no training data given", "pass --train FILE (.jsonl, .csv, .tsv, .parquet)")
    opts["output"] = opts.get("output") or f"runs/{opts['method']}-{opts.get('task') or 'auto'}-" \
                                           f"{datetime.now():%Y%m%d-%H%M%S}"
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .. import get_peft_model

    model_path = resolve_model(opts.get("model"))
    task_name = opts.get("task") or infer_task(model_path)
    if opts.get("packing") and task_name != "causal-lm":
        raise CliError(f"--packing is for causal-lm training, not {task_name}", "drop --packing")
    acc = make_accelerator(opts["precision"], opts.get("distributed"), opts["batch_size"], opts["max_grad_norm"])
    out = prepare_output(opts)
    if opts.get("stream_layers") and not (opts.get("quantize") == "nf4" and opts["gradient_checkpointing"]):
        raise CliError("--stream-layers streams NF4 layers and recomputes them in backward",
                       "add --quantize nf4 --gradient-checkpointing, or drop --stream-layers")
    set_seed(opts["seed"])
    tok = load_tokenizer(model_path, task_name)
    task, train_feats, eval_feats, (t_trunc, e_trunc) = load_data(opts, tok, task_name)
    built = ""
    if opts.get("quantize"):
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
        model, built = load_quantized_model(model_path, task, tok, opts["quantize"], dtype, acc.device,
                                            stream=bool(opts.get("stream_layers")))
    else:
        sharded = bool(acc.is_fsdp2 or acc.state.deepspeed_plugin is not None
                       or opts.get("distributed") in ("fsdp", "zero2", "zero3"))
        built = base_dtype(opts.get("base_dtype") or "auto", acc.mixed_precision, acc.device.type, sharded)
        with _whole_base(acc):
            model = load_model(model_path, task, tok, dtype=built)
        built = "" if built == "float32" else f"{built} base"
    liger = apply_liger_or_explain(model, opts.get("liger") or "auto", acc.device.type)
    if opts.get("host_embeddings"):
        from .. import embeddings_on_host
        try:
            embeddings_on_host(model, acc.device)
        except ValueError as e:
            raise CliError(f"--host-embeddings: {e}", "drop --host-embeddings for this model") from None
    cfg = method_config(opts, model, task_name)
    if opts.get("packing"):
        refuse_virtual_tokens(cfg)
    try:
        peft = get_peft_model(model, cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CliError(f"cannot apply {opts['method']} to {model_path}: {e}",
                       "adjust the method options (e.g. --target-modules) or pick another --method") from None
    upcast = trainable_in_fp32(peft)  # fp32 masters for whatever trains, also on a half-precision base
    if upcast:
        logger.info("%d trainable tensor(s) stored in half precision were made fp32", upcast)
    collate, n_examples = None, len(train_feats)
    if opts.get("packing"):
        check_isolation(peft, len(tok))
        train_feats = pack(train_feats, opts["max_length"])
        collate = lambda feats: collate_packed(feats, tok.pad_token_id)  # noqa: E731
    if opts["gradient_checkpointing"]:
        peft.gradient_checkpointing_enable(offload_activations=bool(opts.get("offload_activations")))
    resolved_cfg = {k: v for k, v in peft.peft_config["default"].to_dict().items()
                    if k not in O.BASE_FIELDS and k != "peft_type"}
    run = {"command": "train", **{k: opts.get(k) for k in O.BY_NAME}, "task": task_name,
           "method_options": {k: list(v) if isinstance(v, tuple) else v for k, v in resolved_cfg.items()
                              if k in O.method_fields(O.registry_info(opts["method"]))}}
    run["resume"], run["overwrite"] = False, False
    if acc.is_main_process:
        claim_output(out, opts)
        O.dump_yaml(out / "run.yaml", run)
        if "labels" in task.meta:
            write_json(out / "labels.json", {"id2label": dict(enumerate(task.meta["labels"]))})
    acc.wait_for_everyone()  # the folder exists for every process before any of them trains
    peft = shard_for_cpu_fsdp(peft, acc, opts.get("distributed"))
    save = adapter_saver(peft, task, opts, opts.get("model"), acc)
    resume_step = global_batch = None
    if opts["resume"]:
        saved = json.loads((out / CKPT / "state.json").read_text())
        resume_step, global_batch = saved["step"], saved.get("global_batch")
    log = MetricsLog(out / "metrics.jsonl", keep_until_step=resume_step, active=acc.is_main_process)
    trainer = Trainer(acc, peft, task, train_feats, eval_feats, opts, out, log, save, global_batch=global_batch,
                      collate=collate)
    if opts["resume"]:
        trainer.load_checkpoint()
    trainable, total = peft.get_nb_trainable_parameters()
    if acc.is_main_process:
        print(box("unipeft train", [
            ("model", f"{model_path}" + ("  (embedded default)" if not opts.get("model") else "")),
            ("task", f"{task_name}  ({task.auto_class}; columns {task.meta.get('columns')}"
                     + (f"; format {task.meta['format']}" if task.meta.get("format") else "") + ")"),
            ("method", f"{opts['method']}  {_short_cfg(resolved_cfg)}"),
            ("trainable", f"{human(trainable)} of {human(total)} params ({100 * trainable / total:.3f}%)"),
            ("labels", f"{len(task.meta['labels'])}: {task.meta['labels'][:8]}" if "labels" in task.meta else None),
            ("train data", f"{n_examples:,} examples, {t_trunc:,} truncated to {opts['max_length']} tokens"
                           + (f", packed into {len(train_feats):,} rows ({_fill(train_feats, opts['max_length'])})"
                              if collate else "")),
            ("eval data", f"{len(eval_feats):,} examples, {e_trunc:,} truncated" if eval_feats else "none"),
            ("schedule", f"{trainer.total} steps ({trainer.steps_per_epoch}/epoch) x global batch "
                         f"{trainer.global_batch} (batch {opts['batch_size']} x {acc.num_processes} processes x "
                         f"accumulation {trainer.accum}), lr {opts['lr']:g} {opts['scheduler']}, "
                         f"warmup {trainer.warmup}"),
            ("device", f"{acc.device} x{acc.num_processes} ({_engine(acc, trainer.model)}), precision {acc.mixed_precision}"
                       + (", gradient checkpointing" if opts["gradient_checkpointing"] else "")
                       + (f", {opts['quantize']} base ({built})" if opts.get("quantize") else "")
                       + (f", {built}" if built and not opts.get("quantize") else "") + f", {liger}"
                       + (", embeddings on host" if opts.get("host_embeddings") else "")
                       + (f", {opts['optimizer']}" if (opts.get("optimizer") or "adamw") != "adamw" else "")),
            ("output", str(out) + (f"  (resuming at step {trainer.state.step})" if opts["resume"] else "")),
        ]), flush=True)
    bar = tqdm(total=trainer.total, initial=trainer.state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not acc.is_main_process)
    try:
        state = trainer.run(bar)
    finally:
        bar.close()
    results = final_eval(trainer, peft, task, tok, eval_feats, opts, out, acc)
    results.update({"train_loss": state.train_loss, "steps": state.step, "best_step": state.best_step,
                    "train_runtime_s": round(state.elapsed_s, 2)})
    if acc.is_main_process:
        write_json(out / "eval_results.json", results)
        plot_losses(log.read(), out / "loss.png", f"{opts['method']} · {task_name}")
        print(box("done", [
            ("metrics", fmt_metrics({k: v for k, v in results.items() if k not in ("samples",)})),
            ("adapter", f"{out / 'adapter'}  ({human(size_of(out / 'adapter'))}B"
                        + (f", best eval at step {state.best_step})" if state.best_step is not None else ")")),
            ("files", f"{out}/metrics.jsonl, eval_results.json, loss.png, run.yaml, {CKPT}/"),
            ("time", f"{time.time() - t_start:.1f} s total, {state.elapsed_s:.1f} s training"),
        ]), flush=True)
    return 0


def final_eval(trainer, peft, task, tok, eval_feats, opts, out, acc) -> dict:
    if not eval_feats:
        return {}
    from ..io import load_tensors

    if trainer.state.best_step is not None and trainer.state.best_step != trainer.state.step:
        peft.load_adapter_weights(load_tensors(out / "adapter"), source=str(out / "adapter"))
    m = run_eval(peft, task, eval_feats, opts["batch_size"], acc)
    if task.generates and opts["gen_samples"]:
        g, pairs = generation_eval(peft, task, tok, eval_feats, opts["gen_samples"], opts["max_new_tokens"],
                                   opts["batch_size"], acc)
        m.update(g)
        m["samples"] = [{"prediction": p, "reference": r} for p, r in pairs[:5]]
    return m


def _fill(rows, max_length) -> str:
    return f"{100 * sum(len(r['input_ids']) for r in rows) / (len(rows) * max_length):.1f}% full"


def _engine(acc, model) -> str:
    if acc.num_processes == 1 and acc.state.deepspeed_plugin is None and not acc.is_fsdp2:
        return "one process"
    if acc.state.deepspeed_plugin is not None:
        return f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage}"
    from torch.distributed.fsdp import FSDPModule

    return "FSDP2" if acc.is_fsdp2 or isinstance(acc.unwrap_model(model), FSDPModule) else "DDP"


def _short_cfg(cfg: dict) -> str:
    keep = {k: v for k, v in cfg.items() if v not in (None, False, (), [], {}) and k != "modules_to_save"}
    s = ", ".join(f"{k}={v}" for k, v in list(keep.items())[:6])
    return f"({s})" if s else ""

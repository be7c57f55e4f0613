"""Every option of the CLI, its default and help, and how flags, a YAML file and method defaults combine.

Precedence, lowest first: built-in defaults < the method's recommended defaults < `--config run.yaml` < flags.
Method options (`--r 8`, `--target-modules q_proj,v_proj`, or `--opt key=value`) come from the chosen method's
config dataclass fields, so a newly registered method gets its flags with no change here.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import CliError
from .optim import OPTIMIZERS

TASKS = ("seq-cls", "token-cls", "causal-lm", "seq2seq")
TASK_TYPES = {"seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS", "causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
# Fields every config has that the CLI sets itself (never user options).
BASE_FIELDS = {"task_type", "base_model_name_or_path", "revision", "inference_mode"}


@dataclass(frozen=True)
class Opt:
    name: str  # key in run.yaml (underscores); the flag is --name-with-dashes
    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    commands: tuple = ("train",)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_EVAL = ("train", "eval")
_GEN = ("train", "eval", "generate")
_ALL = ("train", "eval", "generate", "merge")

OPTIONS: tuple[Opt, ...] = (
    Opt("model", str, None, "HF model folder or hub id (default: the embedded SmolLM2-135M-Instruct; for eval/"
        "generate/merge: the adapter's base model)", commands=_ALL),
    Opt("method", str, "lora", "PEFT method (`unipeft methods` lists them); its options appear below as flags"),
    Opt("task", str, None, "task (default: from the model's architecture; for eval/generate/merge: the adapter's)",
        choices=TASKS, commands=_ALL),
    Opt("train", str, None, "training data: .jsonl/.json/.csv/.tsv/.parquet file, or a `datasets` hub name[:split]"),
    Opt("eval", str, None, "evaluation data (same formats); evaluated periodically and at the end", commands=_EVAL),
    Opt("text_column", str, None, "input column, or two comma-separated for sentence pairs (seq2seq: source; "
        "token-cls: the tokens list; causal-lm: plain text, or with --format the turns or prompt column)",
        commands=_EVAL),
    Opt("label_column", str, None, "label column (seq-cls: label; token-cls: tags list; seq2seq: target)",
        commands=_EVAL),
    # chat data and packing (causal-lm)
    Opt("format", str, None, "causal-lm row format (default: detected from the columns): messages (OpenAI role/"
        "content turns), sharegpt (from/value turns), prompt-completion, alpaca (instruction/input/output), text",
        choices=("messages", "sharegpt", "prompt-completion", "alpaca", "text"), commands=_EVAL),
    Opt("chat_template", str, None, "chat template for a tokenizer without one (or to replace it): chatml, or a "
        "Jinja file; kept with the adapter", commands=_EVAL),
    Opt("packing", bool, False, "causal-lm training: pack several examples per row up to --max-length (position_ids "
        "restart per example, attention isolated between them, no padding); --batch-size then counts packed rows"),
    Opt("label_names", str, None, "label names for integer labels/tags: comma list or a JSON file "
        "(default: labels.json beside the data file, if any)", commands=_EVAL),
    Opt("output", str, None, "output folder (default: runs/<method>-<task>-<time>)"),
    Opt("overwrite", bool, False, "replace a run already in --output"),
    Opt("resume", bool, False, "continue the run in --output exactly where it stopped (its run.yaml is reused)"),
    Opt("epochs", float, 3.0, "training epochs (ignored when --max-steps is set)"),
    Opt("max_steps", int, None, "optimizer steps to train (overrides --epochs)"),
    Opt("lr", float, 1e-3, "peak learning rate"),
    Opt("weight_decay", float, 0.0, "AdamW weight decay"),
    Opt("optimizer", str, "adamw", "adamw (torch) or bitsandbytes' 8-bit AdamW, optionally paged (needs "
        "pip install 'unipeft[quant]')", choices=OPTIMIZERS),
    Opt("batch_size", int, 16, "examples per process per micro-batch (the global batch of one optimizer step is "
        "batch-size x processes x grad-accum)", commands=_GEN),
    Opt("grad_accum", int, 1, "micro-batches each process accumulates per optimizer step"),
    Opt("distributed", str, None, "engine when launched on several processes (torchrun / accelerate launch): ddp "
        "(the default there), fsdp (FSDP2), zero2 / zero3 (DeepSpeed); default: an `accelerate launch` config's "
        "choice", choices=("ddp", "fsdp", "zero2", "zero3")),
    Opt("max_grad_norm", float, 1.0, "gradient clipping norm (0: off)"),
    Opt("max_length", int, 256, "max tokens per example; longer ones are truncated (and counted)", commands=_GEN),
    Opt("warmup", float, 0.06, "warmup: a fraction of the steps if < 1, else a number of steps"),
    Opt("scheduler", str, "linear", "learning-rate schedule after warmup", choices=("linear", "cosine", "constant")),
    Opt("seed", int, 42, "random seed (model init, data order, dropout)", commands=_GEN),
    Opt("eval_every", int, 0, "evaluate every N steps (0: at the end of each epoch and of training)"),
    Opt("save_every", int, 100, "write a resumable checkpoint every N steps"),
    Opt("log_every", int, 10, "append train loss to metrics.jsonl every N steps"),
    Opt("gradient_checkpointing", bool, False, "recompute activations in backward to save memory"),
    Opt("offload_activations", bool, False, "with --gradient-checkpointing: keep the checkpointed layer inputs in "
        "host memory (GPU memory saver; nothing moves on a CPU)"),
    Opt("host_embeddings", bool, False, "keep the input embedding table in host memory and send only the looked-up "
        "rows to the GPU (untied embeddings, e.g. Llama-3-8B: 1 GiB less GPU memory)"),
    Opt("quantize", str, None, "store the frozen base quantized: nf4 (4-bit, QLoRA) or int8 with bitsandbytes (pip "
        "install 'unipeft[quant]'), or fp8 (e4m3, per-channel scales; FP8 GEMMs on Hopper/Ada GPUs, emulated slowly "
        "on a CPU); adapters train in the compute precision", choices=("nf4", "int8", "fp8")),
    Opt("stream_layers", bool, False, "with --quantize nf4 --gradient-checkpointing: the frozen layers wait in host "
        "memory and visit the GPU one layer at a time (a 70B QLoRA step in 7.7 GiB of GPU memory; slower)"),
    Opt("precision", str, "auto", "auto: bf16 on GPUs that support it, else fp32", choices=("auto", "fp32", "bf16", "fp16"),
        commands=_GEN),
    # the GPU fast path (cli/fast_path.py)
    Opt("base_dtype", str, "auto", "storage dtype of the frozen base: auto (the compute dtype, bf16/fp16, when "
        "training in it on an accelerator with one process or DDP; else fp32), compute (the same, also on CPU), or "
        "fp32 (autocast then re-casts frozen weights per matmul); trainable tensors are fp32 either way (--quantize "
        "builds its base in the compute dtype itself)",
        choices=("auto", "compute", "fp32")),
    Opt("liger", str, "auto", "liger-kernel's RMSNorm/RoPE/SwiGLU on the model (architectures liger supports): auto "
        "(on CUDA when liger-kernel is installed), on (required), off; the loss stays ours (chunked)",
        choices=("auto", "on", "off")),
    Opt("max_train_samples", int, None, "use only the first N training rows"),
    Opt("max_eval_samples", int, None, "use only the first N evaluation rows", commands=_EVAL),
    Opt("gen_samples", int, 32, "eval rows to generate for exact-match/BLEU/ROUGE (causal-lm with responses, "
        "seq2seq; 0: off)", commands=_EVAL),
    Opt("max_new_tokens", int, 64, "generation length limit", commands=_GEN),
)
BY_NAME = {o.name: o for o in OPTIONS}

# Recommended starting points per method (data, not code paths); methods not listed get the built-in defaults.
# A MethodInfo may also carry its own `train_defaults` dict, which wins. `target_roles` fills the method's
# target_modules from the architecture table (q, k, v, o, ffn_out) when the user names none.
METHOD_DEFAULTS: dict[str, dict] = {
    "lora": {"lr": 1e-3, "batch_size": 32, "method_options": {"r": 16, "lora_alpha": 32},
             "target_roles": ("q", "k", "v", "o", "ffn_out")},
    "ia3": {"lr": 5e-3, "batch_size": 32},
}
FALLBACK_DEFAULTS = {"lr": 1e-3}


def method_defaults(name: str, info) -> dict:
    own = getattr(info, "train_defaults", None)
    return dict(own) if own else dict(METHOD_DEFAULTS.get(name, FALLBACK_DEFAULTS))


# -- YAML ------------------------------------------------------------------------------------------------
def load_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CliError(f"config file not found: {path}", "check the --config path")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not valid YAML: {e}", "fix the file's syntax") from None
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a mapping of option: value, found {type(data).__name__}",
                       "write one `key: value` per line")
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in ("method_options", "opt"):
            if not isinstance(v, dict):
                raise CliError(f"{path}: {k} must be a mapping of option: value", "e.g. method_options: {r: 8}")
            out.setdefault("method_options", {}).update({str(a).replace("-", "_"): b for a, b in v.items()})
        elif key in BY_NAME or key in ("command", "target_roles"):
            out[key] = v
        else:
            # an unknown top-level key may be a method option (r: 8)
            out.setdefault("method_options", {})[key] = v
    return out


def dump_yaml(path, config: dict) -> None:
    from ..io.atomic import write_text

    write_text(Path(path), yaml.safe_dump(config, sort_keys=False))


# -- method options ----------------------------------------------------------------------------------------
def config_class(info):
    """The config dataclass a registered method's factory builds (class, classmethod preset, or a call)."""
    f = info.factory
    if isinstance(f, type) and dataclasses.is_dataclass(f):
        return f
    owner = getattr(f, "__self__", None)
    if isinstance(owner, type) and dataclasses.is_dataclass(owner):
        return owner
    try:
        return type(f())
    except Exception:
        return None


def method_fields(info) -> dict[str, Any]:
    """{field name: type} of the options a user may set for this method."""
    cls = config_class(info)
    if cls is None:
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)
            if f.name not in BASE_FIELDS and f.init and f.metadata.get("cli", True)}


_REGEX = re.compile(r"[*|()\[\]\\^$+?]")


def _allows(tp, kind) -> bool:
    if tp is kind:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType" or origin is getattr(__import__("types"), "UnionType", None):
        return any(_allows(a, kind) for a in typing.get_args(tp))
    return origin is kind


def _elem(tp):
    for a in (typing.get_args(tp) if typing.get_origin(tp) is not tuple else (tp,)):
        if typing.get_origin(a) is tuple:
            args = typing.get_args(a)
            return args[0] if args else str
    return str


def coerce(name: str, value, tp, method: str):
    """A flag/YAML value converted to what the field's type annotation accepts."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    v = value.strip()
    low = v.lower()
    if low in ("none", "null") and _allows(tp, type(None)):
        return None
    if _allows(tp, bool) and low in ("true", "false", "yes", "no", "1", "0"):
        return low in ("true", "yes", "1")
    if _allows(tp, int) and re.fullmatch(r"-?\d+", v):
        return int(v)
    if _allows(tp, float):
        try:
            return float(v)
        except ValueError:
            pass
    if _allows(tp, tuple) and ("," in v or not (_allows(tp, str) and _REGEX.search(v))):
        et = _elem(tp)
        parts = [p.strip() for p in v.split(",") if p.strip()]
        try:
            return tuple(et(p) if et in (int, float) else p for p in parts)
        except ValueError:
            raise CliError(f"option {name} of {method} takes a comma list of {et.__name__}, got {value!r}",
                           f"e.g. --{name.replace('_', '-')} 0,1,2") from None
    if _allows(tp, str) or tp is Any:
        return v
    raise CliError(f"option {name} of method {method} expects {getattr(tp, '__name__', tp)}, got {value!r}",
                   f"pass a value of that type, e.g. --{name.replace('_', '-')} ...")


def parse_kv(items) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CliError(f"--opt takes key=value, got {item!r}", "e.g. --opt r=8 --opt lora_dropout=0.1")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def build_method_config(method: str, task: str, options: dict, extra: dict | None = None):
    """The method's config object from user options, with a clear message for unknown names and bad values."""
    from .. import methods

    registry = methods()
    if method not in registry:
        raise CliError(f"unknown method {method!r}", f"choose one of: {', '.join(sorted(registry))} "
                       "(`unipeft methods` describes them)")
    info = registry[method]
    fields = method_fields(info)
    kwargs = {}
    for k, v in {**(extra or {}), **options}.items():
        k = k.replace("-", "_")
        if fields and k not in fields:
            raise CliError(f"method {method!r} has no option {k!r}",
                           f"its options are: {', '.join(sorted(fields)) or '(none)'}")
        kwargs[k] = coerce(k, v, fields.get(k, Any), method)
    if "keep_virtual_logits" in fields:  # the CLI's metrics line logits up with the labels: cut virtual positions
        kwargs.setdefault("keep_virtual_logits", False)
    try:
        return info.factory(task_type=TASK_TYPES[task], **kwargs)
    except (TypeError, ValueError) as e:
        raise CliError(f"invalid options for method {method!r}: {e}",
                       "check the values (`unipeft train --method " + method + " --help` lists them)") from None


def registry_info(method: str):
    from .. import methods

    registry = methods()
    if method not in registry:
        raise CliError(f"unknown method {method!r}", f"choose one of: {', '.join(sorted(registry))} "
                       "(`unipeft methods` describes them)")
    return registry[method]


def check_value(opt: Opt, value, source: str):
    """A YAML/flag value for a general option, converted to its type (or a clear error)."""
    if value is None:
        return None
    if opt.type is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
            return str(value).lower() in ("true", "yes", "1")
        raise CliError(f"{source}: {opt.name} must be true or false, got {value!r}", f"e.g. {opt.name}: true")
    try:
        v = opt.type(value)
    except (TypeError, ValueError):
        raise CliError(f"{source}: {opt.name} must be a {opt.type.__name__}, got {value!r}",
                       f"e.g. {opt.flag} {opt.default if opt.default is not None else '...'}") from None
    if opt.choices and v not in opt.choices:
        raise CliError(f"{source}: {opt.name} must be one of {list(opt.choices)}, got {v!r}",
                       f"e.g. {opt.flag} {opt.choices[0]}")
    return v


def resolve(given: dict, yaml_file: str | None, method_flags: dict, kv: list | None) -> dict:
    """The effective options: defaults < method defaults < YAML < flags."""
    data = load_yaml(yaml_file) if yaml_file else {}
    method = given.get("method") or data.get("method") or "lora"
    info = registry_info(method)
    md = method_defaults(method, info)
    opts = {o.name: o.default for o in OPTIONS}
    opts.update({k: v for k, v in md.items() if k != "method_options"})
    mopts = dict(md.get("method_options", {}))
    mopts.update(data.pop("method_options", {}))
    for k, v in data.items():
        opts[k] = check_value(BY_NAME[k], v, yaml_file) if k in BY_NAME else v
    opts.update(given)
    mopts.update(method_flags)
    mopts.update(parse_kv(kv))
    opts["method"] = method
    opts["method_options"] = mopts
    opts["_given"] = set(given) | ({"method_options"} if method_flags or kv else set())
    for k in ("batch_size", "grad_accum", "max_length", "save_every", "log_every"):
        if opts.get(k) is not None and opts[k] < 1:
            raise CliError(f"--{k.replace('_', '-')} must be at least 1, got {opts[k]}", "pass a positive number")
    if opts.get("lr") is not None and not opts["lr"] > 0:
        raise CliError(f"--lr must be > 0, got {opts['lr']}", "e.g. --lr 1e-3")
    return opts

"""`unipeft eval | generate | merge | info | methods`: everything that reads a saved adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .data import read_rows
from .errors import CliError
from .evaluate import generate_texts, generation_eval, run_eval
from .modeling import infer_task, load_model, load_tokenizer, resolve_model
from .report import box, fmt_metrics, human, size_of, write_json
from .task_table import task_class
from .train import TASK_FILE, make_accelerator

PEFT_TASKS = {"SEQ_CLS": "seq-cls", "TOKEN_CLS": "token-cls", "CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq"}


def adapter_dir(path) -> Path:
    p = Path(path)
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if (p / "adapter_config.json").is_file():
        return p
    if not p.exists():
        raise CliError(f"adapter folder not found: {path}", "give the adapter folder, or the run folder holding adapter/")
    raise CliError(f"{path} holds no adapter_config.json", "give the adapter folder, or the run folder holding adapter/")


def adapter_meta(adir: Path | None) -> dict:
    if adir is None:
        return {}
    meta = json.loads((adir / TASK_FILE).read_text()) if (adir / TASK_FILE).is_file() else {}
    cfg = json.loads((adir / "adapter_config.json").read_text())
    meta.setdefault("task", PEFT_TASKS.get(str(cfg.get("task_type"))))
    meta.setdefault("model", cfg.get("base_model_name_or_path"))
    meta["peft_type"] = cfg.get("peft_type")
    return meta


def load_base_and_adapter(opts: dict, adir: Path | None, meta: dict, task=None):
    """(model with the adapter loaded or the plain base, tokenizer, model path, task name)."""
    model_path = resolve_model(opts.get("model") or meta.get("model"))
    task_name = opts.get("task") or meta.get("task") or infer_task(model_path)
    if task is None:
        tok = load_tokenizer(model_path, task_name)
        task = task_class(task_name)(tok, opts.get("max_length") or meta.get("max_length") or 256, meta)
    tok = task.tok  # the one the data was encoded with (its chat template included)
    model = load_model(model_path, task, tok)
    if adir is not None:
        from .. import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adir)
        except (ValueError, KeyError, OSError) as e:
            raise CliError(f"cannot load the adapter {adir} onto {model_path}: {e}",
                           "pass --model with the base model the adapter was trained on") from None
    return model.eval(), tok, model_path, task


def eval_command(ns, opts: dict) -> int:
    if not opts.get("eval"):
        raise CliError("no evaluation data given", "pass --eval FILE (.jsonl, .csv, .tsv, .parquet)")
    adir = adapter_dir(ns.adapter) if ns.adapter else None
    meta = adapter_meta(adir)
    rows = read_rows(opts["eval"], "--eval", opts.get("max_eval_samples"))
    src = Path(opts["eval"]).name
    model_path = resolve_model(opts.get("model") or meta.get("model"))
    task_name = opts.get("task") or meta.get("task") or infer_task(model_path)
    tok = load_tokenizer(model_path, task_name)
    if meta.get("chat_template") and not opts.get("chat_template"):  # trained with --chat-template: render with it
        tok.chat_template = meta["chat_template"]
    cls = task_class(task_name)
    if meta.get("columns") and not (opts.get("text_column") or opts.get("label_column")):
        task = cls(tok, opts.get("max_length") or meta.get("max_length"), meta)
        task.check_columns(rows, src)
    else:
        task = cls.from_data(tok, opts["max_length"], rows, src, {**opts, "train": opts["eval"]})
        for k in ("labels", "labels_by_name"):
            if k in meta:
                task.meta[k] = meta[k]
    feats, truncated = task.encode(rows, src)
    acc = make_accelerator(opts["precision"])
    model, tok, model_path, task = load_base_and_adapter(opts, adir, meta, task)
    model.to(acc.device)
    m = run_eval(model, task, feats, opts["batch_size"], acc)
    samples = []
    if task.generates and opts["gen_samples"]:
        g, samples = generation_eval(model, task, tok, feats, opts["gen_samples"], opts["max_new_tokens"],
                                     opts["batch_size"], acc)
        m.update(g)
    print(box("unipeft eval", [("model", model_path), ("adapter", str(adir) if adir else "none (base model)"),
                               ("data", f"{opts['eval']}: {len(feats):,} examples, {truncated:,} truncated"),
                               ("metrics", fmt_metrics(m))]))
    for p, r in samples[:3]:
        print(f"  · prediction: {p!r}\n    reference:  {r!r}")
    if ns.results:
        write_json(Path(ns.results), {**m, "samples": [{"prediction": p, "reference": r} for p, r in samples]})
    return 0


def generate_command(ns, opts: dict) -> int:
    adir = adapter_dir(ns.adapter) if ns.adapter else None
    meta = adapter_meta(adir)
    if (opts.get("task") or meta.get("task")) in ("seq-cls", "token-cls"):
        raise CliError(f"generate needs a causal-lm or seq2seq model; this adapter is for {meta.get('task')}",
                       "use `unipeft eval` for classification adapters")
    prompts = ns.prompt or [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
    if not prompts:
        raise CliError("no prompt given", "pass --prompt TEXT (repeatable) or pipe prompts on stdin, one per line")
    import torch

    torch.manual_seed(opts["seed"])
    model, tok, _, task = load_base_and_adapter(opts, adir, {**meta, "mode": "instruction"})
    chat = bool(getattr(tok, "chat_template", None)) and not ns.no_chat_template and task.name == "causal-lm"
    task.meta["chat"] = chat
    ids = []
    for p in prompts:
        text = task.prompt(p) if chat else p
        ids.append(tok(text, add_special_tokens=not chat)["input_ids"])
    outs = generate_texts(model, tok, ids, opts["max_new_tokens"], opts["batch_size"], task.name == "seq2seq",
                          temperature=ns.temperature, chat=chat)
    for p, o in zip(prompts, outs):
        print(f"> {p}\n{o}\n")
    return 0


def info_command(ns) -> int:
    from safetensors import safe_open

    adir = adapter_dir(ns.path)
    meta = adapter_meta(adir)
    cfg = json.loads((adir / "adapter_config.json").read_text())
    n, dtypes = 0, set()
    weights = adir / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(weights, "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shape = sl.get_shape()
                n += int(__import__("math").prod(shape)) if shape else 1
                dtypes.add(sl.get_dtype())
    skip = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"}
    opts = {k: v for k, v in cfg.items() if k not in skip and v not in (None, False, [], {})}
    rows = [("adapter", str(adir)), ("method", f"{meta.get('method') or '?'}  (peft_type {cfg.get('peft_type')})"),
            ("base model", str(meta.get("model") or "the embedded SmolLM2-135M-Instruct")),
            ("task", str(meta.get("task"))),
            ("parameters", f"{n:,} ({human(n)}) in {', '.join(sorted(dtypes)) or '-'}"),
            ("size", f"{human(size_of(adir))}B on disk"),
            ("config", ", ".join(f"{k}={v}" for k, v in opts.items())),
            ("labels", str(meta["labels"][:20]) if meta.get("labels") else None)]
    res = adir.parent / "eval_results.json"
    if res.is_file():
        r = json.loads(res.read_text())
        rows.append(("results", fmt_metrics({k: v for k, v in r.items() if not isinstance(v, (list, dict))})))
    print(box("unipeft info", rows))
    return 0


def methods_command(ns) -> int:
    from .. import methods

    reg = methods()
    width = max(len(n) for n in reg)
    print(f"{'method':<{width}}  unified view: Δh @ position · form · composition   [paper]")
    for name in sorted(reg):
        info = reg[name]
        print(f"{name:<{width}}  {info.summary}" + (f"   [{info.paper}]" if info.paper else ""))
    print("\n`unipeft train --method NAME --help` lists a method's options.")
    return 0

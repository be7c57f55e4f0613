"""`unipeft export --format merged|gguf|peft` (and `unipeft merge`, the merged format's alias).

Every format is written into a temporary folder beside the output and renamed into place, so an interrupted export
leaves no half-written output; an existing non-empty output is replaced only with --overwrite.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..io.peft_export import lora_blockers, rslora_into_B, runtime_table, serving_config
from .commands import adapter_dir, adapter_meta, load_base_and_adapter
from .errors import CliError
from .report import box, human, size_of

FORMATS = ("merged", "gguf", "peft")


def _write_atomically(out: Path, overwrite: bool, fill) -> None:
    """fill(tmp folder) writes the export; then it replaces `out` (never half-written, never overwritten silently)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CliError(f"the output {out} already exists", "pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        fill(tmp)
        if out.exists():
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:  # the earlier export goes back in place rather than being deleted below
            if old.exists() and not out.exists():
                os.rename(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _merged(opts: dict, adir: Path, meta: dict, what: str):
    """(merged plain transformers model, tokenizer, base path, task), or a clear refusal naming the runtimes."""
    model, tok, model_path, task = load_base_and_adapter(opts, adir, meta)
    try:
        merged = model.merge_and_unload()
    except (ValueError, NotImplementedError, TypeError, RuntimeError) as e:
        raise CliError(f"the {meta.get('method') or meta.get('peft_type')} adapter cannot be merged, so it cannot be "
                       f"exported as {what}: {e}\n  where each runtime stands:\n{runtime_table()}",
                       "run it with transformers + unipeft (`unipeft generate/chat/eval --adapter`), or train a "
                       "mergeable method (lora, ia3)") from None
    return merged.eval(), tok, model_path, task


def _base_dtype(model_path: str):
    """The dtype the base checkpoint is stored in (config.dtype), fp32 when it does not say."""
    import torch
    from transformers import AutoConfig

    d = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


def export_merged(opts: dict, adir: Path, meta: dict, out: Path, overwrite: bool) -> list:
    merged, tok, model_path, task = _merged(opts, adir, meta, "a merged model")
    dtype = _base_dtype(model_path)  # merged in fp32, stored as the base was

    def fill(tmp):
        merged.to(dtype).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    _write_atomically(out, overwrite, fill)
    return [("base", model_path), ("merged", f"{out}  ({human(size_of(out))}B, safetensors, {str(dtype)[6:]}; load it "
                                             f"with transformers.{task.auto_class}.from_pretrained, or serve it with "
                                             "vLLM / SGLang)")]


def export_gguf(opts: dict, adir: Path, meta: dict, out: Path, overwrite: bool, gguf_type: str) -> list:
    from ..io.gguf_export import GGUFExportError, write_gguf

    task_name = opts.get("task") or meta.get("task")
    if task_name not in (None, "causal-lm"):
        raise CliError(f"GGUF export is for causal LMs; this adapter is for {task_name}",
                       "use --format merged (transformers) for this task")
    merged, tok, model_path, _ = _merged(opts, adir, meta, "GGUF")
    fname = f"model-{gguf_type}.gguf"

    def fill(tmp):
        write_gguf(merged, tok, Path(tmp) / fname, gguf_type, name=Path(model_path).name)
        (Path(tmp) / "Modelfile").write_text(f"FROM ./{fname}\n")  # `ollama create NAME -f Modelfile`

    try:
        _write_atomically(out, overwrite, fill)
    except GGUFExportError as e:
        raise CliError(str(e), "use --format merged (safetensors; vLLM, SGLang, transformers) for this model") from None
    size = human((out / fname).stat().st_size)
    return [("base", model_path), ("gguf", f"{out / fname}  ({size}B, {gguf_type.upper()})"),
            ("use", f"llama-cli -m {out / fname}  |  ollama create NAME -f {out / 'Modelfile'}")]


def export_peft(opts: dict, adir: Path, meta: dict, out: Path, overwrite: bool) -> list:
    cfg = json.loads((adir / "adapter_config.json").read_text())
    blockers = lora_blockers(cfg)
    if blockers:
        raise CliError(f"the {meta.get('method') or cfg.get('peft_type')} adapter is not a plain LoRA adapter that "
                       f"vLLM / SGLang load: {'; '.join(blockers)}\n  where each runtime stands:\n{runtime_table()}",
                       "use --format merged (or --format gguf for llama.cpp / Ollama) if the method merges; else "
                       "run it with transformers + unipeft")
    weights = adir / "adapter_model.safetensors"
    if not weights.is_file():
        raise CliError(f"{adir} holds no adapter_model.safetensors", "save the adapter with safetensors (the default)")
    served, scale_B = serving_config(cfg)
    if not served.get("base_model_name_or_path") and (opts.get("model") or meta.get("model")):
        served["base_model_name_or_path"] = opts.get("model") or meta.get("model")  # runtimes show/check it

    def fill(tmp):
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(served, indent=2, sort_keys=True) + "\n")
        if scale_B:
            from safetensors.torch import load_file, save_file
            save_file(rslora_into_B(load_file(weights)), Path(tmp) / "adapter_model.safetensors",
                      metadata={"format": "pt"})
        else:
            shutil.copyfile(weights, Path(tmp) / "adapter_model.safetensors")

    _write_atomically(out, overwrite, fill)
    note = ("" if not cfg.get("use_rslora") else "; rsLoRA scale folded into each lora_B" if scale_B
            else "; rsLoRA scale folded into lora_alpha")
    return [("peft", f"{out}  (HF PEFT LoRA folder{note}; vllm serve BASE --enable-lora --lora-modules "
                     f"NAME={out}, or peft.PeftModel.from_pretrained)")]


def _default_out(adapter: str, fmt: str) -> Path:
    p = Path(adapter)
    run = p.parent if p.name == "adapter" else p
    return run / f"export-{fmt}"


def _refuse_sources(out: Path, sources: list) -> None:
    """The output may not be (or hold) a folder the export reads: replacing it would delete the adapter or the base."""
    o = out.resolve()
    for src in sources:
        if src and Path(src).exists() and (o == Path(src).resolve() or o in Path(src).resolve().parents):
            raise CliError(f"the output {out} holds the adapter or the base model ({src}); replacing it would delete "
                           "them", "choose another --out (e.g. a new folder beside the run)")


def export_command(ns, opts: dict) -> int:
    adir = adapter_dir(ns.adapter)
    meta = adapter_meta(adir)
    out = Path(ns.out) if ns.out else _default_out(ns.adapter, ns.format)
    _refuse_sources(out, [adir, opts.get("model") or meta.get("model")])
    if ns.format == "merged":
        rows = export_merged(opts, adir, meta, out, ns.overwrite)
    elif ns.format == "gguf":
        rows = export_gguf(opts, adir, meta, out, ns.overwrite, ns.gguf_type)
    else:
        rows = export_peft(opts, adir, meta, out, ns.overwrite)
    print(box(f"unipeft export --format {ns.format}", [("adapter", str(adir)), *rows]))
    return 0


def merge_command(ns, opts: dict) -> int:
    """`unipeft merge --output DIR`: the merged export under its older name."""
    ns.out, ns.format, ns.gguf_type = ns.output, "merged", None
    return export_command(ns, opts)

"""`unipeft` command line: argparse front end. Every option is in --help; errors are one message, no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import options as O
from .errors import CliError

EPILOG = """Options may also come from a YAML file (--config run.yaml; keys as the flags, with - or _); flags win.
A run's folder holds run.yaml with every resolved option, so `unipeft train --config OUT/run.yaml` repeats it."""


def _add_general(p: argparse.ArgumentParser, command: str) -> None:
    for o in O.OPTIONS:
        if command not in o.commands:
            continue
        default = f" (default: {o.default})" if o.default not in (None, False) else ""
        if command == "train" and o.name in ("lr", "batch_size"):
            default = " (default: the method's recommended value, else " + str(o.default) + ")"
        kw = dict(dest=o.name, default=argparse.SUPPRESS, help=o.help + default)
        if o.type is bool:
            p.add_argument(o.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(o.flag, type=o.type, choices=o.choices, metavar=o.name.upper() if not o.choices else None, **kw)


def _method_from_argv(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            try:
                return O.load_yaml(argv[i + 1]).get("method") or "lora"
            except CliError:
                pass
    return "lora"


def _add_method_flags(p: argparse.ArgumentParser, method: str) -> None:
    from .. import methods

    info = methods().get(method)
    if info is None:
        return  # reported when options are resolved
    g = p.add_argument_group(f"options of method {method!r} ({info.summary}); also --opt key=value",
                             "use --method NAME --help for another method's options; comma lists for tuples")
    mdefs = O.method_defaults(method, info)
    md = dict(mdefs.get("method_options", {}))
    if mdefs.get("target_roles"):
        md["target_modules"] = f"the architecture's {'/'.join(mdefs['target_roles'])} linears"
    cls = O.config_class(info)
    defaults = {}
    if cls is not None:
        import dataclasses

        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        try:  # a preset's own values (e.g. houlsby's swish) rather than the dataclass defaults
            made = info.factory()
            defaults.update({f.name: getattr(made, f.name) for f in dataclasses.fields(made)})
        except Exception:
            pass
    for name, tp in O.method_fields(info).items():
        if name in O.BY_NAME or name in ("config", "opt"):
            continue  # clashes with a general option: --opt name=value sets it
        d = md.get(name, defaults.get(name))
        tname = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "").replace("NoneType", "None")
        g.add_argument("--" + name.replace("_", "-"), dest="m__" + name, default=argparse.SUPPRESS, metavar="V",
                       help=f"{tname}" + (f" (default: {d})" if d is not None else ""))


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="unipeft", description="Parameter-efficient fine-tuning from the command line.",
                                epilog="`unipeft COMMAND --help` shows each command's options.")
    p.add_argument("--version", action="version", version=f"unipeft {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("train", help="fine-tune a model with any registered method", epilog=EPILOG)
    t.add_argument("--config", help="YAML file of options; flags override it")
    t.add_argument("--opt", action="append", metavar="KEY=VALUE", help="a method option (repeatable)")
    _add_general(t, "train")
    _add_method_flags(t, _method_from_argv(argv))

    e = sub.add_parser("eval", help="evaluate a base model plus a saved adapter on a data file", epilog=EPILOG)
    e.add_argument("--adapter", help="adapter folder (or a run folder holding adapter/); omit to score the base model")
    e.add_argument("--config", help="YAML file of options; flags override it")
    e.add_argument("--results", help="also write the metrics to this JSON file")
    _add_general(e, "eval")

    g = sub.add_parser("generate", help="generate text from a base model plus an adapter")
    g.add_argument("--adapter", help="adapter folder (or a run folder holding adapter/); omit for the base model")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable); default: one prompt per stdin line")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is, even if the tokenizer "
                   "has a chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy, else sampling")
    g.add_argument("--config", help="YAML file of options")
    _add_general(g, "generate")

    m = sub.add_parser("merge", help="write a merged full model (HF folder, safetensors) for mergeable methods; "
                       "the same as `export --format merged`")
    m.add_argument("--adapter", required=True, help="adapter folder (or a run folder holding adapter/)")
    m.add_argument("--output", required=True, help="folder for the merged model and its tokenizer")
    m.add_argument("--overwrite", action="store_true", help="replace a model already in --output")
    _add_general(m, "merge")

    # -- export and chat (issue 17, h-export) --
    x = sub.add_parser("export", help="export a trained adapter for serving: merged safetensors, GGUF (llama.cpp, "
                       "Ollama) or an HF PEFT LoRA folder (vLLM, SGLang)")
    x.add_argument("--adapter", required=True, help="adapter folder (or a run folder holding adapter/)")
    x.add_argument("--format", required=True, choices=("merged", "gguf", "peft"),
                   help="merged: full model in the base's dtype; gguf: one .gguf file of the merged model "
                   "(Llama-family); peft: the LoRA adapter folder serving runtimes load")
    x.add_argument("--out", help="output folder (default: RUN/export-FORMAT)")
    x.add_argument("--gguf-type", choices=("f32", "f16", "q8_0"), default="f16", help="GGUF weight type (default: f16)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_general(x, "merge")

    c = sub.add_parser("chat", help="chat with a base model plus an adapter (streaming; one turn per stdin line when "
                       "piped)")
    c.add_argument("--adapter", help="adapter folder (or a run folder holding adapter/); omit for the base model")
    c.add_argument("--system", help="system message at the start of the conversation")
    c.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default: 256)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, reproducible; else sampling")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0 (default: 1.0)")
    c.add_argument("--seed", type=int, default=42, help="random seed for sampling (default: 42)")
    c.add_argument("--show-prompt", action="store_true", help="print each turn's rendered prompt to stderr")
    _add_general(c, "merge")

    i = sub.add_parser("info", help="describe a saved adapter (method, base model, parameters, size)", formatter_class=fmt)
    i.add_argument("path", help="adapter folder or run folder")

    sub.add_parser("methods", help="list the registered methods with their unified-view row")

    d = sub.add_parser("demo", help="a real fine-tune of the embedded model on a built-in task (offline)",
                       formatter_class=fmt)
    d.add_argument("--output", default="runs/demo", help="run folder (replaced if it exists)")
    d.add_argument("--steps", type=int, default=None, help="optimizer steps (default: tuned for 2 CPU cores)")
    d.add_argument("--samples", type=int, default=None, help="held-out sentences scored before and after")
    d.add_argument("--model", default=None, help="another causal LM folder to tune (default: the embedded SmolLM2)")
    _add_bench(sub, fmt)
    return p


def _add_bench(sub, fmt) -> None:
    """`unipeft bench` (issue 17): methods x tasks with the fixed plan of cli/bench_plan.py."""
    b = sub.add_parser("bench", help="benchmark every method on SST-2, CoNLL-2003, E2E NLG and Alpaca (resumable)",
                       formatter_class=fmt, description="Runs each method x task cell of the fixed, documented plan "
                       "(src/unipeft/cli/bench_plan.py) in its own process and writes results.md/.csv/.json and "
                       "plots to --out. Rerunning the same command resumes: finished cells are skipped.")
    b.add_argument("--tasks", default="all", help="comma list of sst2, conll, e2e, alpaca, or all")
    b.add_argument("--methods", default="all", help="comma list of full and registered methods, or all")
    b.add_argument("--budget", default="quick", choices=("smoke", "quick", "full"),
                   help="smoke: the tests' slice; quick: minutes on CPU; full: the budget of docs/RESULTS.md")
    b.add_argument("--out", required=True, help="output folder (cells/, results.*, plots/)")
    b.add_argument("--data-dir", default=None, help="folder holding sst2/, conll2003/, e2e_nlg/, alpaca/ "
                   "(default: $UNIPEFT_DATA, else shared/data beside the repository)")
    b.add_argument("--seeds", default="0", help="comma list of seeds")
    b.add_argument("--threads", type=int, default=2, help="torch threads per cell")
    b.add_argument("--no-reference", action="store_true", help="skip the HF PEFT reference rows")
    b.add_argument("--report-only", action="store_true", help="run no cell: write the report from the finished "
                   "ones (the others show as not run)")
    b.add_argument("--doc", default=None, help="also fill the generated section of this document (docs/RESULTS.md) "
                   "with the table and plots")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("unipeft").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # optional backends announce missing extras at import time; not the user's problem here
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _options(ns, command: str) -> dict:
    given = {k: v for k, v in vars(ns).items() if k in O.BY_NAME}
    method_flags = {k[3:]: v for k, v in vars(ns).items() if k.startswith("m__")}
    config = getattr(ns, "config", None)
    if command == "train" and given.get("resume") and not config and given.get("output"):
        run_yaml = Path(given["output"]) / "run.yaml"
        config = str(run_yaml) if run_yaml.is_file() else None  # a resumed run keeps its options
    return O.resolve(given, config, method_flags, getattr(ns, "opt", None))


def dispatch(argv: list[str]) -> int:
    ns = build_parser(argv).parse_args(argv)
    _setup_logging(ns.verbose)
    if ns.command == "train":
        from .train import train_command

        return train_command(_options(ns, "train"))
    if ns.command == "bench":
        from .bench import bench_command

        return bench_command(ns)
    if ns.command == "demo":
        from .demo import demo_command

        return demo_command(ns)
    if ns.command in ("export", "merge"):
        from . import export

        return getattr(export, ns.command + "_command")(ns, _options(ns, ns.command))
    if ns.command == "chat":
        from .chat import chat_command

        return chat_command(ns, _options(ns, "merge"))
    from . import commands

    if ns.command in ("info", "methods"):
        return getattr(commands, ns.command + "_command")(ns)
    return getattr(commands, ns.command + "_command")(ns, _options(ns, ns.command))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(argv)
    except CliError as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted (nothing was being trained, so there is nothing to resume)", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory\n  fix: lower --batch-size or --max-length, or use --gradient-checkpointing",
              file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except Exception as e:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            print(f"error: out of device memory\n  fix: lower --batch-size or --max-length, raise --grad-accum, "
                  f"or use --gradient-checkpointing", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

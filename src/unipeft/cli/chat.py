"""`unipeft chat`: talk to a base model plus an adapter, through the base tokenizer's chat template.

Interactive on a terminal (replies stream as they are generated; /reset clears the history, /exit or Ctrl-D ends);
with stdin piped, each non-empty line is one user turn and each reply is printed on its own line. Greedy decoding by
default, so a piped session is reproducible.
"""

from __future__ import annotations

import sys

from .chat_data import cut_at, stop_ids_and_text
from .commands import adapter_dir, adapter_meta, load_base_and_adapter
from .errors import CliError

HELP = "type a message; /reset clears the conversation, /exit (or Ctrl-D) ends it"


def _turns(interactive: bool):
    """User lines, stripped; ends at EOF (or Ctrl-C on a terminal)."""
    if not interactive:
        for line in sys.stdin:
            yield line.strip()
        return
    while True:
        try:
            yield input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return


def _fit(tok, history: list, keep: int, room: int | None, max_new: int) -> tuple[str, list[int]]:
    """The rendered prompt's ids; the oldest exchanges are dropped (with a note) while it would overflow the context."""
    while True:
        text = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if room is None or len(ids) + max_new <= room or len(history) <= keep + 1:
            return text, ids
        del history[keep:keep + 2]
        print("(the conversation is longer than the model's context: the oldest exchange was dropped)",
              file=sys.stderr)


def _streamer(tok, marker: str):
    """transformers' TextStreamer, printing the reply only up to the end-of-turn marker (text held back while it
    could be the marker's start)."""
    from transformers import TextStreamer

    class UntilMarker(TextStreamer):
        def __init__(self):
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.seen, self.shown = "", 0

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.seen += text
            k = self.seen.find(marker) if marker else -1
            upto = k if k >= 0 else len(self.seen)
            if k < 0 and marker and not stream_end:  # hold back a tail that may be the marker's beginning
                upto -= next((n for n in range(min(len(marker) - 1, len(self.seen)), 0, -1)
                              if marker.startswith(self.seen[-n:])), 0)
            if k >= 0 or not stream_end:  # and whitespace that may be the last before the marker
                upto = len(self.seen[:upto].rstrip())
            if upto > self.shown:
                print(self.seen[self.shown:upto], end="", flush=True)
                self.shown = upto
            if stream_end:
                print(flush=True)

    return UntilMarker()


def chat_command(ns, opts: dict) -> int:
    import torch
    from transformers import GenerationConfig

    adir = adapter_dir(ns.adapter) if ns.adapter else None
    meta = adapter_meta(adir)
    if (opts.get("task") or meta.get("task")) not in (None, "causal-lm"):
        raise CliError(f"chat needs a causal LM; this adapter is for {opts.get('task') or meta.get('task')}",
                       "use `unipeft eval` (classification) or `unipeft generate` (seq2seq)")
    if ns.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {ns.max_new_tokens}", "e.g. --max-new-tokens 256")
    model, tok, model_path, task = load_base_and_adapter(opts, adir, {**meta, "mode": "instruction"})
    if task.name != "causal-lm":
        raise CliError(f"chat needs a causal LM; {model_path} loads as {task.name}", "pass --task causal-lm")
    if not getattr(tok, "chat_template", None):
        raise CliError(f"the tokenizer of {model_path} has no chat template, so turns cannot be formatted as the "
                       "model was trained to see them", "use `unipeft generate --prompt TEXT` for plain continuation")
    torch.manual_seed(ns.seed)
    base_gc = getattr(model, "generation_config", None)
    eos = getattr(base_gc, "eos_token_id", None)
    # the template's end-of-turn marker ends a reply (training labels it, not EOS): a token id where it is one
    # token, else a stop string
    stop_ids, marker = stop_ids_and_text(tok)
    eos = list(dict.fromkeys((eos if isinstance(eos, list) else [eos] if eos is not None else [])
                             + ([tok.eos_token_id] if tok.eos_token_id is not None else []) + stop_ids))
    stop_text = {"stop_strings": [marker]} if marker and not stop_ids else {}
    sample = {"do_sample": True, "temperature": ns.temperature, "top_p": ns.top_p} if ns.temperature > 0 \
        else {"do_sample": False}
    gc = GenerationConfig(max_new_tokens=ns.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos or None,
                          **stop_text, **sample)
    room = getattr(model.config, "max_position_embeddings", None)
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"unipeft chat · {model_path}" + (f" + {adir}" if adir else "") + f"\n{HELP}")
    device = next(model.parameters()).device
    turn = 0
    for line in _turns(interactive):
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr if not interactive else sys.stdout)
            continue
        history.append({"role": "user", "content": line})
        try:
            text, ids = _fit(tok, history, len(system), room, ns.max_new_tokens)
        except Exception as e:  # a template that refuses the roles (e.g. no system role)
            raise CliError(f"the chat template of {model_path} cannot render this conversation: {e}",
                           "drop --system if the model has no system role") from None
        new_tokens = ns.max_new_tokens if room is None else min(ns.max_new_tokens, room - len(ids))
        if new_tokens < 1:  # positions past the context are ones the model never saw: no reply is better than that
            history.pop()
            print(f"(this message is longer than the model's context of {room} tokens; send a shorter one)",
                  file=sys.stderr, flush=True)
            continue
        if new_tokens < ns.max_new_tokens:
            print(f"(the reply is capped at {new_tokens} tokens: the model's context of {room} tokens is full)",
                  file=sys.stderr, flush=True)
        turn += 1
        if ns.show_prompt:
            print(f"--- prompt of turn {turn} ---\n{text}\n--- end of prompt ---", file=sys.stderr, flush=True)
        if interactive:
            print("assistant> ", end="", flush=True)
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc,
                                 max_new_tokens=new_tokens,
                                 streamer=_streamer(tok, marker), **({"tokenizer": tok} if stop_text else {}))
        reply = cut_at(tok.decode(out[0, len(ids):], skip_special_tokens=True), marker).strip()
        history.append({"role": "assistant", "content": reply})
        sys.stdout.flush()
    return 0

"""Chat data for causal-LM training: the row formats people bring (OpenAI `messages`, ShareGPT `conversations`,
prompt/completion, Alpaca, plain text), detected from the columns, turned into one message list, rendered with the
tokenizer's chat template, and labelled with the loss on the assistant turns only.

Assistant spans come from the template itself, not from guessing its layout: for assistant turn i the conversation
is rendered up to turn i-1 with the generation prompt (P) and up to turn i (F); the turn's trained text is F minus
P, trailing whitespace excluded (the content and the template's end-of-turn token, e.g. "4<|im_end|>"). Each
prefix must be a prefix of the whole rendering and each span must contain the turn's text; a template that drops
or rewrites content (e.g. strips reasoning from earlier turns) is an error naming the row, never a silent
mislabel. The text between spans is tokenized piece by piece, so a prompt is tokenized exactly as `generate`
tokenizes it.
"""

from __future__ import annotations

import json

from .errors import CliError

FORMATS = ("messages", "sharegpt", "prompt-completion", "alpaca", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
INSTRUCTION = ("instruction", "prompt", "question")
RESPONSE = ("output", "response", "completion", "answer")
# --chat-template chatml: for tokenizers without a template (a documented, plain layout; its markers are ordinary
# text to a tokenizer that lacks them as special tokens).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _cell_list(v):
    """A list of turns: a real list, or a JSON list in a string (CSV cells)."""
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return None
    return v if isinstance(v, (list, tuple)) else None


def _turn_keys(rows, col) -> set:
    for r in rows[:50]:
        turns = _cell_list(r.get(col))
        if turns and isinstance(turns[0], dict):
            return set(turns[0])
    return set()


def detect_format(rows, cols) -> str | None:
    """The row format from the columns (and the keys of the turns in list columns); None if none fits."""
    for col in ("messages", "conversations", "conversation"):
        if col in cols:
            keys = _turn_keys(rows, col)
            if {"role", "content"} <= keys:
                return "messages"
            if {"from", "value"} <= keys:
                return "sharegpt"
    if "prompt" in cols and "completion" in cols:
        return "prompt-completion"
    if any(c in cols for c in INSTRUCTION) and any(c in cols for c in RESPONSE):
        return "alpaca"
    if "text" in cols:
        return "text"
    return None


def turns_column(fmt: str, cols, source: str, given: str | None = None) -> str:
    if given:
        if given not in cols:
            raise CliError(f"--text-column {given!r} not found in {source}; columns found: {sorted(cols)}",
                           f"pass --text-column with one of {sorted(cols)}")
        return given
    for col in ("messages", "conversations", "conversation"):
        if col in cols:
            return col
    raise CliError(f"--format {fmt} needs a list-of-turns column (messages or conversations) in {source}; columns "
                   f"found: {sorted(cols)}", "pass --text-column COL naming it, or the --format the rows have")


def _role_content(turn, fmt: str, where: str, k: int) -> dict:
    if not isinstance(turn, dict):
        raise CliError(f"{where}: turn {k + 1} is a {type(turn).__name__}, not an object",
                       'write turns as {"role": "user", "content": "..."}' if fmt == "messages"
                       else 'write turns as {"from": "human", "value": "..."}')
    if fmt == "sharegpt":
        who, text = turn.get("from"), turn.get("value")
        role = SHAREGPT_ROLES.get(str(who).lower())
        if role is None:
            raise CliError(f"{where}: turn {k + 1} is from {who!r}, not a ShareGPT speaker",
                           f"use one of {sorted(SHAREGPT_ROLES)} in `from`")
    else:
        role, text = turn.get("role"), turn.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise CliError(f"{where}: turn {k + 1} has role {role!r}",
                           "use role system, user, assistant (or tool)")
    if not isinstance(text, str):
        raise CliError(f"{where}: turn {k + 1} ({role}) has no text content (got {type(text).__name__})",
                       "give every turn a string content/value")
    return {"role": role, "content": text}


def to_messages(row: dict, meta: dict, where: str) -> list[dict]:
    """One row as a message list [{role, content}, ...] for any conversational format."""
    fmt = meta["format"]
    if fmt in ("messages", "sharegpt"):
        col = meta["text_columns"][0]
        turns = _cell_list(row.get(col))
        if not turns:
            raise CliError(f"{where}: column {col!r} is not a non-empty list of turns",
                           "give each row a list of turns, e.g. [{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]")
        msgs = [_role_content(t, fmt, where, k) for k, t in enumerate(turns)]
    elif fmt == "prompt-completion":
        p, c = (row.get(col) for col in (meta["text_columns"][0], meta["label_column"]))
        if _cell_list(p) is not None and _cell_list(c) is not None:  # conversational prompt/completion (TRL)
            msgs = [_role_content(t, "messages", where, k) for k, t in enumerate(list(_cell_list(p)) + list(_cell_list(c)))]
        else:
            msgs = [{"role": "user", "content": _str(p, where, meta["text_columns"][0])},
                    {"role": "assistant", "content": _str(c, where, meta["label_column"])}]
    elif fmt == "alpaca":
        tc = meta["text_columns"]
        inst = _str(row.get(tc[0]), where, tc[0])
        inp = row.get(tc[1]) if len(tc) > 1 else None
        msgs = [{"role": "user", "content": inst + (f"\n\n{inp}" if inp not in (None, "") else "")},
                {"role": "assistant", "content": _str(row.get(meta["label_column"]), where, meta["label_column"])}]
    else:
        raise ValueError(fmt)
    if not any(m["role"] == "assistant" for m in msgs):
        raise CliError(f"{where}: the conversation has no assistant turn, so nothing to train on",
                       "give every row at least one assistant turn (or use --format text)")
    return msgs


def _str(v, where, col) -> str:
    if v is None or (isinstance(v, float) and v != v):
        raise CliError(f"{where}: column {col!r} is empty", "fill in or remove that row")
    return v if isinstance(v, str) else str(v)


def render(tok, messages, gen_prompt=False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def assistant_segments(tok, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces whose concatenation is the whole rendering."""
    full = render(tok, messages)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tok, messages[:i], gen_prompt=True)
        upto = render(tok, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
            raise CliError(f"{where}: the chat template renders assistant turn {i + 1} in a way that does not extend "
                           "the conversation before it (it rewrites earlier turns or its generation prompt), so its "
                           "tokens cannot be located", "use a template that renders turns in order, split the "
                           "conversation into one row per assistant turn, or pass --chat-template FILE")
        end = len(upto.rstrip())
        span = upto[len(before):end]
        if m["content"].strip() not in span:
            raise CliError(f"{where}: the chat template dropped or changed the text of assistant turn {i + 1} "
                           f"({m['content'].strip()[:60]!r} is not in what it rendered: {span[:60]!r}); training on "
                           "it would teach something other than the data", "use a template that keeps assistant "
                           "content verbatim (e.g. one that does not strip reasoning), or --chat-template FILE")
        pieces += [(full[pos:len(before)], False), (span, True)]
        pos = end
    pieces.append((full[pos:], False))
    return [(t, y) for t, y in pieces if t]


_PROBE = "\x00reply\x00"


def end_of_turn(tok) -> str:
    """The text the chat template writes right after an assistant reply (ChatML: "<|im_end|>"), "" if none.
    Training puts the loss on it, not on EOS, so generation must stop at it: where it is ordinary text (e.g.
    --chat-template chatml on a tokenizer without those special tokens) the model never emits EOS after a reply."""
    try:
        text = render(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}])
    except Exception:  # noqa: BLE001 — a template that refuses the probe: no marker known
        return ""
    k = text.find(_PROBE)
    tail = text[k + len(_PROBE):].strip() if k >= 0 else ""
    return tail.split()[0] if tail else ""


def stop_ids_and_text(tok) -> tuple[list[int], str]:
    """(token id of the end-of-turn marker where it is one token, else []; the marker text, to cut replies at)."""
    marker = end_of_turn(tok)
    if not marker:
        return [], ""
    ids = tok(marker, add_special_tokens=False)["input_ids"]
    return (ids if len(ids) == 1 else []), marker


def cut_at(text: str, marker: str) -> str:
    """The reply before the end-of-turn marker (what follows it is the model inventing the next turns)."""
    k = text.find(marker) if marker else -1
    return text[:k] if k >= 0 else text

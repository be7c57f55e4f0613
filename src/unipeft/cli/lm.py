"""Generative tasks: causal LM (plain text, or chat rows in any format of chat_data.py through the chat template
with the loss on the assistant turns only) and seq2seq (source -> target)."""

from __future__ import annotations

import torch.nn.functional as F

from . import metrics
from .data import columns_of
from .errors import CliError
from .chat_data import (CHATML, INSTRUCTION, RESPONSE, assistant_segments, detect_format, render, to_messages,
                        turns_column)
from .tasks import Task, _text, pick_column


class _Generative(Task):
    def eval_records(self, logits, batch, feats):
        labels = batch["labels"]
        if self.name == "causal-lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
        keep = labels != -100
        return [(float(loss[i][keep[i]].sum()), int(keep[i].sum())) for i in range(len(feats))]

    def finalize(self, records):
        total = sum(r[1] for r in records)
        loss = sum(r[0] for r in records) / max(total, 1)
        return {"eval_loss": loss, "perplexity": metrics.perplexity(loss)}

    @property
    def generates(self) -> bool:
        return True


class CausalLM(_Generative):
    """Plain text (loss on every token) or a conversational format (chat_data.FORMATS) with the loss on the
    assistant turns only."""

    name, auto_class = "causal-lm", "AutoModelForCausalLM"

    def __init__(self, tokenizer, max_length, meta):
        if meta.get("chat_template"):  # --chat-template given at training: the adapter keeps using it
            tokenizer.chat_template = meta["chat_template"]
        if "format" not in meta:  # adapters saved before the chat formats: instruction rows were Alpaca rows
            meta = {**meta, "format": "alpaca" if meta.get("mode") == "instruction" else "text"}
        super().__init__(tokenizer, max_length, meta)

    @classmethod
    def from_data(cls, tok, max_length, rows, source, opts):
        cols = columns_of(rows)
        template = _chat_template(opts.get("chat_template"))
        chat = bool(template or getattr(tok, "chat_template", None))
        given = opts.get("format")
        fmt = given or ("text" if opts.get("text_column") and not opts.get("label_column") else None)
        fmt = fmt or detect_format(rows, cols)
        base = {"chat": chat, "format": fmt, **({"chat_template": template} if template else {})}
        if fmt is None:
            raise CliError(f"{source} matches no causal-lm data format; columns found: {sorted(cols)}",
                           "give rows as messages [{role, content}], ShareGPT conversations [{from, value}], "
                           "prompt/completion, instruction/input/output (Alpaca) or text, or pass --format and "
                           "--text-column/--label-column")
        if fmt == "text":
            col = pick_column(opts.get("text_column"), ("text",), cols, "text", source, "--text-column")
            return cls(tok, max_length, {**base, "mode": "text", "text_columns": [col], "columns": [col]})
        if fmt in ("messages", "sharegpt"):
            if not chat:
                raise CliError(f"the tokenizer has no chat template, so {fmt} rows cannot be formatted",
                               "pass --chat-template chatml (a plain <|im_start|>role ... <|im_end|> layout) or "
                               "--chat-template FILE.jinja, or use a model whose tokenizer has a chat template")
            col = turns_column(fmt, cols, source, opts.get("text_column"))
            return cls(tok, max_length, {**base, "mode": "instruction", "text_columns": [col], "columns": [col]})
        names = ("prompt",) if fmt == "prompt-completion" else INSTRUCTION
        outs = ("completion",) if fmt == "prompt-completion" else RESPONSE
        inst = pick_column(opts.get("text_column"), names, cols, "prompt" if fmt == "prompt-completion"
                           else "instruction", source, "--text-column")
        out = pick_column(opts.get("label_column"), outs, cols, "completion" if fmt == "prompt-completion"
                          else "response", source, "--label-column")
        inp = ["input"] if fmt == "alpaca" and "input" in cols else []
        return cls(tok, max_length, {**base, "mode": "instruction", "text_columns": [inst] + inp,
                                     "label_column": out, "columns": [inst, out]})

    def check_columns(self, rows, source):
        super().check_columns(rows, source)
        fmt = self.meta.get("format")
        if fmt in ("messages", "sharegpt") and rows:
            to_messages(rows[0], self.meta, f"{source} row 1")  # the turn keys fit the training format

    @property
    def generates(self) -> bool:
        return self.meta["mode"] == "instruction"

    # formatting --------------------------------------------------------------------------------------------
    def prompt(self, instruction: str, inp: str | None = None) -> str:
        content = instruction + (f"\n\n{inp}" if inp else "")
        if self.meta.get("chat"):
            return render(self.tok, [{"role": "user", "content": content}], gen_prompt=True)
        if self.meta.get("format") == "prompt-completion":
            return content
        return f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{inp}\n\n" if inp else "") + "### Response:\n"

    def prompt_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=not self.meta.get("chat"))["input_ids"]

    def pieces(self, row: dict, where: str) -> tuple[list[tuple[str, bool]], str, str]:
        """(text, trained) pieces of one row, the prompt before its last assistant turn, and that turn's text."""
        msgs = to_messages(row, self.meta, where)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ref = msgs[last]["content"]
        if self.meta.get("chat"):
            return assistant_segments(self.tok, msgs, where), render(self.tok, msgs[:last], gen_prompt=True), ref
        # no chat template (Alpaca, prompt/completion): the prompt layout of `prompt`, the response then EOS
        if self.meta["format"] == "alpaca":
            tc = self.meta["text_columns"]
            inp = row.get(tc[1]) if len(tc) > 1 else None
            prompt = self.prompt(_text(row.get(tc[0]), where, tc[0]), str(inp) if inp not in (None, "") else None)
        elif [m["role"] for m in msgs] != ["user", "assistant"]:  # conversational prompt/completion: no plain layout
            raise CliError(f"{where}: these prompt/completion turns need a chat template, but the tokenizer has no "
                           "chat template (without one the system and earlier turns would be dropped)",
                           "pass --chat-template chatml (a plain <|im_start|>role ... <|im_end|> layout) or "
                           "--chat-template FILE.jinja, or use a model whose tokenizer has a chat template")
        else:
            prompt = msgs[0]["content"]
        return [(prompt, False), (ref + (self.tok.eos_token or ""), True)], prompt, ref

    def encode(self, rows, source):
        feats, truncated, L = [], 0, self.max_length
        eos = self.tok.eos_token_id
        if self.meta["mode"] == "text":
            col = self.meta["text_columns"][0]
            enc = self.tok([_text(r.get(col), f"{source} row {i + 1}", col) for i, r in enumerate(rows)])
            for ids in enc["input_ids"]:
                ids = list(ids) + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
                truncated += len(ids) > L
                ids = ids[:L]
                feats.append({"input_ids": ids, "labels": list(ids)})
            return feats, truncated
        special = not self.meta.get("chat")  # a chat template writes its own BOS where the model wants one
        for i, r in enumerate(rows):
            where = f"{source} row {i + 1}"
            pieces, prompt, ref = self.pieces(r, where)
            ids, labels = tokenize_pieces(self.tok, pieces, special)
            truncated += len(ids) > L
            p = self.prompt_ids(prompt)
            s = _window(labels, L)
            feats.append({"input_ids": ids[s:s + L], "labels": labels[s:s + L], "prompt_ids": p[-L:], "ref": ref})
        return feats, truncated


def _window(labels: list[int], L: int) -> int:
    """Where a row longer than L tokens starts: its head, unless that holds no trained token (a prompt of L tokens or
    more): then L//2 tokens of context before the first trained one. A row with nothing to learn would be dropped
    silently, and a batch of such rows gives a NaN (0/0) loss."""
    if len(labels) <= L or any(y != -100 for y in labels[:L]):
        return 0
    first = next((i for i, y in enumerate(labels) if y != -100), None)
    return 0 if first is None else min(first - L // 2, len(labels) - L)


def tokenize_pieces(tok, pieces: list[tuple[str, bool]], add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Token ids of the joined pieces and labels: the id where a token starts inside a trained piece, else -100.
    The text is tokenized once (offsets), so the ids are what the model sees for the whole text."""
    text = "".join(t for t, _ in pieces)
    if not getattr(tok, "is_fast", False):  # no offsets: piece by piece
        ids, labels = [], []
        for k, (t, trained) in enumerate(pieces):
            part = tok(t, add_special_tokens=add_special_tokens and k == 0)["input_ids"]
            ids += part
            labels += part if trained else [-100] * len(part)
        return ids, labels
    spans, pos = [], 0
    for t, trained in pieces:
        if trained:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    enc = tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [i if e > s and any(a <= s < b for a, b in spans) else -100
              for i, (s, e) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _chat_template(spec: str | None) -> str | None:
    """--chat-template: `chatml` (built in) or a Jinja file."""
    if not spec:
        return None
    if spec == "chatml":
        return CHATML
    from pathlib import Path

    path = Path(spec)
    if not path.is_file():
        raise CliError(f"--chat-template {spec}: no such file", "pass chatml or the path of a Jinja template file")
    return path.read_text(encoding="utf-8")


class Seq2Seq(_Generative):
    name, auto_class = "seq2seq", "AutoModelForSeq2SeqLM"

    @classmethod
    def from_data(cls, tok, max_length, rows, source, opts):
        cols = columns_of(rows)
        src = pick_column(opts.get("text_column"), ("source", "src", "input", "document", "text", "meaning_representation"),
                          cols, "source", source, "--text-column")
        tgt = pick_column(opts.get("label_column"), ("target", "tgt", "output", "summary", "human_reference",
                                                     "label"), cols, "target", source, "--label-column")
        return cls(tok, max_length, {"text_columns": [src], "label_column": tgt, "columns": [src, tgt]})

    def encode(self, rows, source):
        (sc,), tc = self.meta["text_columns"], self.meta["label_column"]
        srcs = [_text(r.get(sc), f"{source} row {i + 1}", sc) for i, r in enumerate(rows)]
        tgts = [_text(r.get(tc), f"{source} row {i + 1}", tc) for i, r in enumerate(rows)]
        a, b = self.tok(srcs)["input_ids"], self.tok(text_target=tgts)["input_ids"]
        feats, truncated = [], 0
        for s, t, ref in zip(a, b, tgts):
            truncated += len(s) > self.max_length or len(t) > self.max_length
            s, t = s[: self.max_length], t[: self.max_length]
            feats.append({"input_ids": s, "labels": t, "prompt_ids": s, "ref": ref})
        return feats, truncated

"""Generative tasks: causal LM (plain text, or instruction/input/output rows through the chat template with the
loss on the response only) and seq2seq (source -> target)."""

from __future__ import annotations

import torch.nn.functional as F

from . import metrics
from .data import columns_of
from .errors import CliError
from .tasks import Task, _text, pick_column

INSTRUCTION = ("instruction", "prompt", "question")
RESPONSE = ("output", "response", "completion", "answer")


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
    name, auto_class = "causal-lm", "AutoModelForCausalLM"

    @classmethod
    def from_data(cls, tok, max_length, rows, source, opts):
        cols = columns_of(rows)
        chat = bool(getattr(tok, "chat_template", None))
        if opts.get("text_column"):
            col = pick_column(opts["text_column"], (), cols, "text", source, "--text-column")
            return cls(tok, max_length, {"mode": "text", "text_columns": [col], "columns": [col], "chat": chat})
        inst = pick_column(None, INSTRUCTION, cols, "instruction", source, "--text-column", required=False)
        if inst:
            out = pick_column(opts.get("label_column"), RESPONSE, cols, "response", source, "--label-column")
            inp = "input" if "input" in cols else None
            return cls(tok, max_length, {"mode": "instruction", "text_columns": [inst] + ([inp] if inp else []),
                                         "label_column": out, "columns": [inst, out], "chat": chat})
        if "text" in cols:
            return cls(tok, max_length, {"mode": "text", "text_columns": ["text"], "columns": ["text"], "chat": chat})
        raise CliError(f"{source} has neither a text column nor instruction/output columns; columns found: "
                       f"{sorted(cols)}", "pass --text-column COL for plain text, or give rows with "
                       "instruction (+ input) and output fields")

    @property
    def generates(self) -> bool:
        return self.meta["mode"] == "instruction"

    # formatting --------------------------------------------------------------------------------------------
    def prompt(self, instruction: str, inp: str | None = None) -> str:
        content = instruction + (f"\n\n{inp}" if inp else "")
        if self.meta.get("chat"):
            return self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)
        return f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{inp}\n\n" if inp else "") + "### Response:\n"

    def prompt_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=not self.meta.get("chat"))["input_ids"]

    def _response(self, instruction, inp, output, prompt) -> str:
        if self.meta.get("chat"):
            content = instruction + (f"\n\n{inp}" if inp else "")
            full = self.tok.apply_chat_template([{"role": "user", "content": content},
                                                 {"role": "assistant", "content": output}], tokenize=False)
            if full.startswith(prompt):
                return full[len(prompt):]
        return output + (self.tok.eos_token or "")

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
        tc, oc = self.meta["text_columns"], self.meta["label_column"]
        for i, r in enumerate(rows):
            where = f"{source} row {i + 1}"
            inst, out = _text(r.get(tc[0]), where, tc[0]), _text(r.get(oc), where, oc)
            inp = r.get(tc[1]) if len(tc) > 1 else None
            inp = str(inp) if inp not in (None, "") else None
            prompt = self.prompt(inst, inp)
            p = self.prompt_ids(prompt)
            resp = self.tok(self._response(inst, inp, out, prompt), add_special_tokens=False)["input_ids"]
            if len(p) + len(resp) > L:
                truncated += 1
                resp = resp[: max(L - len(p), min(len(resp), L // 2))]
                p = p[len(p) - (L - len(resp)):] if L - len(resp) > 0 else []
            feats.append({"input_ids": p + resp, "labels": [-100] * len(p) + resp, "prompt_ids": p, "ref": out})
        return feats, truncated


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

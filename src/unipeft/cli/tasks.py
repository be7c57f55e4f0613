"""Tasks: which columns they read, how rows become token ids and labels, how a batch is padded, which model
class they load, and how an evaluation batch turns into per-example records. Classification tasks live here,
generative ones (causal-lm, seq2seq) in lm.py; task_table.py maps `--task` names to classes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import metrics
from .data import as_list, columns_of
from .errors import CliError, column_error


def pick_column(given, candidates, cols, what, source, flag, required=True):
    if given:
        if given not in cols:
            raise column_error(what, given, cols, source, flag)
        return given
    for c in candidates:
        if c in cols:
            return c
    if required:
        raise CliError(f"no {what} column in {source} (looked for {', '.join(map(repr, candidates))}); "
                       f"columns found: {sorted(cols)}", f"pass {flag} with one of {sorted(cols)}")
    return None


def load_label_names(spec, data_file) -> list[str] | None:
    """--label-names: a comma list or a JSON file; else labels.json beside the data file."""
    path = Path(spec) if spec else (Path(data_file).parent / "labels.json" if data_file else None)
    if spec and not Path(spec).is_file():
        return [s.strip() for s in spec.split(",") if s.strip()]
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CliError(f"label names file {path} is not valid JSON: {e.msg}", 'write a list, e.g. ["O", "B-PER"]') from None
    if isinstance(data, dict):  # {"0": "O", ...} or {"O": 0, ...}
        if all(str(k).lstrip("-").isdigit() for k in data):
            data = [data[k] for k in sorted(data, key=lambda k: int(k))]
        else:
            data = [k for k, _ in sorted(data.items(), key=lambda kv: kv[1])]
    if not isinstance(data, list):
        raise CliError(f"label names file {path} must hold a list of names", 'e.g. ["O", "B-PER", "I-PER"]')
    return [str(x) for x in data]


def _label_value(v, where):
    if v is None or (isinstance(v, str) and not v.strip()):
        raise CliError(f"{where}: label is empty", "give every row a label (a class id or a name)")
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer():
            return int(v)
        raise CliError(f"{where}: label {v!r} is not a class id or name (regression is not supported)",
                       "use integer class ids or label names")
    if isinstance(v, str):
        return v.strip()
    raise CliError(f"{where}: label {v!r} ({type(v).__name__}) does not parse as a class id or name",
                   "use one integer id or one name per row")


class LabelMap:
    """Class ids <-> names. Integer labels keep their ids; string labels get ids in sorted order."""

    def __init__(self, names: list[str], by_name: bool):
        self.names, self.by_name = names, by_name
        self.index = {n: i for i, n in enumerate(names)}

    @classmethod
    def build(cls, values: list, names: list[str] | None, where) -> "LabelMap":
        if values and all(isinstance(v, int) for v in values):
            bad = [v for v in values if v < 0]
            if bad:
                raise CliError(f"{where}: negative label {bad[0]}", "class ids start at 0")
            n = max(max(values) + 1, 2, len(names or ()))
            if names and max(values) >= len(names):
                raise CliError(f"{where}: label id {max(values)} but only {len(names)} label names",
                               "fix --label-names (or labels.json) so it lists every class")
            return cls(list(names) if names else [str(i) for i in range(n)], by_name=False)
        uniq = sorted({str(v) for v in values})
        ordered = [n for n in (names or ()) if n in uniq] + [u for u in uniq if u not in (names or ())]
        if names and set(uniq) <= set(names):
            ordered = list(names)
        return cls(ordered, by_name=True)

    def id_of(self, v, where) -> int:
        if isinstance(v, int) and not self.by_name:
            if not 0 <= v < len(self.names):
                raise CliError(f"{where}: label id {v} is outside 0..{len(self.names) - 1} seen in training",
                               "use the training set's label ids")
            return v
        key = str(v)
        if key not in self.index:
            raise CliError(f"{where}: label {key!r} was not seen in training; known labels: {self.names[:20]}",
                           "fix the label, or add examples of it to the training data")
        return self.index[key]


class Task:
    name = ""
    auto_class = ""
    metric, greater_is_better = "eval_loss", False
    generates = False  # has references to generate against (exact match, BLEU, ROUGE)

    def __init__(self, tokenizer, max_length: int, meta: dict):
        self.tok, self.max_length, self.meta = tokenizer, max_length, meta

    # columns and labels ------------------------------------------------------------------------------------
    @classmethod
    def from_data(cls, tokenizer, max_length, rows, source, opts) -> "Task":
        raise NotImplementedError

    def check_columns(self, rows, source):
        cols = columns_of(rows)
        for c in self.meta.get("columns", []):
            if c and c not in cols:
                raise column_error("the", c, cols, source, "--text-column/--label-column")

    def model_kwargs(self) -> dict:
        return {}

    # encoding ----------------------------------------------------------------------------------------------
    def encode(self, rows, source) -> tuple[list[dict], int]:
        raise NotImplementedError

    def collate(self, feats: list[dict]) -> dict:
        pad = self.tok.pad_token_id
        n = max(len(f["input_ids"]) for f in feats)
        out = {"input_ids": torch.full((len(feats), n), pad, dtype=torch.long),
               "attention_mask": torch.zeros((len(feats), n), dtype=torch.long)}
        if "token_type_ids" in feats[0]:
            out["token_type_ids"] = torch.zeros((len(feats), n), dtype=torch.long)
        for i, f in enumerate(feats):
            L = len(f["input_ids"])
            out["input_ids"][i, :L] = torch.tensor(f["input_ids"])
            out["attention_mask"][i, :L] = 1
            if "token_type_ids" in out:
                out["token_type_ids"][i, :L] = torch.tensor(f["token_type_ids"])
        self.collate_labels(feats, out)
        return out

    def collate_labels(self, feats, out):
        lab = feats[0]["labels"]
        if isinstance(lab, int):
            out["labels"] = torch.tensor([f["labels"] for f in feats])
            return
        n = max(len(f["labels"]) for f in feats)
        out["labels"] = torch.full((len(feats), n), -100, dtype=torch.long)
        for i, f in enumerate(feats):
            out["labels"][i, : len(f["labels"])] = torch.tensor(f["labels"])

    # evaluation --------------------------------------------------------------------------------------------
    def eval_records(self, logits, batch, feats) -> list:
        raise NotImplementedError

    def finalize(self, records) -> dict:
        raise NotImplementedError


def _text(v, where, col):
    if v is None or (isinstance(v, float) and v != v):
        raise CliError(f"{where}: column {col!r} is empty", "fill in or remove that row")
    return v if isinstance(v, str) else str(v)


class SeqCls(Task):
    name, auto_class = "seq-cls", "AutoModelForSequenceClassification"
    metric, greater_is_better = "accuracy", True
    TEXT = ("text", "sentence", "content", "review", "question")
    PAIRS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"), ("question", "sentence"))

    @classmethod
    def from_data(cls, tok, max_length, rows, source, opts):
        cols = columns_of(rows)
        if opts.get("text_column"):
            texts = [c.strip() for c in opts["text_column"].split(",") if c.strip()]
            if len(texts) > 2:
                raise CliError(f"--text-column takes one column or two for pairs, got {len(texts)}",
                               "e.g. --text-column sentence1,sentence2")
            for c in texts:
                pick_column(c, (), cols, "text", source, "--text-column")
        else:
            pair = next((p for p in cls.PAIRS if all(c in cols for c in p)), None)
            texts = list(pair) if pair else [pick_column(None, cls.TEXT, cols, "text", source, "--text-column")]
        label = pick_column(opts.get("label_column"), ("label", "labels"), cols, "label", source, "--label-column")
        values = [_label_value(r.get(label), f"{source} row {i + 1}") for i, r in enumerate(rows)]
        names = load_label_names(opts.get("label_names"), opts.get("train"))
        lm = LabelMap.build(values, names, source)
        return cls(tok, max_length, {"text_columns": texts, "label_column": label, "labels": lm.names,
                                     "labels_by_name": lm.by_name, "columns": texts + [label]})

    @property
    def labels(self) -> LabelMap:
        return LabelMap(self.meta["labels"], self.meta["labels_by_name"])

    def model_kwargs(self):
        names = self.meta["labels"]
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}

    def encode(self, rows, source):
        tc, lc, lm = self.meta["text_columns"], self.meta["label_column"], self.labels
        a = [_text(r.get(tc[0]), f"{source} row {i + 1}", tc[0]) for i, r in enumerate(rows)]
        b = [_text(r.get(tc[1]), f"{source} row {i + 1}", tc[1]) for i, r in enumerate(rows)] if len(tc) > 1 else None
        labels = [lm.id_of(_label_value(r.get(lc), f"{source} row {i + 1}"), f"{source} row {i + 1}")
                  for i, r in enumerate(rows)]
        enc = self.tok(a, b) if b else self.tok(a)
        long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > self.max_length]
        feats = [{k: enc[k][i] for k in enc.keys() if k in ("input_ids", "token_type_ids")} for i in range(len(a))]
        if long:
            sub = self.tok([a[i] for i in long], [b[i] for i in long] if b else None, truncation=True,
                           max_length=self.max_length)
            for j, i in enumerate(long):
                feats[i] = {k: sub[k][j] for k in sub.keys() if k in ("input_ids", "token_type_ids")}
        for f, y in zip(feats, labels):
            f["labels"] = y
        return feats, len(long)

    def eval_records(self, logits, batch, feats):
        gold = batch["labels"]
        loss = F.cross_entropy(logits.float(), gold, reduction="none")
        return [(int(p), int(g), float(l)) for p, g, l in zip(logits.argmax(-1), gold, loss)]

    def finalize(self, records):
        preds, golds, losses = zip(*records)
        out = {"eval_loss": sum(losses) / len(losses)}
        out.update(metrics.classification(list(preds), list(golds), len(self.meta["labels"])))
        return out


class TokenCls(Task):
    name, auto_class = "token-cls", "AutoModelForTokenClassification"
    metric, greater_is_better = "f1", True

    @classmethod
    def from_data(cls, tok, max_length, rows, source, opts):
        if not getattr(tok, "is_fast", False):
            raise CliError("token classification needs a fast tokenizer (for word-to-token alignment)",
                           "use a model folder with a tokenizer.json")
        cols = columns_of(rows)
        words = pick_column(opts.get("text_column"), ("tokens", "words"), cols, "tokens", source, "--text-column")
        tags = pick_column(opts.get("label_column"), ("ner_tags", "tags", "labels", "label", "pos_tags"), cols,
                           "tags", source, "--label-column")
        values = []
        for i, r in enumerate(rows):
            where = f"{source} row {i + 1}"
            ws, ts = as_list(r.get(words), "tokens", where), as_list(r.get(tags), "tags", where)
            if len(ws) != len(ts):
                raise CliError(f"{where}: {len(ws)} tokens but {len(ts)} tags",
                               "give exactly one tag per token")
            values += [_label_value(t, where) for t in ts]
        names = load_label_names(opts.get("label_names"), opts.get("train"))
        lm = LabelMap.build(values, names, source)
        return cls(tok, max_length, {"text_columns": [words], "label_column": tags, "labels": lm.names,
                                     "labels_by_name": lm.by_name, "columns": [words, tags]})

    model_kwargs = SeqCls.model_kwargs
    labels = SeqCls.labels

    def encode(self, rows, source):
        wc, tc, lm = self.meta["text_columns"][0], self.meta["label_column"], self.labels
        words, tags = [], []
        for i, r in enumerate(rows):
            where = f"{source} row {i + 1}"
            ws, ts = [str(w) for w in as_list(r.get(wc), "tokens", where)], as_list(r.get(tc), "tags", where)
            if len(ws) != len(ts):
                raise CliError(f"{where}: {len(ws)} tokens but {len(ts)} tags", "give exactly one tag per token")
            words.append(ws)
            tags.append([lm.id_of(_label_value(t, where), where) for t in ts])
        keep = [i for i, w in enumerate(words) if w]
        enc = self.tok([words[i] for i in keep], is_split_into_words=True, truncation=True, max_length=self.max_length)
        feats, truncated = [], 0
        for j, i in enumerate(keep):
            wids = enc.word_ids(j)
            labels, word_index, prev = [], [], None
            for w in wids:
                if w is not None and w != prev:
                    labels.append(tags[i][w])
                    word_index.append(w)
                else:
                    labels.append(-100)
                prev = w if w is not None else prev
            covered = max((w for w in wids if w is not None), default=-1) + 1
            truncated += covered < len(words[i]) and len(enc["input_ids"][j]) >= self.max_length
            f = {"input_ids": enc["input_ids"][j], "labels": labels, "gold": tags[i], "word_index": word_index}
            if "token_type_ids" in enc:
                f["token_type_ids"] = enc["token_type_ids"][j]
            feats.append(f)
        return feats, int(truncated)

    def eval_records(self, logits, batch, feats):
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
        pred = logits.argmax(-1)
        out = []
        for i, f in enumerate(feats):
            keep = labels[i] != -100
            words = [None] * len(f["gold"])  # words cut by truncation (or with no tokens) count as "O"
            for w, p in zip(f["word_index"], pred[i][keep].tolist()):
                words[w] = p
            out.append((words, f["gold"], float(loss[i][keep].sum()), int(keep.sum())))
        return out

    def finalize(self, records):
        names = self.meta["labels"]
        o = names.index("O") if "O" in names else 0
        preds = [[names[o if p is None else p] for p in pw] for pw, _, _, _ in records]
        golds = [[names[g] for g in gs] for _, gs, _, _ in records]
        total = sum(r[3] for r in records)
        out = {"eval_loss": sum(r[2] for r in records) / max(total, 1)}
        out.update(metrics.entity_f1(preds, golds))
        return out

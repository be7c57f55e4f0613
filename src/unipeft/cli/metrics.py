"""Metric functions: accuracy/F1, seqeval-style entity F1, perplexity, exact match, BLEU (sacrebleu), ROUGE-L."""

from __future__ import annotations

import math


def classification(preds: list[int], golds: list[int], num_labels: int) -> dict:
    n = len(golds)
    acc = sum(p == g for p, g in zip(preds, golds)) / max(n, 1)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    out = {"accuracy": acc, "f1": sum(f1s) / len(f1s) if f1s else 0.0}
    if num_labels == 2:  # the GLUE convention for binary tasks: F1 of class 1
        tp = sum(p == 1 and g == 1 for p, g in zip(preds, golds))
        fp = sum(p == 1 and g == 0 for p, g in zip(preds, golds))
        fn = sum(p == 0 and g == 1 for p, g in zip(preds, golds))
        out["f1_pos"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) chunks of an IOB1/IOB2 tag sequence, as conlleval/seqeval's default mode reads them."""
    chunks, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-") if "-" in tag else ("O" if tag == "O" else "B", "", tag)
        ends = kind is not None and (prefix in ("O", "B", "S") or t != kind)
        if ends:
            chunks.add((kind, start, i))
            kind = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and kind is None):
            start, kind = i, t
        if prefix in ("E", "S") and kind is not None:
            chunks.add((kind, start, i + 1))
            kind = None
    return chunks


def entity_f1(preds: list[list[str]], golds: list[list[str]]) -> dict:
    tp = n_pred = n_gold = 0
    correct = total = 0
    for p, g in zip(preds, golds):
        pe, ge = entities(p), entities(g)
        tp += len(pe & ge)
        n_pred += len(pe)
        n_gold += len(ge)
        correct += sum(a == b for a, b in zip(p, g))
        total += len(g)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1, "accuracy": correct / max(total, 1)}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def generation(preds: list[str], refs: list[str]) -> dict:
    out = {"exact_match": sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / max(len(refs), 1)}
    try:
        import sacrebleu

        out["bleu"] = sacrebleu.corpus_bleu(preds, [refs]).score
    except ImportError:
        pass
    try:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
        scores = [scorer.score(r, p) for p, r in zip(preds, refs)]
        out["rouge1"] = sum(s["rouge1"].fmeasure for s in scores) / max(len(scores), 1)
        out["rougeL"] = sum(s["rougeL"].fmeasure for s in scores) / max(len(scores), 1)
    except ImportError:
        out["rougeL"] = sum(_lcs_f(p, r) for p, r in zip(preds, refs)) / max(len(refs), 1)
    return out


def _lcs_f(pred: str, ref: str) -> float:
    a, b = pred.split(), ref.split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)

"""Evaluation metrics of the fine-tuning tasks, in numpy (no scipy / sklearn at run time).

Classification: `accuracy`, `f1_score` (binary), `matthews_corrcoef` (binary and multi-class,
the R_K statistic sklearn computes). Regression: `pearson`, `spearman` (Pearson of average
ranks, as scipy). Tagging: `get_entities` and `entity_scores`, seqeval's default (lenient) mode
for BIO / IOB1 / IOBES tags. Reading comprehension: `squad_evaluate`, the official SQuAD v1.1 /
v2.0 exact match and F1 (v2.0: HasAns / NoAns breakdown and the best no-answer threshold).
Replaced-token detection: `roc_auc`.

Every function takes plain sequences or numpy arrays and returns python floats (SQuAD scores
are percentages, as the official scripts print them; the others are fractions).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------- classification


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _check_same_length(a, b, names=("predictions", "labels")) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names[0]} and {names[1]} differ in length: {len(a)} vs {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty")


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to the labels."""
    p, y = _as_1d(predictions, "predictions"), _as_1d(labels, "labels")
    _check_same_length(p, y)
    return float(np.mean(p == y))


def f1_score(predictions, labels, positive=1) -> float:
    """Binary F1 of the class `positive`: 2PR / (P + R); 0 when there is no true positive."""
    p, y = _as_1d(predictions, "predictions"), _as_1d(labels, "labels")
    _check_same_length(p, y)
    tp = float(np.sum((p == positive) & (y == positive)))
    fp = float(np.sum((p == positive) & (y != positive)))
    fn = float(np.sum((p != positive) & (y == positive)))
    if tp == 0:
        return 0.0
    return 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation coefficient (multi-class R_K; for two classes
    (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))). 0 when undefined."""
    p, y = _as_1d(predictions, "predictions"), _as_1d(labels, "labels")
    _check_same_length(p, y)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    yi, pi = inverse[: len(y)], inverse[len(y) :]
    conf = np.zeros((k, k), np.float64)
    np.add.at(conf, (yi, pi), 1.0)
    t_sum = conf.sum(axis=1)  # true occurrences of each class
    p_sum = conf.sum(axis=0)  # predicted occurrences
    n_correct = np.trace(conf)
    n = conf.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    denom = cov_ytyt * cov_ypyp
    if denom == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(denom))


# --------------------------------------------------------------------------- correlation


def pearson(x, y) -> float:
    """Pearson correlation; nan when either input is constant."""
    a = _as_1d(x, "x").astype(np.float64)
    b = _as_1d(y, "y").astype(np.float64)
    _check_same_length(a, b, ("x", "y"))
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    if denom == 0:
        return float("nan")
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (scipy.stats.rankdata's default)."""
    a = _as_1d(x, "x")
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start of each run of equal values.
    new_run = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [len(a)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(a), np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the (average-tie) ranks."""
    a, b = _as_1d(x, "x"), _as_1d(y, "y")
    _check_same_length(a, b, ("x", "y"))
    return pearson(rankdata(a), rankdata(b))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of binary `labels` (1 = positive) ranked by `scores` (ties count
    one half): the Mann-Whitney statistic. nan when one class is absent."""
    s = _as_1d(scores, "scores").astype(np.float64)
    y = _as_1d(labels, "labels").astype(bool)
    _check_same_length(s, y, ("scores", "labels"))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------- seqeval

Entity = tuple[str, int, int]  # (type, first token, last token), inclusive


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_') as seqeval splits tags."""
    prefix = tag[:1]
    type_ = tag[1:].split("-", maxsplit=1)[-1] or "_"
    return prefix, type_


def _end_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _start_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str] | Sequence[Sequence[str]]) -> list[Entity]:
    """Entity spans of a tag sequence (or of a list of sentences, which are concatenated with an
    'O' after each, so offsets run over the whole corpus), seqeval's default-mode rules: works
    for BIO (IOB2), IOB1 and IOBES; an I- after O or after another type starts an entity."""
    if any(isinstance(s, list | tuple) for s in tags):
        flat: list[str] = []
        for sentence in tags:
            flat.extend(list(sentence) + ["O"])
        tags = flat
    prev_tag, prev_type, begin = "O", "", 0
    chunks: list[Entity] = []
    for i, chunk in enumerate(list(tags) + ["O"]):
        tag, type_ = _split_tag(chunk)
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def _prf(n_correct: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    p = n_correct / n_pred if n_pred else 0.0
    r = n_correct / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def entity_scores(
    y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Entity-level micro precision / recall / F1 (seqeval's default mode), plus per-type F1
    (`f1_<TYPE>`) and the token accuracy. y_true, y_pred: lists of sentences of tags."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} gold sentences but {len(y_pred)} predicted sentences")
    for i, (t, p) in enumerate(zip(y_true, y_pred, strict=True)):
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(t)} gold tags but {len(p)} predicted tags")
    true_ents = collections.defaultdict(set)
    pred_ents = collections.defaultdict(set)
    for type_, s, e in get_entities([list(t) for t in y_true]):
        true_ents[type_].add((s, e))
    for type_, s, e in get_entities([list(p) for p in y_pred]):
        pred_ents[type_].add((s, e))
    n_correct = sum(len(true_ents[k] & pred_ents[k]) for k in true_ents)
    n_pred = sum(len(v) for v in pred_ents.values())
    n_true = sum(len(v) for v in true_ents.values())
    p, r, f = _prf(n_correct, n_pred, n_true)
    out = {"precision": p, "recall": r, "f1": f}
    for k in sorted(set(true_ents) | set(pred_ents)):
        out[f"f1_{k}"] = _prf(
            len(true_ents[k] & pred_ents[k]), len(pred_ents[k]), len(true_ents[k])
        )[2]
    flat_t = [x for s in y_true for x in s]
    flat_p = [x for s in y_pred for x in s]
    out["accuracy"] = (
        float(np.mean([a == b for a, b in zip(flat_t, flat_p, strict=True)])) if flat_t else 0.0
    )
    return out


# --------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, articles (a, an, the) and extra whitespace (the official
    SQuAD normalisation)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str, version: str = "v2") -> float:
    """Token-overlap F1 of the normalised strings. v2.0: when either is empty, 1 if both are;
    v1.1: 0 whenever no token is shared."""
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    if version == "v2" and (not pred_toks or not gold_toks):
        return float(pred_toks == gold_toks)
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _best_threshold(preds, scores, na_probs, has_ans) -> tuple[float, float]:
    """The official v2.0 `find_best_thresh`: the score when every question whose no-answer
    probability is above the threshold is answered with no answer, maximised over thresholds."""
    num_no_ans = sum(1 for k in has_ans if not has_ans[k])
    cur = best = float(num_no_ans)
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1.0 if preds[qid] else 0.0
        cur += diff
        if cur > best:
            best = cur
            best_thresh = na_probs[qid]
    return 100.0 * best / len(scores), float(best_thresh)


def squad_evaluate(
    gold_answers: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    version: str = "v2",
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """The official SQuAD scores (percentages).

    gold_answers: question id -> list of gold answer texts (empty for unanswerable v2.0
    questions). predictions: question id -> predicted text ("" for no answer). Questions with
    no prediction count as wrong (the official scripts warn and score 0).

    v1.1: {exact_match, f1, total}. v2.0 adds the HasAns_* / NoAns_* breakdown and, given
    `na_probs` (question id -> no-answer score, higher = more likely unanswerable), the answer
    `na_prob_thresh` applies (above it: no answer) and best_exact / best_f1 with their thresholds.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    if not gold_answers:
        raise ValueError("no gold answers to evaluate")
    exact, f1, has_ans = {}, {}, {}
    for qid, golds in gold_answers.items():
        golds = list(golds)
        if version == "v2":
            golds = [g for g in golds if normalize_answer(g)] or [""]
        elif not golds:
            raise ValueError(f"question {qid!r} has no gold answer (SQuAD v1.1 needs one)")
        has_ans[qid] = bool(golds[0]) if version == "v2" else True
        pred = predictions.get(qid)
        if pred is None:
            exact[qid] = f1[qid] = 0.0
            continue
        exact[qid] = max(squad_exact(pred, g) for g in golds)
        f1[qid] = max(squad_f1(pred, g, version) for g in golds)

    if version == "v1":
        n = len(gold_answers)
        return {
            "exact_match": 100.0 * sum(exact.values()) / n,
            "f1": 100.0 * sum(f1.values()) / n,
            "total": float(n),
        }

    preds = {qid: predictions.get(qid, "") for qid in gold_answers}
    if na_probs is not None:
        exact_t, f1_t = dict(exact), dict(f1)
        for qid in gold_answers:
            if na_probs.get(qid, 0.0) > na_prob_thresh:
                exact_t[qid] = f1_t[qid] = float(not has_ans[qid])
    else:
        exact_t, f1_t = exact, f1

    def summary(ids, prefix=""):
        ids = list(ids)
        if not ids:
            return {}
        return {
            f"{prefix}exact_match": 100.0 * sum(exact_t[k] for k in ids) / len(ids),
            f"{prefix}f1": 100.0 * sum(f1_t[k] for k in ids) / len(ids),
            f"{prefix}total": float(len(ids)),
        }

    out = summary(gold_answers)
    out.update(summary([k for k in gold_answers if has_ans[k]], "HasAns_"))
    out.update(summary([k for k in gold_answers if not has_ans[k]], "NoAns_"))
    if na_probs is not None:
        probs = {k: float(na_probs.get(k, 0.0)) for k in gold_answers}
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(preds, exact, probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(preds, f1, probs, has_ans)
    return out

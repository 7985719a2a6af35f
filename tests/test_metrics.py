"""funnel_jax.metrics against hand-computed values (and scipy for the correlations)."""

import math

import numpy as np
import pytest
import scipy.stats

from funnel_jax import metrics

# --------------------------------------------------------------------------- classification

# preds/labels by index: TP at 0, 4, 6; FP at 1, 7; TN at 2, 3; FN at 5.
PREDS = [1, 1, 0, 0, 1, 0, 1, 1]
LABELS = [1, 0, 0, 0, 1, 1, 1, 0]


def test_accuracy_and_f1_by_hand():
    assert metrics.accuracy(PREDS, LABELS) == pytest.approx(5 / 8)
    # F1 = 2TP / (2TP + FP + FN) = 6 / 9
    assert metrics.f1_score(PREDS, LABELS) == pytest.approx(6 / 9)
    # positive class 0: TP=2 (2,3), FP=1 (5), FN=2 (1,7) -> 4 / 7
    assert metrics.f1_score(PREDS, LABELS, positive=0) == pytest.approx(4 / 7)
    assert metrics.f1_score([0, 0], [1, 1]) == 0.0


def test_matthews_binary_by_hand():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3*2 - 2*1) / sqrt(5*4*4*3)
    assert metrics.matthews_corrcoef(PREDS, LABELS) == pytest.approx(4 / math.sqrt(240))
    assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    # A constant prediction: undefined, reported as 0 (as sklearn and GLUE do).
    assert metrics.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0


def test_matthews_multiclass_by_hand():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    # Gorodkin's R_K: c = 4 correct, s = 6, t = (2, 2, 2), p = (2, 3, 1)
    # (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt((36 - 14)(36 - 12))
    assert metrics.matthews_corrcoef(p, y) == pytest.approx(12 / math.sqrt(22 * 24))


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([1, 0], [1])


# --------------------------------------------------------------------------- correlations


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pearson_spearman_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=50)
    y = 0.6 * x + rng.normal(size=50)
    # Ties (rounded values) exercise the average ranks.
    xt, yt = np.round(x, 0), np.round(y, 0)
    for a, b in ((x, y), (xt, yt), (x, yt)):
        assert metrics.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-12)
        assert metrics.spearman(a, b) == pytest.approx(
            scipy.stats.spearmanr(a, b).correlation, abs=1e-12
        )


def test_rankdata_matches_scipy_and_hand():
    assert metrics.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    a = np.random.default_rng(3).integers(0, 5, size=40)
    np.testing.assert_allclose(metrics.rankdata(a), scipy.stats.rankdata(a))


def test_pearson_constant_is_nan():
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))


def test_roc_auc_by_hand():
    # Pairs (pos, neg): (0.35 vs 0.1) win, (0.35 vs 0.4) lose, 0.8 wins both: 3/4.
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # A tie counts one half.
    assert metrics.roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)


# --------------------------------------------------------------------------- seqeval


def test_get_entities_bio_iob1_iobes_by_hand():
    assert metrics.get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [
        ("PER", 0, 1),
        ("LOC", 3, 3),
    ]
    # Default (lenient) mode: an I- after O starts an entity; a type change ends one.
    assert metrics.get_entities(["O", "I-PER", "I-PER"]) == [("PER", 1, 2)]
    assert metrics.get_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    # IOB1: B- only separates two adjacent entities of one type.
    assert metrics.get_entities(["I-PER", "I-PER", "B-PER", "O"]) == [
        ("PER", 0, 1),
        ("PER", 2, 2),
    ]
    # IOBES.
    assert metrics.get_entities(["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]) == [
        ("PER", 0, 0),
        ("LOC", 2, 4),
        ("LOC", 5, 5),
    ]
    # Sentences are joined with an O between them.
    assert metrics.get_entities([["B-PER"], ["I-PER"]]) == [("PER", 0, 0), ("PER", 2, 2)]


def test_entity_scores_by_hand():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG", "O"]]
    y_pred = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O", "O"]]
    # True: PER, LOC, ORG(3 tokens); predicted: PER, LOC, ORG(2 tokens): 2 of 3 right.
    s = metrics.entity_scores(y_true, y_pred)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["f1_PER"] == 1.0 and s["f1_LOC"] == 1.0 and s["f1_ORG"] == 0.0
    assert s["accuracy"] == pytest.approx(8 / 9)

    # Precision and recall differ: gold 2 entities, predicted 4 of which 1 right.
    y_true = [["B-PER", "O", "B-LOC", "O"]]
    y_pred = [["B-PER", "B-MISC", "B-ORG", "B-LOC"]]
    s = metrics.entity_scores(y_true, y_pred)
    p, r = 1 / 4, 1 / 2
    assert s["precision"] == pytest.approx(p)
    assert s["recall"] == pytest.approx(r)
    assert s["f1"] == pytest.approx(2 * p * r / (p + r))


def test_entity_scores_empty_prediction_is_zero():
    s = metrics.entity_scores([["B-PER", "O"]], [["O", "O"]])
    assert s["precision"] == 0.0 and s["recall"] == 0.0 and s["f1"] == 0.0


# --------------------------------------------------------------------------- SQuAD


def test_normalize_answer_by_hand():
    assert metrics.normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert metrics.normalize_answer("An apple a day") == "apple day"
    # Articles go only as whole words.
    assert metrics.normalize_answer("Theatre and another") == "theatre and another"


GOLD = {
    "q1": ["eiffel tower"],
    "q2": ["Paris", "France"],
    "q3": ["apple day"],
    "q4": ["red"],
}
PRED = {
    "q1": "The Eiffel Tower!",  # EM 1 after normalisation
    "q2": "in Paris, France",  # tokens (in, paris, france): F1 vs 'paris' = 2*(1/3*1)/(4/3) = 0.5
    "q3": "an apple a day",  # EM 1 (articles)
    "q4": "blue",  # 0
}


def test_squad_v1_by_hand():
    s = metrics.squad_evaluate(GOLD, PRED, version="v1")
    assert s["exact_match"] == pytest.approx(100 * 2 / 4)
    assert s["f1"] == pytest.approx(100 * (1 + 0.5 + 1 + 0) / 4)
    assert s["total"] == 4
    assert metrics.squad_f1("in Paris, France", "Paris") == pytest.approx(0.5)


def test_squad_missing_prediction_counts_zero():
    s = metrics.squad_evaluate(GOLD, {"q1": "eiffel tower"}, version="v1")
    assert s["exact_match"] == pytest.approx(25.0)


def test_squad_v2_breakdown_and_best_threshold_by_hand():
    gold = {**GOLD, "q5": [], "q6": []}
    pred = {**PRED, "q5": "", "q6": "something"}
    na = {"q1": 0.1, "q2": 0.2, "q3": 0.3, "q4": 0.9, "q5": 0.5, "q6": 0.8}
    s = metrics.squad_evaluate(gold, pred, na_probs=na, version="v2")
    # No-answer questions: q5 right (empty), q6 wrong.
    assert s["HasAns_exact_match"] == pytest.approx(50.0)
    assert s["HasAns_f1"] == pytest.approx(62.5)
    assert s["HasAns_total"] == 4
    assert s["NoAns_exact_match"] == pytest.approx(50.0)
    assert s["NoAns_total"] == 2
    assert s["exact_match"] == pytest.approx(100 * 3 / 6)
    assert s["f1"] == pytest.approx(100 * 3.5 / 6)
    # Threshold search over na (ascending): start at 2 (all no-answer right); q1 +1 -> 3,
    # q2 +0 (EM) / +0.5 (F1), q3 +1 -> 4 / 4.5 at na 0.3, then q5 0, q6 -1, q4 0.
    assert s["best_exact"] == pytest.approx(100 * 4 / 6)
    assert s["best_exact_thresh"] == pytest.approx(0.3)
    assert s["best_f1"] == pytest.approx(100 * 4.5 / 6)
    assert s["best_f1_thresh"] == pytest.approx(0.3)

    # Answers with na above the threshold become "no answer": q4 (has an answer, stays 0) and
    # q6 (no answer: now right) -> q1, q3, q5, q6 right.
    s = metrics.squad_evaluate(gold, pred, na_probs=na, version="v2", na_prob_thresh=0.5)
    assert s["exact_match"] == pytest.approx(100 * 4 / 6)


def test_squad_v2_empty_vs_answer():
    # v2.0: an empty prediction scores 1 only against no answer.
    assert metrics.squad_f1("", "") == 1.0
    assert metrics.squad_f1("", "paris") == 0.0
    s = metrics.squad_evaluate({"a": [], "b": ["x y"]}, {"a": "", "b": ""}, version="v2")
    assert s["exact_match"] == pytest.approx(50.0)
    assert s["NoAns_exact_match"] == 100.0 and s["HasAns_exact_match"] == 0.0


# --------------------------------------------------------------------------- against seqeval


def _random_tags(rng, n_sentences, schemes=("B", "I", "E", "S"), types=("PER", "LOC", "ORG")):
    """Sentences of random (often malformed) tags: I- after O, type changes, stray E-/S-."""
    out = []
    for _ in range(n_sentences):
        length = int(rng.integers(1, 12))
        tags = []
        for _ in range(length):
            if rng.random() < 0.35:
                tags.append("O")
            else:
                tags.append(f"{rng.choice(schemes)}-{rng.choice(types)}")
        out.append(tags)
    return out


def _perturb(rng, y_true, p=0.25):
    """Predictions: the gold tags with a fraction replaced at random."""
    pool = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "E-PER", "S-LOC"]
    return [[t if rng.random() > p else str(rng.choice(pool)) for t in s] for s in y_true]


@pytest.mark.parametrize(
    "schemes", [("B", "I"), ("I",), ("B", "I", "E", "S")], ids=["bio", "iob1", "iobes"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entity_scores_match_seqeval(schemes, seed):
    from seqeval.metrics import (
        accuracy_score,
        classification_report,
        f1_score,
        precision_score,
        recall_score,
    )
    from seqeval.metrics.sequence_labeling import get_entities

    rng = np.random.default_rng(seed)
    y_true = _random_tags(rng, 40, schemes=schemes)
    y_pred = _perturb(rng, y_true)
    ours = metrics.entity_scores(y_true, y_pred)
    assert ours["precision"] == pytest.approx(precision_score(y_true, y_pred), abs=1e-12)
    assert ours["recall"] == pytest.approx(recall_score(y_true, y_pred), abs=1e-12)
    assert ours["f1"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert 0.0 < ours["f1"] < 1.0  # a real comparison, not two trivial scores
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    per_type = {k: v["f1-score"] for k, v in report.items() if not k.endswith(" avg")}
    assert {k[3:]: v for k, v in ours.items() if k.startswith("f1_")} == pytest.approx(per_type)
    for sentence in y_true[:10] + y_pred[:10]:
        assert metrics.get_entities(sentence) == get_entities(sentence), sentence

"""Every metric on small cases with known answers, cross-checked against a second
implementation (TorchMetrics, NumPy formulas, NLTK, or the official SQuAD v1.1 script's logic
written out here), and never crashing on invalid predictions."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dtvg_ds.data import metrics
from dtvg_ds.data.metrics import compute

BIN = ("0", "1")


# ---------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------


def test_accuracy_known_and_invalid_counts_wrong() -> None:
    r = compute("accuracy", ["1", " 0 ", "1", "yes"], ["1", "0", "0", "1"], BIN)
    assert r["accuracy"] == pytest.approx(50.0) and r["score"] == r["accuracy"]
    # without a label set, "yes" is simply a wrong string
    assert compute("accuracy", ["yes"], ["yes"])["accuracy"] == 100.0
    assert compute("accuracy", ["yes"], ["yes"], BIN)["accuracy"] == 0.0  # not a label


def test_binary_f1_known_values_and_invalid_is_always_wrong() -> None:
    from torchmetrics.functional.classification import binary_f1_score

    preds, refs = ["1", "1", "0", "0", "1"], ["1", "0", "1", "0", "1"]
    r = compute("accuracy_f1", preds, refs, BIN)
    tp, fp, fn = 2, 1, 1
    assert r["f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn))
    assert r["accuracy"] == pytest.approx(60.0)
    tm = binary_f1_score(torch.tensor([int(x) for x in preds]),
                         torch.tensor([int(x) for x in refs]))
    assert r["f1"] == pytest.approx(100 * float(tm), abs=1e-4)
    # an invalid prediction on a negative is a false positive, on a positive a false negative
    r = compute("accuracy_f1", ["1", "?", "?"], ["1", "0", "1"], BIN)
    assert r["f1"] == pytest.approx(100 * 2 * 1 / (2 * 1 + 1 + 1))
    assert r["accuracy"] == pytest.approx(100 / 3)


def test_macro_f1_cb() -> None:
    from torchmetrics.functional.classification import multiclass_f1_score

    preds = ["0", "1", "2", "2", "1", "0", "0"]
    refs = ["0", "1", "2", "1", "1", "2", "0"]
    r = compute("accuracy_macro_f1", preds, refs, ("0", "1", "2"))
    f1 = {"0": 2 * 2 / (2 * 2 + 1 + 0), "1": 2 * 2 / (2 * 2 + 0 + 1), "2": 2 * 1 / (2 + 1 + 1)}
    assert r["macro_f1"] == pytest.approx(100 * sum(f1.values()) / 3)
    tm = multiclass_f1_score(torch.tensor([int(x) for x in preds]),
                             torch.tensor([int(x) for x in refs]), num_classes=3,
                             average="macro")
    assert r["macro_f1"] == pytest.approx(100 * float(tm), abs=1e-4)
    assert r["accuracy"] == pytest.approx(100 * 5 / 7)
    # invalid: costs recall of the true class, no false positive anywhere
    r = compute("accuracy_macro_f1", ["0", "bad"], ["0", "1"], ("0", "1", "2"))
    assert r["macro_f1"] == pytest.approx(100 * (1.0 + 0.0 + 0.0) / 3)


def _mcc_numpy(p: list[int], r: list[int]) -> float:
    tp = sum(a == 1 and b == 1 for a, b in zip(p, r, strict=True))
    tn = sum(a == 0 and b == 0 for a, b in zip(p, r, strict=True))
    fp = sum(a == 1 and b == 0 for a, b in zip(p, r, strict=True))
    fn = sum(a == 0 and b == 1 for a, b in zip(p, r, strict=True))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def test_matthews_known_and_cross_checked() -> None:
    from torchmetrics.functional.classification import binary_matthews_corrcoef

    refs = ["1", "1", "0", "0", "1", "0"]
    assert compute("matthews", refs, refs, BIN)["score"] == pytest.approx(100.0)
    flipped = ["0" if x == "1" else "1" for x in refs]
    assert compute("matthews", flipped, refs, BIN)["score"] == pytest.approx(-100.0)
    preds = ["1", "0", "0", "1", "1", "0"]
    got = compute("matthews", preds, refs, BIN)["matthews_correlation"]
    p, r = [int(x) for x in preds], [int(x) for x in refs]
    assert got == pytest.approx(100 * _mcc_numpy(p, r))
    assert got == pytest.approx(100 * float(binary_matthews_corrcoef(torch.tensor(p),
                                                                      torch.tensor(r))), abs=1e-4)
    assert compute("matthews", ["1"] * 6, refs, BIN)["score"] == 0.0  # constant: 0, not NaN
    assert compute("matthews", ["x", "1", "0", "0", "1", "0"], refs, BIN)["score"] < 100


def test_pearson_spearman_cross_checked() -> None:
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    refs = ["0.0", "1.4", "2.2", "3.8", "5.0", "4.2"]
    preds = ["0.4", "1.0", "3.0", "3.6", "4.8", "2.0"]
    r = compute("pearson_spearman", preds, refs)
    p, t = np.array([float(x) for x in preds]), np.array([float(x) for x in refs])
    assert r["pearson"] == pytest.approx(100 * np.corrcoef(p, t)[0, 1])
    ranks = [np.argsort(np.argsort(v)) for v in (p, t)]  # no ties here
    assert r["spearmanr"] == pytest.approx(100 * np.corrcoef(*ranks)[0, 1])
    assert r["pearson"] == pytest.approx(100 * float(pearson_corrcoef(torch.tensor(p),
                                                                      torch.tensor(t))), abs=1e-3)
    assert r["spearmanr"] == pytest.approx(
        100 * float(spearman_corrcoef(torch.tensor(p), torch.tensor(t))), abs=1e-3)
    assert r["score"] == r["pearson"]
    # a non-number is -1 (off the 0-5 scale); a constant prediction scores 0, not NaN
    bad = compute("pearson_spearman", ["oops"] + preds[1:], refs)
    q = np.array([-1.0] + [float(x) for x in preds[1:]])
    assert bad["pearson"] == pytest.approx(100 * np.corrcoef(q, t)[0, 1])
    assert compute("pearson_spearman", ["2.0"] * 6, refs)["score"] == 0.0


def test_multirc_f1a_and_grouped_exact_match() -> None:
    preds = ["1", "0", "1", "1", "?"]
    refs = ["1", "0", "0", "1", "1"]
    groups = ["q1", "q1", "q2", "q3", "q3"]
    r = compute("multirc", preds, refs, BIN, groups=groups)
    # F1a over all options: tp 2, fp 1 (q2), fn 1 (the invalid one)
    assert r["f1a"] == pytest.approx(100 * 4 / 6)
    assert r["exact_match"] == pytest.approx(100 / 3)  # only q1 fully right
    assert r["score"] == r["f1a"]
    assert compute("multirc", preds, refs, BIN)["exact_match"] == pytest.approx(60.0)


# ---------------------------------------------------------------------------------------------
# SQuAD F1 / EM against the official v1.1 evaluation logic, written out here
# ---------------------------------------------------------------------------------------------


def _official_normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _official_f1(pred: str, gold: str) -> float:
    p, g = _official_normalize(pred).split(), _official_normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def _official(preds: list[str], refs: list[list[str]]) -> tuple[float, float]:
    f1 = [max(_official_f1(p, g) for g in gs) for p, gs in zip(preds, refs, strict=True)]
    em = [max(float(_official_normalize(p) == _official_normalize(g)) for g in gs)
          for p, gs in zip(preds, refs, strict=True)]
    return 100 * sum(f1) / len(f1), 100 * sum(em) / len(em)


def test_squad_known_answers() -> None:
    r = compute("squad", ["The Denver Broncos!"], [["Denver Broncos"]])
    assert (r["f1"], r["exact_match"]) == (pytest.approx(100.0), pytest.approx(100.0))
    r = compute("squad", ["Denver"], [["Denver Broncos"]])
    assert r["f1"] == pytest.approx(100 * 2 * 1 * 0.5 / 1.5) and r["exact_match"] == 0.0
    # max over gold answers; a plain string reference works too
    r = compute("squad", ["Broncos", "x"], [["Denver Broncos", "Broncos"], "y"])
    assert r["f1"] == pytest.approx(50.0) and r["exact_match"] == pytest.approx(50.0)
    assert r["score"] == r["f1"]


def test_squad_matches_the_official_logic() -> None:
    preds = ["in the year 1999", "a cat", "", "Paris, France", "the big red dog", "42"]
    refs = [["1999", "year 1999"], ["the cat"], ["something"], ["Paris"],
            ["big dog", "red dog"], ["forty-two", "42 ."]]
    r = compute("squad", preds, refs)
    f1, em = _official(preds, refs)
    assert r["f1"] == pytest.approx(f1, abs=1e-4)
    assert r["exact_match"] == pytest.approx(em, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# NLG: BLEU (sacreBLEU vs TorchMetrics and NLTK), ROUGE (rouge-score vs TorchMetrics and LCS)
# ---------------------------------------------------------------------------------------------

HYPS = ["the cat sat on the mat today", "a dog ran in the park with joy",
        "birds fly over the blue sea"]
REFS = [["the cat sat on the mat", "a cat was sitting on the mat today"],
        ["the dog ran in the park with great joy"],
        ["birds fly over the sea", "the birds are flying over the blue sea", "birds over sea"]]


def test_bleu_identical_is_100_and_matches_two_other_implementations() -> None:
    assert compute("nlg", ["a b c d e"], [["a b c d e"]])["bleu"] == pytest.approx(100.0)
    got = compute("nlg", HYPS, REFS)
    from nltk.translate.bleu_score import corpus_bleu
    from torchmetrics.functional.text import sacre_bleu_score

    nltk_bleu = corpus_bleu([[r.split() for r in rs] for rs in REFS], [h.split() for h in HYPS])
    assert got["bleu"] == pytest.approx(100 * nltk_bleu, abs=1e-3)
    # TorchMetrics needs the same number of references per example: pad by repeating one
    padded = [rs + [rs[0]] * (3 - len(rs)) for rs in REFS]
    tm = float(sacre_bleu_score(HYPS, padded, tokenize="13a"))
    assert got["bleu"] == pytest.approx(100 * tm, abs=1e-3)
    assert got["score"] == got["bleu"]


def _lcs(a: list[str], b: list[str]) -> int:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_rouge_known_and_cross_checked() -> None:
    from torchmetrics.functional.text import rouge_score

    r = compute("nlg", ["a b c d"], [["a c d e"]])
    lcs = _lcs("a b c d".split(), "a c d e".split())
    assert r["rougeL"] == pytest.approx(100 * lcs / 4)  # P = R = 3/4
    assert r["rouge1"] == pytest.approx(75.0) and r["rouge2"] == pytest.approx(100 / 3)
    got = compute("nlg", HYPS, REFS)
    tm = rouge_score(HYPS, REFS, use_stemmer=True, accumulate="best",
                     rouge_keys=("rouge1", "rouge2", "rougeL"))
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(100 * float(tm[f"{k}_fmeasure"]), abs=1e-3), k


def test_meteor_only_when_it_runs_offline() -> None:
    r = compute("nlg", HYPS, REFS)
    assert ("meteor" in r) == metrics.meteor_available()


# ---------------------------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------------------------


def test_unknown_metric_and_length_mismatch() -> None:
    with pytest.raises(KeyError, match="unknown metric"):
        compute("bleurt", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        compute("accuracy", ["a", "b"], ["a"])


LABELS = {"accuracy": BIN, "accuracy_f1": BIN, "accuracy_macro_f1": ("0", "1", "2"),
          "matthews": BIN, "pearson_spearman": None, "multirc": BIN, "squad": None, "nlg": None}
REF_POOL = {"accuracy": BIN, "accuracy_f1": BIN, "accuracy_macro_f1": ("0", "1", "2"),
            "matthews": BIN, "pearson_spearman": ("0.0", "2.4", "5.0"), "multirc": BIN,
            "squad": ("Paris", "the cat"), "nlg": ("a b c", "the cat sat")}


@settings(max_examples=30, deadline=None)
@given(data=st.data(), metric=st.sampled_from(sorted(metrics.METRICS)))
def test_garbage_predictions_never_crash(data: st.DataObject, metric: str) -> None:
    n = data.draw(st.integers(1, 6))
    preds = data.draw(st.lists(st.text(max_size=12), min_size=n, max_size=n))
    refs = data.draw(st.lists(st.sampled_from(REF_POOL[metric]), min_size=n, max_size=n))
    out = compute(metric, preds, refs, LABELS[metric], groups=["g"] * n)
    assert "score" in out and "average" in out
    assert all(isinstance(v, float) for v in out.values())
    assert math.isnan(out["score"]) or -100.0 - 1e-6 <= out["score"] <= 100.0 + 1e-6

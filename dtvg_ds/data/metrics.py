"""Offline task metrics on decoded predictions, x100, computed on rank 0.

Every number comes from a maintained library: scikit-learn (accuracy, F1, macro-F1, Matthews),
SciPy (Pearson, Spearman), TorchMetrics (SQuAD F1/EM: the official SQuAD v1.1 normalisation and
max over gold answers), sacreBLEU (corpus BLEU, multi-reference) and rouge-score (ROUGE-1/2/L,
max over references). METEOR is added only when NLTK's WordNet data is installed, since fetching
it needs the network. The tests cross-check each against a second implementation.

A prediction that is not a valid label is counted wrong (never a crash): for classification it
is mapped to a sentinel class that matches no reference (binary F1: to the class opposite the
reference, so it is a false positive or a false negative); STS-B predictions that are not
numbers become -1, outside the 0-5 scale, as in T5.

References: a reference is a string, or a list of acceptable strings (several gold answers, or
several NLG references). Classification metrics use the first string.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

INVALID = "<invalid>"
Ref = str | Sequence[str]


def _norm(s: str) -> str:
    return " ".join(str(s).strip().split())


def _first(ref: Ref) -> str:
    if isinstance(ref, str):
        return ref
    return ref[0] if len(ref) else ""


def _all(ref: Ref) -> list[str]:
    if isinstance(ref, str):
        return [ref]
    return [str(r) for r in ref] or [""]


def _labels(preds: Sequence[str], refs: Sequence[Ref],
            labels: Sequence[str] | None) -> tuple[list[str], list[str]]:
    p = [_norm(x) for x in preds]
    r = [_norm(_first(x)) for x in refs]
    if len(p) != len(r):
        raise ValueError(f"{len(p)} predictions for {len(r)} references")
    if labels is not None:
        valid = {_norm(x) for x in labels}
        p = [x if x in valid else INVALID for x in p]
    return p, r


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def accuracy(preds: Sequence[str], refs: Sequence[Ref],
             labels: Sequence[str] | None = None) -> dict[str, float]:
    """Exact-match accuracy of normalised strings, x100."""
    from sklearn.metrics import accuracy_score

    p, r = _labels(preds, refs, labels)
    if not r:
        return {"accuracy": float("nan")}
    return {"accuracy": 100.0 * float(accuracy_score(r, p))}


def _binary_with_invalid(p: list[str], r: list[str], pos: str) -> tuple[list[int], list[int]]:
    """0/1 vectors for binary F1; an invalid prediction becomes the class opposite the truth."""
    truth = [int(x == pos) for x in r]
    pred = [1 - t if x == INVALID else int(x == pos) for x, t in zip(p, truth, strict=True)]
    return truth, pred


def accuracy_f1(preds: Sequence[str], refs: Sequence[Ref],
                labels: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy and binary F1 (positive class = the second label, GLUE's '1'), x100."""
    from sklearn.metrics import f1_score

    out = accuracy(preds, refs, labels)
    p, r = _labels(preds, refs, labels)
    pos = _norm(labels[1]) if labels else "1"
    if labels is None:  # unknown label set: anything but the two classes is invalid
        p = [x if x in ("0", "1") else INVALID for x in p]
    truth, pred = _binary_with_invalid(p, r, pos)
    out["f1"] = 100.0 * float(f1_score(truth, pred, zero_division=0)) if r else float("nan")
    return out


def accuracy_macro_f1(preds: Sequence[str], refs: Sequence[Ref],
                      labels: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 over the task's classes (CB), x100.

    Invalid predictions are their own class, outside the averaged classes: they cost recall of
    the true class and add no false positive to another.
    """
    from sklearn.metrics import f1_score

    out = accuracy(preds, refs, labels)
    p, r = _labels(preds, refs, labels)
    classes = [_norm(x) for x in labels] if labels else sorted(set(r))
    out["macro_f1"] = (100.0 * float(f1_score(r, p, labels=classes, average="macro",
                                              zero_division=0)) if r else float("nan"))
    return out


def matthews(preds: Sequence[str], refs: Sequence[Ref],
             labels: Sequence[str] | None = None) -> dict[str, float]:
    """Matthews correlation (CoLA), x100; an invalid prediction is its own (wrong) class."""
    from sklearn.metrics import matthews_corrcoef

    p, r = _labels(preds, refs, labels)
    return {"matthews_correlation": 100.0 * float(matthews_corrcoef(r, p)) if r else float("nan")}


def _to_float(s: str, default: float = -1.0) -> float:
    try:
        v = float(_norm(s))
    except ValueError:
        return default
    return v if math.isfinite(v) else default


def pearson_spearman(preds: Sequence[str], refs: Sequence[Ref],
                     labels: Sequence[str] | None = None) -> dict[str, float]:
    """Pearson and Spearman correlation of numeric predictions (STS-B), x100.

    A correlation that is undefined (constant predictions) is reported as 0, not NaN, so that
    best-checkpoint selection keeps working.
    """
    from scipy.stats import pearsonr, spearmanr

    del labels  # any number is a valid prediction; non-numbers become -1
    p = [_to_float(x) for x in preds]
    r = [_to_float(_first(x), default=float("nan")) for x in refs]
    if len(p) != len(r):
        raise ValueError(f"{len(p)} predictions for {len(r)} references")
    if len(r) < 2:
        return {"pearson": float("nan"), "spearmanr": float("nan")}

    def safe(v: float) -> float:
        return 100.0 * float(v) if math.isfinite(float(v)) else 0.0

    if len(set(p)) < 2 or len(set(r)) < 2:  # scipy warns and returns NaN on constant input
        return {"pearson": 0.0, "spearmanr": 0.0}
    return {"pearson": safe(pearsonr(p, r).statistic), "spearmanr": safe(spearmanr(p, r).statistic)}


def multirc(preds: Sequence[str], refs: Sequence[Ref], labels: Sequence[str] | None = None,
            groups: Sequence[str] | None = None) -> dict[str, float]:
    """MultiRC: F1a (binary F1 over all answer options) and EM (all options of a question right).

    Without `groups` every option is its own question (EM = accuracy).
    """
    from sklearn.metrics import f1_score

    labels = labels if labels is not None else ("0", "1")
    p, r = _labels(preds, refs, labels)
    if not r:
        return {"f1a": float("nan"), "exact_match": float("nan")}
    truth, pred = _binary_with_invalid(p, r, _norm(labels[1]))
    groups = list(groups) if groups is not None else [str(i) for i in range(len(r))]
    right: dict[str, bool] = {}
    for g, a, b in zip(groups, p, r, strict=True):
        right[g] = right.get(g, True) and a == b
    return {"f1a": 100.0 * float(f1_score(truth, pred, zero_division=0)),
            "exact_match": 100.0 * _mean([float(v) for v in right.values()])}


def squad(preds: Sequence[str], refs: Sequence[Ref],
          labels: Sequence[str] | None = None) -> dict[str, float]:
    """SQuAD v1.1 F1 and exact match (answer normalisation, max over gold answers), x100."""
    from torchmetrics.functional.text.squad import squad as tm_squad

    del labels
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        return {"f1": float("nan"), "exact_match": float("nan")}
    p = [{"prediction_text": str(x), "id": str(i)} for i, x in enumerate(preds)]
    t = [{"answers": {"text": _all(r), "answer_start": [0] * len(_all(r))}, "id": str(i)}
         for i, r in enumerate(refs)]
    out = tm_squad(p, t)
    return {"f1": float(out["f1"]), "exact_match": float(out["exact_match"])}


def meteor_available() -> bool:
    """True when NLTK and its WordNet data are installed (METEOR cannot download offline)."""
    try:
        import nltk

        nltk.data.find("corpora/wordnet")
    except (ImportError, LookupError):
        return False
    return True


def nlg(preds: Sequence[str], refs: Sequence[Ref],
        labels: Sequence[str] | None = None) -> dict[str, float]:
    """Corpus BLEU (sacreBLEU, 13a tokenisation, all references), ROUGE-1/2/L F-measure
    (rouge-score, stemmed, max over references, averaged) and METEOR when available, x100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    del labels
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        return {"bleu": float("nan"), "rouge1": float("nan"), "rouge2": float("nan"),
                "rougeL": float("nan")}
    hyps = [str(p).strip() for p in preds]
    ref_lists = [_all(r) for r in refs]
    width = max(len(r) for r in ref_lists)
    # sacreBLEU takes reference *streams*; None pads examples with fewer references.
    streams = [[r[j] if j < len(r) else None for r in ref_lists] for j in range(width)]
    out = {"bleu": float(sacrebleu.corpus_bleu(hyps, streams).score)}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score_multi(r, h) for h, r in zip(hyps, ref_lists, strict=True)]
    for k in ("rouge1", "rouge2", "rougeL"):
        out[k] = 100.0 * _mean([s[k].fmeasure for s in scores])
    if meteor_available():
        from nltk.translate.meteor_score import meteor_score

        out["meteor"] = 100.0 * _mean([meteor_score([x.split() for x in r], h.split())
                                       for h, r in zip(hyps, ref_lists, strict=True)])
    return out


METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "accuracy": accuracy,
    "accuracy_f1": accuracy_f1,
    "accuracy_macro_f1": accuracy_macro_f1,
    "matthews": matthews,
    "pearson_spearman": pearson_spearman,
    "multirc": multirc,
    "squad": squad,
    "nlg": nlg,
}

# The single number used for best-checkpoint selection, per metric family: the one the papers
# report (Pearson for STS-B, F1a for MultiRC, F1 for ReCoRD/SQuAD/MRQA, BLEU for NLG). Every
# result also has "average", the mean of all its numbers (ATTEMPT's selection criterion).
PRIMARY = {"accuracy": "accuracy", "accuracy_f1": "accuracy", "accuracy_macro_f1": "accuracy",
           "matthews": "matthews_correlation", "pearson_spearman": "pearson", "multirc": "f1a",
           "squad": "f1", "nlg": "bleu"}


def compute(metric: str, preds: Sequence[str], refs: Sequence[Ref],
            labels: Sequence[str] | None = None,
            groups: Sequence[str] | None = None) -> dict[str, float]:
    """All numbers of `metric` plus `average` and `score`, the primary one (higher is better).

    `refs[i]` is the reference string, or every acceptable answer / reference of example i.
    `groups[i]` names the question of a MultiRC answer option (other metrics ignore it).
    """
    if metric not in METRICS:
        raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if metric == "multirc":
        out = multirc(preds, refs, labels, groups)
    else:
        out = METRICS[metric](preds, refs, labels)
    out["average"] = _mean(list(out.values()))
    out["score"] = out[PRIMARY[metric]]
    return out

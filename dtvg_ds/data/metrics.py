"""Offline task metrics on decoded predictions, x100, computed on rank 0.

A prediction that is not a valid label is counted wrong (never a crash): for classification it is
mapped to a sentinel class that matches no reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

INVALID = "<invalid>"


def _norm(s: str) -> str:
    return " ".join(s.strip().split())


def _labels(preds: Sequence[str], refs: Sequence[str],
            labels: Sequence[str] | None) -> tuple[list[str], list[str]]:
    p = [_norm(x) for x in preds]
    r = [_norm(x) for x in refs]
    if labels is not None:
        valid = {_norm(x) for x in labels}
        p = [x if x in valid else INVALID for x in p]
    return p, r


def accuracy(preds: Sequence[str], refs: Sequence[str],
             labels: Sequence[str] | None = None) -> dict[str, float]:
    """Exact-match accuracy of normalised strings, x100."""
    p, r = _labels(preds, refs, labels)
    if not r:
        return {"accuracy": float("nan")}
    return {"accuracy": 100.0 * sum(a == b for a, b in zip(p, r, strict=True)) / len(r)}


def accuracy_f1(preds: Sequence[str], refs: Sequence[str],
                labels: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy and binary F1 (positive class = the second label, GLUE's '1'), x100."""
    from sklearn.metrics import f1_score

    p, r = _labels(preds, refs, labels)
    pos = _norm(labels[1]) if labels else "1"
    out = accuracy(preds, refs, labels)
    out["f1"] = 100.0 * f1_score([x == pos for x in r], [x == pos for x in p], zero_division=0)
    return out


def matthews(preds: Sequence[str], refs: Sequence[str],
             labels: Sequence[str] | None = None) -> dict[str, float]:
    """Matthews correlation (CoLA), x100; an invalid prediction is its own (wrong) class."""
    from sklearn.metrics import matthews_corrcoef

    p, r = _labels(preds, refs, labels)
    return {"matthews_correlation": 100.0 * float(matthews_corrcoef(r, p))}


METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "accuracy": accuracy,
    "accuracy_f1": accuracy_f1,
    "matthews": matthews,
}

# The single number used for best-checkpoint selection, per metric family.
PRIMARY = {"accuracy": "accuracy", "accuracy_f1": "accuracy", "matthews": "matthews_correlation"}


def compute(metric: str, preds: Sequence[str], refs: Sequence[str],
            labels: Sequence[str] | None = None) -> dict[str, float]:
    """All numbers of `metric` plus `score`, the primary one (higher is better)."""
    out = METRICS[metric](preds, refs, labels)
    out["score"] = out[PRIMARY[metric]]
    return out

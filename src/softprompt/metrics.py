"""Metrics of predicted labels against gold ones: accuracy, macro-F1, per-class scores and the
confusion matrix (scikit-learn)."""

from __future__ import annotations

from collections.abc import Sequence


def metrics(gold: Sequence[str], pred: Sequence[str], label_names: Sequence[str]) -> dict:
    """accuracy, macro_f1 (over label_names), per-class precision/recall/f1/support, and the
    confusion matrix (rows gold, columns predicted, in label_names order), by scikit-learn. A
    prediction that is not a label counts as wrong and is counted in `invalid`; a label never
    predicted, or never gold, scores 0 where its F1 is undefined."""
    from sklearn.metrics import (  # lazily: scikit-learn takes seconds to import
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    names, gold, pred = list(label_names), list(gold), list(pred)
    if len(gold) != len(pred):
        raise ValueError(f"metrics: {len(gold)} gold labels but {len(pred)} predictions")
    unknown = sorted(set(gold) - set(names))
    if unknown:
        raise ValueError(f"metrics: gold labels {unknown} are not among the labels {names}")
    n = len(gold)
    known = set(names)
    invalid = sum(1 for label in pred if label not in known)
    if n == 0:  # scikit-learn refuses empty input
        p = r = f = [0.0] * len(names)
        support, confusion = [0] * len(names), [[0] * len(names) for _ in names]
        accuracy = macro_f1 = 0.0
    else:
        p, r, f, support = precision_recall_fscore_support(
            gold, pred, labels=names, zero_division=0
        )
        confusion = confusion_matrix(gold, pred, labels=names).tolist()
        accuracy = float(accuracy_score(gold, pred))
        macro_f1 = float(f1_score(gold, pred, labels=names, average="macro", zero_division=0))
    per_class = {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "per_class": per_class,
        "confusion_matrix": {"labels": names, "matrix": confusion},
        "invalid": invalid,
        "n": n,
    }

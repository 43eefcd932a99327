"""Metrics of predicted labels against gold ones: accuracy, macro-F1, per-class scores and the
confusion matrix (scikit-learn); label sets (multilabel): micro- and macro-F1, subset accuracy,
per-label scores; generated text: BLEU, chrF, ROUGE-L, exact match."""

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
    per_class = _per_label(names, p, r, f, support)
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "per_class": per_class,
        "confusion_matrix": {"labels": names, "matrix": confusion},
        "invalid": invalid,
        "n": n,
    }


def multilabel_metrics(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], label_names: Sequence[str]
) -> dict:
    """Label sets against gold ones (`--task multilabel`), by scikit-learn on the rows'
    indicator matrices (MultiLabelBinarizer over label_names): micro_f1 (every (row, label)
    decision pooled), macro_f1 (the mean of the labels' F1), subset_accuracy (the share of rows
    whose predicted set is exactly the gold set), hamming_loss (the share of wrong (row, label)
    decisions), per-label precision/recall/f1/support. A label never predicted, or never gold,
    scores 0 where its F1 is undefined."""
    from sklearn.metrics import (  # lazily: scikit-learn takes seconds to import
        accuracy_score,
        f1_score,
        hamming_loss,
        precision_recall_fscore_support,
    )
    from sklearn.preprocessing import MultiLabelBinarizer

    names, gold, pred = list(label_names), [list(g) for g in gold], [list(p) for p in pred]
    if len(gold) != len(pred):
        raise ValueError(f"multilabel_metrics: {len(gold)} gold label sets but {len(pred)} predictions")  # fmt: skip
    unknown = sorted({n for g in gold + pred for n in g} - set(names))
    if unknown:
        raise ValueError(f"multilabel_metrics: labels {unknown} are not among the labels {names}")
    n = len(gold)
    if n == 0:
        p = r = f = [0.0] * len(names)
        support = [0] * len(names)
        micro = macro = subset = hamming = 0.0
    else:
        binarize = MultiLabelBinarizer(classes=names)
        y, yhat = binarize.fit_transform(gold), binarize.transform(pred)
        p, r, f, support = precision_recall_fscore_support(y, yhat, zero_division=0)
        micro = float(f1_score(y, yhat, average="micro", zero_division=0))
        macro = float(f1_score(y, yhat, average="macro", zero_division=0))
        subset = float(accuracy_score(y, yhat))
        hamming = float(hamming_loss(y, yhat))
    per_label = _per_label(names, p, r, f, support)
    return {
        "micro_f1": micro,
        "macro_f1": macro,
        "subset_accuracy": subset,
        "hamming_loss": hamming,
        "per_label": per_label,
        "n": n,
    }


def _per_label(names, p, r, f, support) -> dict:
    """{label: {precision, recall, f1, support}} from scikit-learn's per-label arrays."""
    return {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }


BLEU_SETTINGS = {"lowercase": True, "tokenize": "13a"}
"""sacrebleu's BLEU as the E2E challenge scores (its official script, to 4 decimals): lowercased,
13a tokenisation, every reference of an input."""


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Generated texts against each input's references (one or several):

    - bleu: corpus BLEU by sacrebleu (`BLEU_SETTINGS`), all references of each input;
    - chrf: corpus chrF by sacrebleu, all references;
    - rouge_l: ROUGE-L F1 by rouge-score (Porter stemmer), the best reference per input, mean;
    - exact_match: the share of outputs equal to one of their references, compared lowercased
      with runs of white space as one space.

    BLEU, chrF and ROUGE-L on a 0-100 scale, exact_match 0-1. With several references per input,
    BLEU is far above the one-reference figure for the same outputs: compare like with like."""
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = [str(p) for p in predictions]
    refs = [[str(r) for r in rs] for rs in references]
    if len(preds) != len(refs):
        raise ValueError(f"generation_metrics: {len(preds)} outputs but {len(refs)} inputs' references")  # fmt: skip
    if any(not rs for rs in refs):
        raise ValueError("generation_metrics: an input has no reference")
    n = len(preds)
    if n == 0:
        return {"bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0, "exact_match": 0.0, "n": 0, "references": 0, "settings": _settings()}  # fmt: skip
    k = max(len(rs) for rs in refs)
    # sacrebleu takes reference streams; an input with fewer references has None in the rest
    streams = [[rs[j] if j < len(rs) else None for rs in refs] for j in range(k)]
    bleu = sacrebleu.BLEU(**BLEU_SETTINGS).corpus_score(preds, streams)
    chrf = sacrebleu.CHRF().corpus_score(preds, streams)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score_multi(rs, p)["rougeL"].fmeasure for p, rs in zip(preds, refs, strict=True))  # fmt: skip

    def norm(s: str) -> str:
        return " ".join(s.lower().split())

    exact = sum(norm(p) in {norm(r) for r in rs} for p, rs in zip(preds, refs, strict=True))
    return {
        "bleu": float(bleu.score),
        "chrf": float(chrf.score),
        "rouge_l": 100.0 * rouge / n,
        "exact_match": exact / n,
        "n": n,
        "references": sum(len(rs) for rs in refs),
        "settings": _settings(),
    }


def _settings() -> dict:
    return {
        "bleu": "sacrebleu BLEU, lowercased, 13a tokenisation, all references of each input",
        "chrf": "sacrebleu chrF (character 6-grams, beta 2), all references",
        "rouge_l": "rouge-score ROUGE-L F1 with the Porter stemmer, best reference per input, mean",
        "exact_match": "output equal to a reference, lowercased, white space collapsed",
    }

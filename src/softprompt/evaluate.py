"""Inference and metrics: rank classification (score every label after the input), free
generation, accuracy / macro-F1 / confusion."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .data import Task
from .engine import Engine, full_label_scores, predictor_for_prompt

__all__ = [
    "classify",
    "front",
    "full_label_scores",
    "generate_texts",
    "label_probabilities",
    "metrics",
]


def front(prompt: Tensor, task: Task) -> Tensor:
    """The prompt's vectors that run in front of the input (all but the task's suffix tokens,
    which run after the text)."""
    return prompt[..., : prompt.shape[-2] - task.suffix_tokens, :]


def _engine_for(model, tokenizer, prompt: Tensor, task: Task, share_head: bool, bias=None):
    engine = Engine(model, tokenizer, share_head=share_head)
    return engine, predictor_for_prompt(model, tokenizer, prompt, task, bias=bias)


def label_probabilities(
    model,
    tokenizer,
    prompt: Tensor,
    task: Task,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
    bias: Sequence[float] | None = None,
    share_head: bool = True,
) -> Tensor:
    """Each label's probability for each text: [N, L] (rows sum to 1), by the engine
    (`engine.Engine.classify`) for a prompt not saved as an adapter.

    `prompt` is one prompt [P+S, H] or an ensemble [K, P+S, H] (probabilities: the mean of the
    members'). `bias` [L] calibrates them (see calibrate.py)."""
    engine, pred = _engine_for(model, tokenizer, prompt, task, share_head, bias)
    return engine.classify(pred, texts, batch_size=batch_size, progress=progress)


def classify(
    model, tokenizer, prompt: Tensor, task: Task, texts: Sequence[str], **kw
) -> tuple[list[str], Tensor]:
    """(predicted label names, probabilities [N, L])."""
    probs = label_probabilities(model, tokenizer, prompt, task, texts, **kw)
    return [task.label_names[i] for i in probs.argmax(-1).tolist()], probs


def generate_texts(
    model,
    tokenizer,
    prompt: Tensor,
    task: Task,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 6,
    batch_size: int = 16,
    progress: bool = False,
    share_head: bool = True,
) -> list[str]:
    """Greedy free generation after the input, as in the guide (the output may be any text)."""
    engine, pred = _engine_for(model, tokenizer, prompt, task, share_head)
    return engine.generate_texts(
        pred, texts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )


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

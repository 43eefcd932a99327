"""Calibrating label probabilities: a per-label bias added to the log-probabilities.

Two ways to get the bias:
- content-free (Zhao et al. 2021, "Calibrate before use"): score inputs that carry no content
  ("", "N/A", ...); whatever the model prefers there is its prior, so divide it out;
- fitted: the bias that maximises macro-F1 on held-out predictions (out-of-fold predictions of
  k-fold cross-validation, or an eval set), i.e. a learned decision threshold.

Calibrated probabilities are softmax(log p + bias); with bias = 0 they are the raw ones.

A multilabel task (`--task multilabel`) has no softmax to shift: each label is a yes/no of its
own, chosen where its probability reaches its threshold (0.5, or fitted by `fit_thresholds`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CONTENT_FREE_INPUTS = ("", "N/A", "[MASK]")


def apply_bias(probs: Tensor, bias: Sequence[float] | Tensor | None) -> Tensor:
    """probs [N, L] -> calibrated probs [N, L] = softmax(log probs + bias [L])."""
    if bias is None:
        return probs
    b = torch.as_tensor(bias, dtype=torch.float32)
    return torch.softmax(probs.float().clamp_min(1e-30).log() + b, -1)


def content_free_bias(cf_probs: Tensor) -> list[float]:
    """Bias from the probabilities [K, L] of K content-free inputs: -log of their mean, centred.

    After it, the mean content-free input gets equal probability for every label.
    """
    b = -cf_probs.float().mean(0).clamp_min(1e-30).log()
    return (b - b.mean()).tolist()


def _macro_f1(gold: Tensor, pred: Tensor, L: int) -> float:
    """Macro-F1 of label indices over labels 0..L-1: what scikit-learn's
    f1_score(gold, pred, labels=range(L), average="macro", zero_division=0) returns (a test
    checks it), from one bincount. fit_bias scores every candidate offset with it (6,011 calls
    for 1,000 rows x 3 labels); f1_score's input checks cost ~14 ms a call, which made fit_bias
    ~80 s instead of ~2-3 s, so the loop keeps this. Per label F1 = 2 tp / (predicted + gold
    count), 0 when both are 0."""
    confusion = torch.bincount(gold * L + pred, minlength=L * L).view(L, L).double()
    both = confusion.sum(0) + confusion.sum(1)
    return (2 * confusion.diagonal() / both.clamp_min(1)).mean().item()


def fit_bias(probs: Tensor, gold: Sequence[int], *, rounds: int = 3) -> list[float]:
    """The bias [L] (first entry 0) that maximises macro-F1 of argmax(log probs + bias) on
    held-out predictions probs [N, L] with gold label indices.

    Coordinate ascent over each label's offset; every candidate is a midpoint between two
    adjacent decision points, so for two labels this is the exact best threshold. Ties go to
    the offset nearest 0 (the least change to the model's own probabilities).
    """
    logp = probs.float().clamp_min(1e-30).log()
    y = torch.as_tensor(list(gold))
    N, L = logp.shape
    bias = torch.zeros(L)
    for _ in range(rounds):
        changed = False
        for c in range(1, L):
            others = logp + bias
            others[:, c] = -float("inf")
            # label c wins where logp[:, c] + b > best other: decision points are the gaps
            gap = (others.max(-1).values - logp[:, c]).sort().values
            gap = gap[torch.isfinite(gap)]
            if len(gap) == 0:
                continue
            cands = torch.cat(
                [(gap[1:] + gap[:-1]) / 2, gap[:1] - 1, gap[-1:] + 1, bias[c : c + 1]]
            )
            best, best_key = bias[c].item(), None
            for b in cands.unique().tolist():
                trial = bias.clone()
                trial[c] = b
                pred = (logp + trial).argmax(-1)
                key = (_macro_f1(y, pred, L), -abs(b))
                if best_key is None or key > best_key:
                    best, best_key = b, key
            if best != bias[c].item():
                bias[c] = best
                changed = True
        if not changed:
            break
    return bias.tolist()


THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""The thresholds `fit_thresholds` tries for each label: 0.05, 0.10, ..., 0.95."""


def fit_thresholds(
    probs: Tensor, gold: Tensor, grid: Sequence[float] = THRESHOLD_GRID
) -> list[float]:
    """Each label's decision threshold [L] for multilabel probabilities probs [N, L] against
    gold [N, L] (1 where the row has the label): the grid value that maximises that label's F1
    (a label is chosen where p >= its threshold); ties go to the value nearest 0.5, so a label
    with no positive row (F1 0 everywhere) keeps 0.5."""
    p, y = probs.float(), gold.float()
    out = []
    for k in range(p.shape[1]):
        best, key = 0.5, None
        for t in grid:
            yes = (p[:, k] >= t).float()
            tp = float((yes * y[:, k]).sum())
            both = float(yes.sum() + y[:, k].sum())
            f1 = 2 * tp / both if both else 0.0
            cand = (f1, -abs(t - 0.5))
            if key is None or cand > key:
                best, key = float(t), cand
        out.append(best)
    return out


def choose_labels(probs: Tensor, thresholds: Sequence[float] | None) -> Tensor:
    """Multilabel decisions [N, L] (bool): each label's probability against its threshold (0.5
    each when None)."""
    t = torch.full((probs.shape[-1],), 0.5) if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32)  # fmt: skip
    return probs.float() >= t

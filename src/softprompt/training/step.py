"""One training step: the loss of a batch share, its backward, and the optimiser step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import multi_hot
from ..modeling.sharding import gather_root
from ..readouts.head import ClassifierHead, rows_features
from ..readouts.words import rows_loss
from .checkpoint import TrainState
from .setup import Run


def batch_loss(
    run: Run, prompt: torch.Tensor, rows, weights=None, head="training", pos_weight=None
) -> torch.Tensor:
    """The summed loss of training rows (`Encoded`) for the run's method and readout: over label
    tokens, or with a classification head over rows (cross-entropy of its logits; `head`: the
    one training, or a copy of it). A multilabel task's row loss is the mean over its labels of
    each label's sigmoid loss (binary cross-entropy with logits, each label's positives weighed
    by `pos_weight` [K] when given): summed over rows and divided by them, it is transformers'
    BCEWithLogitsLoss of a SEQ_CLS model with problem_type multi_label_classification."""
    if head == "training":
        head = run.encoder.head
    if head is not None and run.task.multilabel:
        logits = head_logits(run, prompt, rows, head)
        target = multi_hot(rows, logits.shape[-1]).to(logits.device)
        loss = F.binary_cross_entropy_with_logits(
            logits, target, reduction="none", pos_weight=pos_weight
        ).mean(-1)
        if weights is not None:
            loss = loss * weights.to(loss.device, torch.float32)
        return loss.sum()
    if head is not None:
        classes = torch.tensor([r.label for r in rows], device=prompt.device)
        loss = F.cross_entropy(head_logits(run, prompt, rows, head), classes, reduction="none")
        if weights is not None:
            loss = loss * weights.to(loss.device, torch.float32)
        return loss.sum()
    return rows_loss(
        run.model, prompt, rows, kind=run.kind, packed=run.packed, reduction="sum", weights=weights
    )


def head_logits(run: Run, prompt: torch.Tensor, rows, head: ClassifierHead) -> torch.Tensor:
    """The head's label logits [B, K] for training rows: what it reads of their inputs after
    the prompt (`readouts.head.row_features`)."""
    return head(rows_features(run.model, prompt, rows, [head], run.head_ids, run.kind, run.packed))


def train_step(run: Run, rows_idx: list[int]) -> float:
    """Forward and backward of this process's share of one batch; returns the whole batch's mean
    loss (over all processes). Gradients accumulate in the encoder until `optimizer_step`."""
    cfg, procs = run.cfg, run.procs
    rows = [run.train_rows[j] for j in rows_idx]
    weights = [run.row_weight[j] for j in rows_idx]
    mine = rows[procs.rank :: procs.world]  # this process's share of the batch
    # each share's loss is its label tokens' summed loss over the whole batch's count: the
    # shares add up to the batch mean, as in one process
    loss = torch.zeros((), device=run.device)
    # FSDP: every process must run each layer, so an empty share runs a row at weight 0
    share, w = (mine, weights[procs.rank :: procs.world]) if mine else (rows[:1], [0.0])
    if procs.fsdp:
        gather_root(run.model)
    if mine or procs.fsdp:
        weighted = torch.tensor(w) if cfg.balance or not mine else None
        loss = batch_loss(run, run.encoder(), share, weighted, pos_weight=run.pos_weight)
        loss = loss / loss_units(run, rows, weights)
    mean = procs.sum(loss.detach().clone()).item()
    if (mine or procs.fsdp) and math.isfinite(mean):
        (loss / cfg.grad_accum).backward()
    return mean


def optimizer_step(run: Run, state: TrainState) -> None:
    """Sum the gradients over the processes, step the optimiser and the schedule, refresh
    state.prompt (the saved form)."""
    for p in run.encoder.parameters():
        if p.grad is None:  # a process whose shares of these batches were empty
            p.grad = torch.zeros_like(p)
        run.procs.sum(p.grad)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.prompt = run.encoder.export()
    state.head = run.encoder.export_head()


def loss_units(run: Run, rows, weights: list[float] | None = None) -> float:
    """What a batch's summed loss is divided by for its mean: label tokens (`label_token_count`),
    or with a classification head the rows, each counted weights[i] times when given."""
    if run.encoder.head is None:
        return label_token_count(rows, weights)
    return float(sum(weights)) if weights is not None else float(len(rows))


def label_token_count(rows, weights: list[float] | None = None) -> float:
    """How many label tokens `label_loss` scores in these rows (the first token of a row has
    no prediction, which matters only for a row with an empty input), each row's tokens
    counted `weights[i]` times when weights are given."""
    w = weights or [1] * len(rows)
    return sum(
        wi * (len(r.label_ids) - (0 if r.input_ids else 1)) for wi, r in zip(w, rows, strict=True)
    )

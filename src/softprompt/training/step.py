"""One training step: the loss of a batch share, its backward, and the optimiser step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import Encoded, collate_train
from ..kernels.features import head_features
from ..kernels.loss import label_loss, prefix_label_loss
from ..modeling.sharding import gather_root
from ..readouts.head import RowFeatures, head_starts
from .checkpoint import TrainState
from .setup import Run


def batch_loss(
    run: Run, prompt: torch.Tensor, batch: dict, weights=None, head="training"
) -> torch.Tensor:
    """The summed loss of a collated batch (`collate_rows`), for the run's method and readout:
    over label tokens, or with a classification head over rows (cross-entropy of its logits;
    `head`: the one training, or a copy of it)."""
    if head == "training":
        head = run.encoder.head
    if head is not None:
        logits = head(head_batch_features(run, prompt, batch, head))
        loss = F.cross_entropy(logits, batch["classes"], reduction="none")
        if weights is not None:
            loss = loss * weights.to(loss.device, torch.float32)
        return loss.sum()
    if run.kind == "prefix":
        return prefix_label_loss(
            run.model, prompt, **batch, reduction="sum", packed=run.packed, weights=weights
        )
    return label_loss(
        run.model, prompt, **batch, reduction="sum", shared_prefix=run.packed, weights=weights
    )


def head_batch_features(run: Run, prompt: torch.Tensor, batch: dict, head) -> RowFeatures:
    """What the head reads of a collated batch (`collate_rows`)."""
    return head_features(
        run.model, prompt, batch["input_ids"], batch["attention_mask"], batch["starts"], [head],
        kind=run.kind, packed=run.packed,
    )  # fmt: skip


def collate_rows(run: Run, rows) -> dict:
    """Rows as the loss takes them, on the run's device: right-padded input + label tokens
    (`collate_train`); with a classification head the inputs alone, each row's class and where
    its pooled part begins."""
    pad = run.tokenizer.pad_token_id
    if run.encoder.head is None:
        return {k: v.to(run.device) for k, v in collate_train(rows, pad).items()}
    batch = collate_train([Encoded(r.input_ids, []) for r in rows], pad)
    del batch["labels"]
    batch["classes"] = torch.tensor([r.label for r in rows])
    batch = {k: v.to(run.device) for k, v in batch.items()}
    batch["starts"] = head_starts([r.input_ids for r in rows], run.head_ids)
    return batch


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
        batch = collate_rows(run, share)
        weighted = torch.tensor(w) if cfg.balance or not mine else None
        loss = batch_loss(run, run.encoder(), batch, weighted)
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

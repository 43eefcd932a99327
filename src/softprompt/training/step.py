"""One training step: the loss of a batch share, its backward, and the optimiser step."""

from __future__ import annotations

import math

import torch

from ..data import collate_train
from ..kernels.loss import label_loss, prefix_label_loss
from ..modeling.sharding import gather_root
from .checkpoint import TrainState
from .setup import Run


def batch_loss(run: Run, prompt: torch.Tensor, batch: dict, weights=None) -> torch.Tensor:
    """The summed label-token loss of a collated batch, for the run's method."""
    if run.kind == "prefix":
        return prefix_label_loss(
            run.model, prompt, **batch, reduction="sum", packed=run.packed, weights=weights
        )
    return label_loss(
        run.model, prompt, **batch, reduction="sum", shared_prefix=run.packed, weights=weights
    )


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
        pad = run.tokenizer.pad_token_id
        batch = {k: v.to(run.device) for k, v in collate_train(share, pad).items()}
        weighted = torch.tensor(w) if cfg.balance or not mine else None
        loss = batch_loss(run, run.encoder(), batch, weighted)
        loss = loss / label_token_count(rows, weights)
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


def label_token_count(rows, weights: list[float] | None = None) -> float:
    """How many label tokens `label_loss` scores in these rows (the first token of a row has
    no prediction, which matters only for a row with an empty input), each row's tokens
    counted `weights[i]` times when weights are given."""
    w = weights or [1] * len(rows)
    return sum(
        wi * (len(r.label_ids) - (0 if r.input_ids else 1)) for wi, r in zip(w, rows, strict=True)
    )

"""Per-epoch evaluation on the held-out rows: loss (the training loss's kind) and the engine's
label scoring, split over the processes and gathered."""

from __future__ import annotations

import math

import torch

from ..calibrate import choose_labels
from ..engine import Engine
from ..metrics import metrics, multilabel_metrics
from ..modeling.sharding import gather_root
from ..predictors import ClassifyRow, predictor_for_prompt
from .setup import Run
from .step import batch_loss, loss_units


def evaluate(run: Run, prompt: torch.Tensor, head=None) -> dict:
    """Eval loss (mean over all label tokens, or with a classification head over rows; a
    generation task: over its target tokens, and nothing else),
    accuracy and macro-F1 (the inference engine's answers, raw); multilabel: the loss over rows
    (each the mean of its labels' sigmoid losses, unweighted), micro- and macro-F1 and subset
    accuracy of the labels at 0.5. Each process takes every
    world-th row; the sums and predictions are gathered, so any process count gives the same."""
    procs, task = run.procs, run.task
    mine = list(range(procs.rank, len(run.eval_rows), procs.world))
    engine = Engine(run.model, run.tokenizer, kv_cache_bytes=0)
    predictor = None  # a generation task's eval is its loss (its outputs: generation_scores)
    if not task.generates:
        predictor = predictor_for_prompt(
            run.model, run.tokenizer, prompt, task, kind=run.kind, head=head
        )
    size = run.cfg.eval_batch_size
    sums = torch.zeros(2, dtype=torch.float64, device=prompt.device)  # [loss sum, label tokens]
    pred: list = []
    # FSDP: every process runs the same number of batches, each layer gathered from all of them
    # (a process out of rows runs row 0 and keeps nothing); no KV cache can be kept
    steps = math.ceil(len(run.eval_rows) / procs.world) if procs.fsdp else len(mine)
    with torch.no_grad():
        if procs.fsdp:
            gather_root(run.model)
        for s in range(0, steps, size):
            idx = mine[s : s + size] or [0]
            rows = [run.eval_rows[j] for j in idx]
            loss = batch_loss(run, prompt, rows, head=head)
            probs = []
            if predictor is not None:
                probs = engine.label_probabilities(
                    [
                        ClassifyRow(predictor, engine.encode(predictor, run.eval_texts[j])[0])
                        for j in idx
                    ]
                )
            if mine[s : s + size]:
                sums[0] += loss.double()
                sums[1] += loss_units(run, rows)
                if task.multilabel:  # raw: every label at 0.5
                    chosen = choose_labels(torch.stack(probs), None)
                    pred += [[n for n, c in zip(task.label_names, row, strict=True) if c] for row in chosen.tolist()]  # fmt: skip
                else:  # none for a generation task (no probs)
                    pred += [task.label_names[int(p.argmax())] for p in probs]
    loss = (procs.sum(sums)[0] / sums[1]).item()
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
    if predictor is None:
        return out
    gathered = dict(procs.gather(list(zip(mine, pred, strict=True))))
    pred = [gathered[j] for j in range(len(run.eval_labels))]
    if task.multilabel:
        m = multilabel_metrics(run.eval_labels, pred, task.label_names)
        keys = ("micro_f1", "macro_f1", "subset_accuracy")
    else:
        m = metrics(run.eval_labels, pred, task.label_names)
        keys = ("accuracy", "macro_f1")
    return {**out, **{f"eval_{k}": m[k] for k in keys}}


def generation_scores(run: Run, prompt: torch.Tensor, progress: bool = False) -> dict:
    """The held-out inputs written out greedily with `prompt` (the engine, as `eval` does) and
    scored against all their references (`metrics.generation_metrics`): eval_bleu, eval_rouge_l,
    eval_chrf, eval_exact_match. Main process only."""
    from ..data import group_references
    from ..metrics import generation_metrics

    engine = Engine(run.model, run.tokenizer, kv_cache_bytes=0)
    predictor = predictor_for_prompt(run.model, run.tokenizer, prompt, run.task, kind=run.kind)
    inputs, refs = group_references(run.eval_texts, run.eval_labels)
    outs = engine.generate(predictor, inputs, batch_size=run.cfg.eval_batch_size, progress=progress)
    m = generation_metrics(outs, refs)
    return {f"eval_{k}": m[k] for k in ("bleu", "rouge_l", "chrf", "exact_match")}

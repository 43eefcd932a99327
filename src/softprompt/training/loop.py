"""The training recipe: a soft prompt (or a deep prompt) in front of a frozen causal LM.

train(cfg) = data -> run folder -> base model -> `setup.setup` (rows, prompt, optimiser: a `Run`)
             -> `TrainState` (fresh, or from the checkpoint)
             -> each epoch: `step.train_step` per batch, `step.optimizer_step` per --grad-accum
                batches, `evaluation.evaluate`, `end_epoch` (files, checkpoint), callbacks
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import TASK_NAME, load_adapter, save_adapter
from ..config import TrainConfig
from ..data import Table, batch_order
from ..errors import SoftpromptError
from ..files import atomic_write_json
from ..log import ensure_visible, logger
from ..modeling.load import (
    check_model,
    dtype_line,
    dtype_name,
    load_base,
    pick_device,
    resolve_dtype,
)
from ..modeling.sharding import set_gradient_checkpointing
from ..readouts.head import ClassifierHead
from .callbacks import Callback
from .card import model_card, plot_history
from .checkpoint import (
    TrainState,
    check_resume,
    config_record,
    open_checkpoint,
    prepare_run_folder,
    save_checkpoint,
)
from .distributed import start_processes
from .evaluation import evaluate, generation_scores
from .setup import IN_MEMORY, Run, atomic_write_config, load_data, setup
from .step import optimizer_step, train_step
from .trackers import make_tracker


@dataclass
class TrainResult:
    out: Path
    prompt: torch.Tensor
    """The best prompt [P, H] (by eval macro-F1; the last one when there is no eval set)."""
    history: list[dict]
    best: dict
    main_process: bool = True
    """False in the other processes of a data-parallel run (they write and print nothing)."""
    head: ClassifierHead | None = None
    """The best prompt's classification head (`--head`), or None (label words)."""


def train(
    cfg: TrainConfig,
    model=None,
    tokenizer=None,
    *,
    data: Table | Sequence[dict] | None = None,
    eval_data: Table | Sequence[dict] | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train a soft prompt as `cfg` says; write the run folder (cfg.out).

    A loaded (model, tokenizer) may be passed; so may the rows themselves (`data`, `eval_data`:
    a `Table` or dicts keyed by cfg.text_column / cfg.label_column), in place of cfg.data /
    cfg.eval_data. Under `torchrun` or `accelerate launch` each process trains on its share of
    every batch (data parallel); the result equals a one-process run with the same --batch-size
    and --seed. With cfg.resume, the run continues from its last checkpoint (`resume_config`).
    """
    if data is not None:
        cfg = replace(cfg, data=cfg.data or IN_MEMORY)
    if eval_data is not None:
        cfg = replace(cfg, eval_data=cfg.eval_data or IN_MEMORY)
    cfg = cfg.resolved()
    cfg.validate()
    ensure_visible()
    procs = start_processes(cfg.device, cfg.fsdp)
    say = logger.info if procs.main else _silent
    requested = cfg.dtype  # --dtype auto becomes a real type here (recorded as dtype_requested)
    if model is None:
        target = procs.device or pick_device(cfg.device)
        cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, target))
    else:  # a model passed in runs in the dtype it has
        cfg = replace(cfg, dtype=dtype_name(model.get_input_embeddings().weight.dtype))
    if cfg.resume:
        check_resume(cfg)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    task, train_part, eval_part = load_data(cfg, data, eval_data)
    if cfg.resume:  # the main process reads the checkpoint and trims metrics.jsonl to it
        out = Path(cfg.resume)
        ckpt = procs.from_main(lambda: open_checkpoint(out))
    else:
        out = procs.from_main(lambda: prepare_run_folder(cfg.out, cfg.overwrite))
        ckpt = None
    if model is None:  # FSDP: load on the CPU, then each process moves its shard to its device
        say(dtype_line(requested, target))
        model, tokenizer, model_name = load_base(
            cfg.model,
            dtype=cfg.dtype,
            device="cpu" if procs.fsdp else (procs.device or cfg.device),
            trust_remote_code=cfg.trust_remote_code,
        )
    else:
        check_model(model)
        model_name = cfg.model or getattr(model.config, "_name_or_path", None)
    run = setup(cfg, task, model, tokenizer, model_name, out, procs, train_part, eval_part, say)
    if procs.main and not cfg.resume:
        atomic_write_config(out, run.cfg, requested)
    tracker = make_tracker(cfg.report_to, out, config_record(run.cfg, requested))
    callbacks = [*callbacks, tracker] if tracker is not None else list(callbacks)
    try:
        state = _loop(run, ckpt, rng, callbacks)
    finally:
        if tracker is not None:
            tracker.close()
    if procs.main:
        plot_history(out, state.history)
    best = procs.from_main(lambda: load_adapter(out))
    if procs.main and task.generates and run.eval_rows:
        score_generation(run, state, best.prompt.to(run.device), cfg.progress)
    return TrainResult(
        out, best.prompt, state.history, state.best, main_process=procs.main, head=best.head
    )


def _loop(run: Run, ckpt: dict | None, rng: random.Random, callbacks) -> TrainState:
    """The epochs, from a fresh state or the checkpoint's."""
    cfg, procs, task, out = run.cfg, run.procs, run.task, run.out
    say = logger.info if procs.main else _silent

    if ckpt is not None:
        state = TrainState.restore(ckpt, run.encoder, run.optimizer, run.scheduler, rng)
        if state.best is not None:
            task.extra["metrics"] = _shown(state.best)
        say(
            f"resuming {out} at epoch {state.epoch}, batch {state.done + 1}, "
            f"optimiser step {state.step}"
        )
    else:
        state = TrainState(prompt=run.encoder.export(), head=run.encoder.export_head())
    # the prompt (and head) when the loss was last finite
    good = (state.prompt.clone(), state.head) if ckpt else None
    lengths = [len(r) for r in run.train_rows]
    for epoch in range(state.epoch, cfg.epochs + 1):
        state.epoch = epoch
        t0 = time.perf_counter()
        if state.batches is None:  # the same order in every process: one seeded RNG
            state.batches = batch_order(lengths, cfg.batch_size, rng)
            state.done, state.total, state.count = 0, 0.0, 0
        bar = tqdm(
            total=len(state.batches),
            initial=state.done,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not (cfg.progress and procs.main),
            unit="batch",
            leave=False,
        )
        run.optimizer.zero_grad(set_to_none=True)
        for i in range(state.done, len(state.batches)):
            batch_loss = train_step(run, state.batches[i])
            if not math.isfinite(batch_loss):
                where = f"epoch {epoch}, batch {i + 1} (step {state.step + 1})"
                _stop(run, state, f"loss became {batch_loss}", where, good)
            good = (state.prompt.clone(), state.head)
            state.total += batch_loss * len(state.batches[i])
            state.count += len(state.batches[i])
            state.done = i + 1
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.4f}")
            if state.done % cfg.grad_accum == 0 or state.done == len(state.batches):
                optimizer_step(run, state)
                if not _finite(state):
                    where = f"optimiser step {state.step + 1}"
                    _stop(run, state, "the prompt or head became NaN or infinite", where, good)
                state.step += 1
                if cfg.save_steps and state.step % cfg.save_steps == 0:
                    _checkpoint(run, state, rng)
                for cb in callbacks:
                    cb.on_step(run, state)
        bar.close()
        record = end_epoch(run, state, time.perf_counter() - t0)
        state.batches, state.done = None, 0
        _checkpoint(run, state, rng)  # last: it says all of the epoch is on disk
        for cb in callbacks:
            cb.on_epoch(run, state, record)
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(run.model, False)
    for cb in callbacks:
        cb.on_train_end(run, state)
    return state


# --------------------------------------------------------------------------- epoch end, files


def end_epoch(run: Run, state: TrainState, seconds: float) -> dict:
    """The epoch's record (train loss, eval metrics); metrics.jsonl, last/, the best adapter."""
    cfg, out = run.cfg, run.out
    train_loss = state.total / state.count
    record = {
        "epoch": state.epoch,
        "step": state.step,
        "train_loss": train_loss,
        "train_ppl": math.exp(min(train_loss, 50)),
        "lr": run.scheduler.get_last_lr()[0],
        "epoch_seconds": seconds,
    }
    if run.eval_rows:
        record.update(evaluate(run, state.prompt.detach(), state.head))
        if run.task.generates and cfg.select_by != "loss":
            record.update(generation_scores(run, state.prompt.detach()))
    state.history.append(record)
    (logger.info if run.procs.main else _silent)(_format_record(record))
    is_best = state.best is None or _better(record, state.best, cfg.select_by)
    if is_best:
        state.best = record
        run.task.extra["metrics"] = _shown(record)
    if run.procs.main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        save = dict(config=run.adapter_conf, task=run.task, head=state.head)
        save_adapter(out / "last", state.prompt, **save)
        if cfg.save_every_epoch:
            save_adapter(out / "epochs" / f"{state.epoch:03d}", state.prompt, **save)
        if is_best:
            card = model_card(run.task, run.adapter_conf, record, run.base_record, state.head)
            save_adapter(out, state.prompt, **save, card=card)
    return record


def _checkpoint(run: Run, state: TrainState, rng: random.Random) -> None:
    if run.procs.main:
        ckpt = state.checkpoint(run.encoder, run.optimizer, run.scheduler, rng)
        save_checkpoint(run.out / "checkpoint", ckpt)


def _stop(run: Run, state: TrainState, why: str, where: str, good: tuple | None):
    """A non-finite loss or prompt: save the last good (prompt, head), then stop with a message."""
    out = run.out
    kept = "no prompt was saved (the first batch already failed)"
    if good is not None:
        if run.procs.main:
            prompt, head = good
            save_adapter(out / "last", prompt, run.adapter_conf, run.task, head=head)
            if state.best is None:  # make the run folder loadable too
                save_adapter(out, prompt, run.adapter_conf, run.task, head=head)
        kept = f"the last good prompt is saved in {out / 'last'}"
        if state.best is not None:
            kept += f", the best one (epoch {state.best['epoch']}) in {out}"
    raise SoftpromptError(
        f"{why} at {where}; training stopped and "
        f"{kept}. Lower --lr (now {run.cfg.lr}) or use --dtype float32 (now {run.cfg.dtype})"
    )


def _finite(state: TrainState) -> bool:
    """Whether the prompt (and the head) hold only finite numbers."""
    tensors = [state.prompt, *(state.head.tensors().values() if state.head is not None else ())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _shown(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "epoch_seconds"}


def _silent(*args, **kwargs) -> None:
    pass


def _better(new: dict, old: dict, select_by: str = "loss") -> bool:
    if "eval_loss" not in new:
        return True  # no eval set: the last prompt is the best we know
    if "eval_macro_f1" in new:  # classification, multilabel
        return (new["eval_macro_f1"], -new["eval_loss"]) > (old["eval_macro_f1"], -old["eval_loss"])  # fmt: skip
    key = f"eval_{select_by}"
    if select_by != "loss" and key in new:  # generation, by a score of its outputs
        return (new[key], -new["eval_loss"]) > (old[key], -old["eval_loss"])
    return new["eval_loss"] < old["eval_loss"]


SHOWN = ("eval_loss", "eval_ppl", "eval_accuracy", "eval_macro_f1", "eval_bleu", "eval_rouge_l",
         "eval_chrf", "eval_exact_match", "eval_micro_f1", "eval_subset_accuracy")  # fmt: skip


def _format_record(r: dict) -> str:
    s = f"epoch {r['epoch']}: train_loss={r['train_loss']:.4f} train_ppl={r['train_ppl']:.3f}"
    for k in SHOWN:
        if k in r:
            s += f" {k}={r[k]:.4f}" if k in ("eval_loss", "eval_ppl") else f" {k}={r[k]:.3f}"
    return s + f" ({r['epoch_seconds']:.1f}s)"


def score_generation(run: Run, state: TrainState, best: torch.Tensor, progress: bool) -> None:
    """--task generation with evaluation rows: the kept prompt's greedy outputs scored (unless
    the epochs already did), said, added to the best record and its softprompt.json."""
    if "eval_bleu" not in state.best:
        state.best = {**state.best, **generation_scores(run, best, progress)}
    run.task.extra["metrics"] = _shown(state.best)
    atomic_write_json(run.out / TASK_NAME, run.task.to_dict())
    logger.info(
        "kept epoch %d, its greedy outputs on %d eval inputs: %s",
        state.best["epoch"], len(set(run.eval_texts)),
        " ".join(f"{k}={state.best[k]:.3f}" for k in SHOWN[4:8]),
    )  # fmt: skip

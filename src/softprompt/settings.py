"""The settings of the commands that use an adapter (`eval`, `predict`, `push`), and the flags
`train` and `cv` take besides a TrainConfig. Plain dataclasses: a flag per field (flags.py), the
help from the field's docstring. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config import PRESETS, Dtype
from .flags import positional, required


@dataclass
class AdapterConfig:
    """What `eval` and `predict` share: the adapter, the base model, how to run it."""

    adapter: str = positional()
    """Run / adapter folder (ours or PEFT's) or Hub repo id."""
    model: str | None = None
    """Base model (default: the one recorded in the adapter) (--model)."""
    labels: str | None = None
    """Comma-separated label names, for PEFT adapters without softprompt.json (--labels)."""
    template: str | None = None
    """Override the input template (--template)."""
    text_column: str | None = None
    """Column with the text (default: the one used in training) (--text-column)."""
    dtype: Dtype = "auto"
    """Base model dtype: auto (bfloat16 where the CPU or GPU has bfloat16 hardware, else
    float32; SOFTPROMPT_AUTO_DTYPE=float32|bfloat16 overrides what auto picks), float32, bfloat16 or float16; the prompt stays float32 (--dtype)."""
    device: str | None = None
    """cuda, mps or cpu; default: the first available (--device)."""
    batch_size: int = 32
    """Texts per batch (--batch-size)."""
    generate: bool = False
    """Free generation instead of label scoring (--generate); a generation adapter (--task
    generation) always generates."""
    max_new_tokens: int | None = None
    """Most new tokens per text when generating; default: a generation adapter's own (its
    longest training target and some room), else 6 (--max-new-tokens)."""
    num_beams: int = 1
    """Beam search with this many beams when generating; 1: greedy (--num-beams)."""
    length_penalty: float = 1.0
    """Beam search: a finished text scores its log-probability over its length to this power;
    above 1 favours longer texts (--length-penalty)."""
    stop: list[str] = field(default_factory=list)
    """A string that ends a generated text there (repeatable, --stop)."""
    ensemble: list[str] = field(default_factory=list)
    """Another adapter for the same task (repeatable): label probabilities are the mean of all
    prompts' (--ensemble)."""
    calibration: bool = True
    """Apply the decision bias saved by `softprompt cv` (a multilabel adapter: its per-label
    thresholds); --no-calibration: raw label probabilities (multilabel: every threshold 0.5)
    (--calibration / --no-calibration)."""
    trust_remote_code: bool = False
    """Allow models with custom code from the Hub (--trust-remote-code)."""
    progress: bool = True
    """Show progress bars and the dtype line on stderr (--progress / --no-progress)."""
    subset: str | None = None
    """Hub dataset configuration of --data (--subset)."""
    split: str = "test"
    """Hub dataset split of --data (--split)."""
    output: str | None = None
    """Write the results to this file: eval's metrics JSON, or predict's predictions as .csv or
    .jsonl (default: printed as JSON lines) (--output)."""
    overwrite: bool = False
    """Replace --output if it exists (--overwrite)."""


@dataclass
class EvalConfig(AdapterConfig):
    """`softprompt eval`: accuracy, macro-F1 and the confusion matrix on labeled data."""

    data: str = required(default="")
    """Labeled data: a file or a Hub dataset id (--data)."""
    label_column: str | None = None
    """Column with the gold label, or a generation adapter's reference text (default: the
    training one) (--label-column)."""
    outputs: str | None = None
    """Also write every row's output (and its gold label or references) to this .csv or
    .jsonl file (--outputs)."""


@dataclass
class PredictConfig(AdapterConfig):
    """`softprompt predict`: label (or generate for) texts given inline or in a file."""

    texts: list[str] = positional(default_factory=list)
    """Texts to classify."""
    data: str | None = None
    """A file or Hub dataset id with a text column (--data)."""


@dataclass
class PushConfig:
    """`softprompt push`: upload a run folder's adapter to the Hugging Face Hub."""

    adapter: str = positional()
    """Run folder."""
    repo_id: str = positional()
    """Hub repository, e.g. your-name/smollm2-complaints."""
    private: bool = False
    """Create the repository private (--private)."""
    token: str | None = None
    """Hub token (default: the logged-in one or HF_TOKEN) (--token)."""


Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]
"""`--preset` choices."""


@dataclass
class RecipeFlags:
    """What `train` and `cv` take besides a TrainConfig."""

    config: list[str] = field(default_factory=list)
    """YAML or JSON file of settings: the flags' names with _ as keys (num_virtual_tokens: 16,
    balance: false); repeatable, a later file wins; flags given on the command line win over
    the files (--config)."""
    preset: Preset | None = None
    """Start from a named recipe; --config files and flags override its values (--preset)."""


@dataclass
class TrainFlags(RecipeFlags):
    """`softprompt train`'s own flags."""

    seeds: int = 1
    """Train this many prompts (seeds --seed, --seed+1, ...) into --out/seed-<s>/ and save them
    as one ensemble (--out/ensemble.json): eval, predict and serve use their mean (--seeds)."""


@dataclass
class CvFlags(RecipeFlags):
    """`softprompt cv`'s own flags."""

    folds: int = 5
    """Number of folds (--folds)."""
    retrain: bool = True
    """Train the final run on all rows; --no-retrain: only report (--retrain / --no-retrain)."""

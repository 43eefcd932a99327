"""Adapter folders: PEFT's own format plus softprompt's task file, saved (`save_adapter`) and
loaded (`load_adapter`), and checked against a model (`check_fits`). PEFT's config fields and
head keys: `peft_format`; ensembles: `ensembles`; the Hub: `hub`.

A run folder is an adapter folder:
    adapter_config.json        PEFT's PromptTuningConfig fields (peft_type PROMPT_TUNING; with
                               suffix tokens SOFTPROMPT_SUFFIX_TUNING, which PEFT refuses)
    adapter_model.safetensors  {"prompt_embeddings": [P, H] float32}
    softprompt.json            template, label names, max length, base model, metrics
    softprompt_suffix.safetensors  {"suffix_embeddings": [S, H]}, only with --suffix-tokens:
                               vectors that run after the text, which PEFT cannot place
                               (PEFT loads the P vectors in front alone)
With a classification head (`--head`) the weights file holds the head too:
    linear: "base_model.score.weight" [K, H] and task_type SEQ_CLS, PEFT's own layout (its
            `score` in modules_to_save): PEFT loads it onto AutoModelForSequenceClassification
            with num_labels=K, labels in softprompt.json's order;
    pooled: "softprompt_head.{weight,bias,mean,std,layers}" and task_type
            SOFTPROMPT_POOLED_CLS, which PEFT refuses ("Invalid task type") rather than
            loading the prompt without its head.
A deep prompt (`--method prefix`) is PEFT's PREFIX_TUNING adapter: adapter_model.safetensors
holds {"prompt_embeddings": [P, layers*2*kv_heads*head_dim]}, each position's keys and values
in every layer (`forward.kv.prefix_to_kv`). PEFT's P-tuning adapters (P_TUNING) load as plain
prompts: PEFT saves their encoder's output, [P, H].
    README.md                  a short model card
An ensemble folder holds `ensemble.json` and its member adapters (`ensembles`).
Only safetensors are read: no pickle, ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import Task
from .errors import SoftpromptError, first_line
from .files import atomic_write_bytes, atomic_write_json, read_json_object, read_safetensors
from .peft_format import (
    POOLED_TASK_TYPE,
    PREFIX_PEFT_TYPE,
    SCORE_KEY,
    SEQ_CLS,
    TASK_TYPES,
    head_tensors,
    read_head,
)
from .readouts.head import ClassifierHead

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TASK_NAME = "softprompt.json"
PICKLE_NAME = "adapter_model.bin"
WEIGHT_KEY = "prompt_embeddings"
SUFFIX_NAME = "softprompt_suffix.safetensors"
SUFFIX_KEY = "suffix_embeddings"
SUFFIX_PEFT_TYPE = "SOFTPROMPT_SUFFIX_TUNING"
"""peft_type of an adapter with suffix tokens: PEFT knows no such type and refuses to load it,
rather than silently loading the tokens in front alone (which do not classify as trained)."""
PTUNING_PEFT_TYPES = ("P_TUNING", "PROMPT_ENCODER")
"""PEFT's P-tuning (PromptEncoderConfig): saved as its encoder's output, a plain prompt."""
PEFT_TYPES = ("PROMPT_TUNING", SUFFIX_PEFT_TYPE, PREFIX_PEFT_TYPE, *PTUNING_PEFT_TYPES)
KINDS = {"PROMPT_TUNING": "prompt", SUFFIX_PEFT_TYPE: "prompt"} | dict.fromkeys(
    PTUNING_PEFT_TYPES, "prompt"
)
"""What each peft_type loads as: a prompt of input embeddings, or (the rest) a deep prompt."""


@dataclass
class Adapter:
    """A loaded adapter: the prompt [P, H] (float32), PEFT config, and task (None for a plain PEFT adapter).

    With suffix tokens (task.suffix_tokens = S) the prompt is [P+S, H]: its last S vectors run
    after the text (see `data.suffix_placeholders`)."""

    prompt: Tensor
    config: dict
    task: Task | None
    path: str
    base_model: str | None
    kind: str = "prompt"
    """prompt (input embeddings [P(+S), H]) or prefix (a deep prompt [P, layers*2*heads*d])."""
    head: ClassifierHead | None = None
    """The classification head (`--head`), or None: label words answer."""


def save_adapter(
    folder: str | Path,
    prompt: Tensor,
    config: dict,
    task: Task | None,
    *,
    card: str | None = None,
    head: ClassifierHead | None = None,
) -> Path:
    """Write an adapter folder; each file is replaced atomically (a kill never leaves a torn file).

    With suffix tokens the prompt [P+S, H] is split: the P vectors in front go to PEFT's file
    (num_virtual_tokens = P), the S after the text to softprompt_suffix.safetensors. A
    classification head goes into the weights file (`head_tensors`)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompt = prompt.detach().float().cpu()
    extra: dict[str, Tensor] = {}
    config = {k: v for k, v in config.items() if k != "modules_to_save"}
    config["task_type"] = "CAUSAL_LM"
    if head is not None:
        extra, fields = head_tensors(head)
        config.update(fields)
    S = task.suffix_tokens if task is not None else 0
    if S:
        if not 0 < S < prompt.shape[0]:
            raise SoftpromptError(
                f"a prompt of {prompt.shape[0]} vectors cannot hold {S} suffix tokens"
            )
        config = {
            **config,
            "num_virtual_tokens": int(prompt.shape[0] - S),
            "peft_type": SUFFIX_PEFT_TYPE,
        }
        suffix = save({SUFFIX_KEY: prompt[-S:].contiguous()})
        atomic_write_bytes(folder / SUFFIX_NAME, suffix)
        prompt = prompt[:-S]
    else:
        (folder / SUFFIX_NAME).unlink(missing_ok=True)  # a stale one from an earlier save
        if config.get("peft_type") == SUFFIX_PEFT_TYPE:
            config = {**config, "peft_type": "PROMPT_TUNING"}
    atomic_write_bytes(folder / WEIGHTS_NAME, save({WEIGHT_KEY: prompt.contiguous(), **extra}))
    atomic_write_json(folder / CONFIG_NAME, config)
    if task is not None:
        atomic_write_json(folder / TASK_NAME, task.to_dict())
    if card is not None:
        atomic_write_bytes(folder / "README.md", card.encode())
    return folder


def _resolve_folder(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise SoftpromptError(
            f"{path} is a file; give the adapter's folder (holding {CONFIG_NAME})"
        )
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    path,
                    allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, TASK_NAME, SUFFIX_NAME, "README.md"],
                )
            )
        except Exception as e:  # noqa: BLE001
            raise SoftpromptError(
                f"adapter {path}: not a local folder, and the Hub download failed: {first_line(e)}"
            ) from None
    raise SoftpromptError(f"adapter folder {path} not found")


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter folder (ours or PEFT's). Refuses other PEFT types and pickle weights."""
    folder = _resolve_folder(str(path))
    conf_path = folder / CONFIG_NAME
    if not conf_path.is_file():
        raise SoftpromptError(
            f"{folder}: no {CONFIG_NAME}; this is not an adapter folder (train one with `softprompt train`)"
        )
    config = read_json_object(conf_path)
    ptype = config.get("peft_type")
    if ptype not in PEFT_TYPES:
        raise SoftpromptError(
            f"{folder}: adapter type is {ptype!r}; softprompt loads PROMPT_TUNING, PREFIX_TUNING "
            "and P_TUNING (prompt encoder) adapters (use PEFT itself for LoRA and other types)"
        )
    if config.get("task_type") not in TASK_TYPES:
        raise SoftpromptError(
            f"{folder}: task_type is {config.get('task_type')!r}; softprompt loads CAUSAL_LM "
            "prompts and SEQ_CLS prompts with their `score` head"
        )
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise SoftpromptError(
                f"{folder}: only {PICKLE_NAME} (pickle) is present; softprompt reads safetensors only. "
                "Re-save it with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise SoftpromptError(f"{folder}: {WEIGHTS_NAME} is missing")
    tensors = read_safetensors(weights)
    key = (
        WEIGHT_KEY
        if WEIGHT_KEY in tensors
        else next((k for k in tensors if k.endswith(WEIGHT_KEY)), None)
    )
    if key is None:
        raise SoftpromptError(f"{weights}: no tensor named {WEIGHT_KEY!r} (found {list(tensors)})")
    prompt = tensors[key].float()
    n = config.get("num_virtual_tokens")
    if prompt.dim() != 2 or (
        n is not None and prompt.shape[0] != n * config.get("num_transformer_submodules", 1)
    ):
        raise SoftpromptError(
            f"{weights}: prompt shape {tuple(prompt.shape)} does not match num_virtual_tokens={n}"
        )
    if not torch.isfinite(prompt).all():
        raise SoftpromptError(
            f"{weights}: the prompt holds NaN or infinite values; the adapter is unusable"
        )
    head = read_head(tensors, weights)
    if config.get("task_type") in (SEQ_CLS, POOLED_TASK_TYPE) and head is None:
        raise SoftpromptError(
            f"{weights}: task_type {config['task_type']} but no classification head in it "
            f"(expected {SCORE_KEY!r}); the file is damaged or was saved without its head"
        )
    task = None
    base = config.get("base_model_name_or_path")
    task_path = folder / TASK_NAME
    if task_path.is_file():
        task = Task.from_dict(read_json_object(task_path))
        base = task.extra.get("base_model", base)
        if task.suffix_tokens:
            prompt = torch.cat([prompt, _load_suffix(folder, task.suffix_tokens, prompt.shape[1])])
    if ptype == SUFFIX_PEFT_TYPE and (task is None or not task.suffix_tokens):
        raise SoftpromptError(
            f"{conf_path}: peft_type {SUFFIX_PEFT_TYPE} needs {TASK_NAME} with suffix_tokens; "
            "copy the whole adapter folder"
        )
    kind = KINDS.get(ptype, "prefix")
    if kind == "prefix" and task is not None and task.suffix_tokens:
        raise SoftpromptError(
            f"{task_path}: suffix_tokens={task.suffix_tokens} with a {ptype} adapter; deep prompts "
            "take no suffix tokens (the file is damaged or hand-edited)"
        )
    return Adapter(
        prompt=prompt,
        config=config,
        task=task,
        path=str(folder),
        base_model=base,
        kind=kind,
        head=head,
    )


def _load_suffix(folder: Path, S: int, width: int) -> Tensor:
    """The S suffix vectors [S, H] that softprompt.json announces."""
    path = folder / SUFFIX_NAME
    if not path.is_file():
        raise SoftpromptError(
            f"{folder}: {TASK_NAME} says suffix_tokens={S} but {SUFFIX_NAME} is missing; "
            "copy the whole adapter folder"
        )
    suffix = read_safetensors(path).get(SUFFIX_KEY)
    if suffix is None or tuple(suffix.shape) != (S, width) or not torch.isfinite(suffix).all():
        got = None if suffix is None else tuple(suffix.shape)
        raise SoftpromptError(
            f"{path}: expected finite {SUFFIX_KEY!r} of shape {(S, width)}, found {got}; "
            "the file is damaged"
        )
    return suffix.float()


def check_fits(adapter: Adapter, model) -> None:
    """Refuse a prompt whose width is not the base model's hidden size, and a deep prompt whose
    layers, heads or head size are not the model's (one line naming both shapes)."""
    from .forward.kv import prefix_dims
    from .modeling.load import hidden_size

    if adapter.kind == "prefix":
        check_head_fits(adapter, model)
        L, heads, d = prefix_dims(model)
        c = adapter.config
        n_l, n_h = c.get("num_layers"), c.get("num_attention_heads")
        t = c.get("token_dim")
        theirs = (n_l, n_h, t // n_h if isinstance(t, int) and n_h else None)
        if theirs != (L, heads, d) or adapter.prompt.shape[1] != L * 2 * heads * d:
            raise SoftpromptError(
                f"{adapter.path}: deep prompt for {theirs[0]} layers x {theirs[1]} key/value heads "
                f"x head size {theirs[2]}, but the base model has {L} x {heads} x {d}; it was "
                f"trained for another model ({adapter.base_model}); pass that one with --model"
            )
        return
    H = hidden_size(model)
    if adapter.prompt.shape[1] != H:
        raise SoftpromptError(
            f"{adapter.path}: prompt width {adapter.prompt.shape[1]} does not match the base model's hidden size {H}; "
            f"this adapter was trained for another model ({adapter.base_model}); pass that one with --model"
        )
    check_head_fits(adapter, model)


def check_head_fits(adapter: Adapter, model) -> None:
    """Refuse a classification head for another model width or depth (one line naming both)."""
    from .modeling.load import decoder_layers, hidden_size

    head = adapter.head
    if head is None:
        return
    H = hidden_size(model)
    if head.width != H:
        raise SoftpromptError(
            f"{adapter.path}: classification head of width {head.width}, but the base model's "
            f"hidden size is {H}; it was trained for another model ({adapter.base_model}); pass "
            "that one with --model"
        )
    L = len(decoder_layers(model))
    if head.layers and max(head.layers) > L:
        raise SoftpromptError(
            f"{adapter.path}: the head pools layers {head.layers[0]}-{head.layers[-1]}, but the "
            f"base model has {L} layers; it was trained for another model ({adapter.base_model})"
        )

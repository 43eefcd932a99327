"""What a door names: a `Predictor` (one adapter, or an ensemble of adapters for one task, with
its calibration bias, labels, template and budget), made of `Member`s (each prompt, its suffix
vectors and its classification head), checked against the model and each other
(`make_predictor`); and what a door asks of one (`ClassifyRow`, `GenerateRow`,
`PromptLogprobRow`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from .adapters import Adapter, check_fits
from .data import Task, input_budget, label_token_ids
from .errors import SoftpromptError
from .peft_format import prefix_config
from .readouts.head import ClassifierHead

_ids = itertools.count()


@dataclass(eq=False)
class Member:
    """One prompt of a predictor: [P+S, H] float32 on the model's device; its last S vectors
    run after the text (suffix tokens). With kind "prefix" a deep prompt [P, layers*2*heads*d]
    (its keys/values in every layer, `forward.kv.prefix_to_kv`)."""

    prompt: Tensor
    suffix_tokens: int = 0
    path: str | None = None
    kind: str = "prompt"
    head: ClassifierHead | None = None
    """Its classification head (`--head`): it answers through it instead of the label words."""
    uid: int = field(default_factory=lambda: next(_ids))
    """Unique per load: the KV cache's key (a prompt loaded again is a new member)."""

    @property
    def front_length(self) -> int:
        """Vectors in front of the input (P)."""
        return int(self.prompt.shape[0]) - self.suffix_tokens

    @property
    def front(self) -> Tensor:
        return self.prompt[: self.front_length]

    @property
    def suffix(self) -> Tensor:
        return self.prompt[self.front_length :]


@dataclass(eq=False)
class Predictor:
    """What a request or command names: one adapter or an ensemble of them, for one task."""

    name: str
    task: Task
    members: list[Member]
    bias: list[float] | None
    """Added to the log-probabilities of the (mean) label probabilities; None: raw."""
    label_ids: list[list[int]]
    """Each label's tokens plus the end token (what label scoring scores)."""
    budget: int
    """Input tokens allowed for classification (max_length minus the longest label)."""
    template_head: list[int]
    """The template's tokens before the text (e.g. `Tweet text :`), cached with each prompt."""
    base_model: str | None = None
    thresholds: list[float] | None = None
    """Multilabel: each label's decision threshold (fitted by `softprompt cv`); None: 0.5 each."""
    unloaded: bool = False
    """Set when a server unloads it: queued rows still finish, its KV is no longer cached."""

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def num_virtual_tokens(self) -> int:
        return self.members[0].front_length

    @property
    def prompt_bytes(self) -> int:
        return sum(m.prompt.numel() * m.prompt.element_size() for m in self.members)

    @property
    def can_generate(self) -> bool:
        """Whether it can write text: not with a classification head (its prompt was trained
        for the head, not for the LM head's next token)."""
        return all(m.head is None for m in self.members)

    def describe(self) -> dict:
        """What /v1/models and the CLI say about it."""
        heads = {m.head.kind if m.head is not None else "none" for m in self.members}
        return {
            "task": self.task.kind,
            "labels": list(self.task.label_names),
            "head": heads.pop() if len(heads) == 1 else sorted(heads),
            "can_generate": self.can_generate,
            "num_virtual_tokens": self.num_virtual_tokens,
            "suffix_tokens": self.task.suffix_tokens,
            "method": self.members[0].kind,
            "template": self.task.template,
            "max_length": self.task.max_length,
            "max_new_tokens": self.task.max_new_tokens,
            "base_model": self.base_model,
            "calibration_bias": self.bias,
            "thresholds": self.thresholds,
            "ensemble": [m.path for m in self.members] if self.is_ensemble else None,
        }


def need_generation(predictor: Predictor) -> None:
    """A predictor with a classification head answers labels only."""
    if not predictor.can_generate:
        raise SoftpromptError(
            f"{predictor.name} has a classification head (--head): it answers with label "
            "probabilities only, not text; classify instead (predict/eval without --generate, "
            "or /v1/classify)"
        )


def need_labels(predictor: Predictor) -> None:
    """Label scoring needs label names; a plain PEFT adapter has none of its own."""
    if predictor.task.generates:
        raise SoftpromptError(
            f"{predictor.name} is a generation adapter (--task generation): it writes text "
            "rather than choosing a label; use predict (it generates), eval (it scores the "
            "outputs with BLEU, ROUGE-L, chrF and exact match) or /v1/completions"
        )
    if not predictor.task.label_names:
        raise SoftpromptError(
            f"{predictor.name} has no label names (a plain PEFT adapter); pass them with "
            "--labels (e.g. --labels 'complaint,no complaint') or use --generate"
        )


def _saved_bias(adapter: Adapter) -> list[float] | None:
    task = adapter.task
    cal = (task.extra.get("calibration") or {}) if task is not None else {}
    return cal.get("bias")


def _saved_thresholds(adapter: Adapter) -> list[float] | None:
    task = adapter.task
    cal = (task.extra.get("calibration") or {}) if task is not None else {}
    return cal.get("thresholds")


def _difference(first: Adapter, other: Adapter) -> list[str]:
    """How ensemble member `other` differs from `first` in what must be the same."""
    what = []
    if other.kind != first.kind:
        what.append(f"a {other.kind} adapter (not a {first.kind} one)")
    if other.base_model != first.base_model:
        what.append(f"base model {other.base_model!r} (not {first.base_model!r})")
    if other.prompt.shape[1] != first.prompt.shape[1]:
        what.append(f"prompt width {other.prompt.shape[1]} (not {first.prompt.shape[1]})")
    a, b = first.task, other.task
    if (a is None) != (b is None):
        what.append("no softprompt.json" if b is None else "a softprompt.json the first lacks")
    elif a is not None and b is not None:
        for name, said in (
            ("kind", "task"),
            ("label_names", "labels"),
            ("template", "template"),
            ("text_column", "text column"),
            ("max_length", "max_length"),
            ("suffix_tokens", "suffix tokens"),
        ):
            x, y = getattr(a, name), getattr(b, name)
            if x != y:
                what.append(f"{said} {y!r} (not {x!r})")
    return what


def _per_label(values, task: Task, first: Adapter, said) -> list[float] | None:
    """A calibration's per-label values as floats (None stays None), refused in one line when
    their count is not the labels' (`said(n)` names what was found)."""
    if values is None:
        return None
    values = [float(x) for x in values]
    if len(values) != len(task.label_names):
        raise SoftpromptError(
            f"{first.path}: {said(len(values))} {len(task.label_names)} labels "
            f"{task.label_names}; remove 'calibration' from softprompt.json (or run "
            "`softprompt cv` again)"
        )
    return values


def make_predictor(
    model,
    tokenizer,
    adapters: Sequence[Adapter],
    *,
    name: str | None = None,
    bias: Sequence[float] | None | str = "saved",
    thresholds: Sequence[float] | None | str = "saved",
) -> Predictor:
    """A predictor of one adapter, or an ensemble of several for the same task.

    Refuses (SoftpromptError, one line naming the member and the difference) an adapter for
    another model, members that disagree on task kind, base model, labels, template, text
    column, max_length or suffix tokens, a calibration bias or thresholds whose length is not
    the labels', and a multilabel adapter without a head.
    `bias`: "saved" (the first adapter's, from `softprompt cv`), None, or the values;
    `thresholds` (multilabel) the same.
    """
    if not adapters:
        raise SoftpromptError("a predictor needs at least one adapter")
    first = adapters[0]
    for a in adapters:
        check_fits(a, model)
    for other in adapters[1:]:
        what = _difference(first, other)
        if what:
            raise SoftpromptError(
                f"ensemble member {other.path} cannot join {first.path}: it has " + "; ".join(what)
            )
    task = first.task or Task(text_column="text", label_names=[])
    values = _per_label(
        _saved_bias(first) if bias == "saved" else bias, task, first,
        lambda n: f"the calibration bias has {n} entries for",
    )  # fmt: skip
    cuts = _per_label(
        _saved_thresholds(first) if thresholds == "saved" else thresholds, task, first,
        lambda n: f"{n} thresholds for",
    )  # fmt: skip
    for a in adapters:
        if task.multilabel and a.head is None:
            raise SoftpromptError(
                f"{a.path}: a multilabel adapter needs its classification head (label words "
                "choose one label); the weights file has none: copy the whole adapter folder"
            )
        if a.head is not None and a.head.num_labels != len(task.label_names):
            raise SoftpromptError(
                f"{a.path}: its classification head scores {a.head.num_labels} labels, but "
                f"{len(task.label_names)} are given {task.label_names}; pass its labels, in "
                "training order, with --labels"
            )
    device = model.get_input_embeddings().weight.device
    return Predictor(
        name=name or str(first.path),
        task=task,
        members=[
            Member(
                a.prompt.to(device),
                task.suffix_tokens,
                path=str(a.path),
                kind=a.kind,
                head=None if a.head is None else a.head.to(device),
            )
            for a in adapters
        ],
        bias=None if task.multilabel else values,
        thresholds=cuts if task.multilabel else None,
        label_ids=[label_token_ids(tokenizer, n) for n in task.label_names],
        budget=input_budget(tokenizer, task),
        template_head=list(tokenizer(task.head())["input_ids"]),
        base_model=first.base_model,
    )


def predictor_for_prompt(
    model,
    tokenizer,
    prompt: Tensor,
    task: Task,
    *,
    bias: Sequence[float] | None = None,
    name: str = "prompt",
    kind: str = "prompt",
    head: ClassifierHead | None = None,
    thresholds: Sequence[float] | None = None,
) -> Predictor:
    """A predictor of prompt [P+S, H] (or an ensemble [K, P+S, H]) for `task`, not read from disk
    (training's per-epoch evaluation, `evaluate.label_probabilities`); raw unless `bias` (or,
    multilabel, `thresholds`) is given.
    kind "prefix": deep prompts [P, layers*2*heads*d], with the config the model gives them.
    `head`: the (one) prompt's classification head."""
    prompts = [prompt] if prompt.dim() == 2 else list(prompt)
    base = task.extra.get("base_model") if task.extra else None
    adapters = [
        Adapter(
            prompt=p.detach().float(),
            config=prefix_config(model, p, base_model=base, projection=False)
            if kind == "prefix"
            else {},
            task=task,
            path=f"{name} {i}",
            base_model=base,
            kind=kind,
            head=head,
        )
        for i, p in enumerate(prompts)
    ]
    return make_predictor(model, tokenizer, adapters, name=name, bias=bias, thresholds=thresholds)


def raw_task(task: Task) -> Task:
    """Completions: the client's text goes right after the soft prompt, no template (suffix
    tokens, if the adapter has them, still follow the text)."""
    return replace(task, template="{text}", label_names=[])


# --------------------------------------------------------------------------- requests


@dataclass(eq=False)
class ClassifyRow:
    predictor: Predictor
    ids: list[int]
    """Rendered, tokenised (and if needed cut) input."""


@dataclass(eq=False)
class GenerateRow:
    predictor: Predictor
    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    on_token: Callable[[int, Tensor], bool] | None = None
    """Called (on the model's thread) with each new token but the end token and the logits
    [V] it was chosen from; returning True ends the row there (a stop string, a client that
    left). Streaming and stop strings use it."""


@dataclass(eq=False)
class PromptLogprobRow:
    """Score a prompt's own tokens after the predictor's (first) prompt (`echo` + `logprobs`)."""

    predictor: Predictor
    ids: list[int]
    """Token ids; suffix placeholders (< 0) are left out: they come after the text, so the
    text's log-probabilities do not depend on them."""
    top: int = 0
    """How many most likely tokens to give at each position."""


def chosen_labels(predictor: Predictor, probs: Tensor, calibrated: bool = True) -> list[list[str]]:
    """A multilabel predictor's answer for probabilities [N, L]: each row's labels whose
    probability reaches its threshold (the saved ones with `calibrated`, else 0.5), in label
    order."""
    from .calibrate import choose_labels

    names = predictor.task.label_names
    cuts = predictor.thresholds if calibrated else None
    return [[n for n, c in zip(names, row, strict=True) if c] for row in choose_labels(probs, cuts).tolist()]  # fmt: skip

"""Data: loading tables (CSV, JSONL, Parquet, Hub), label names, the template, tokenising,
collating and batching."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import DEFAULT_TEMPLATE, template_problems
from .errors import SoftpromptError, first_line

LOCAL_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


@dataclass
class Task:
    """What a prompt was trained to do; saved beside the adapter as `softprompt.json`."""

    text_column: str
    """Column holding the input text (`--text-column`)."""
    label_names: list[str]
    """The class labels, in a fixed order (index i is class i in every matrix)."""
    label_column: str | None = None
    """Column holding the gold label (`--label-column`)."""
    template: str = DEFAULT_TEMPLATE
    """Input template with `{text}` and optionally `{text_column}` (`--template`)."""
    max_length: int = 64
    """Maximum tokens of input + label; the input text is cut to fit, never the label."""
    suffix_tokens: int = 0
    """Soft tokens placed right after `{text}` (`--suffix-tokens`): the last of the prompt's
    vectors, which run after the text instead of before it (see `suffix_placeholders`)."""
    kind: str = "classification"
    """classification (a closed set of `label_names`, one per row), generation (free-text
    targets, no label names) or multilabel (any number of `label_names` per row) (`--task`)."""
    max_new_tokens: int | None = None
    """Generation: the most new tokens written per input by default (the longest training
    target's tokens, end token included, with some room)."""
    label_separator: str | None = None
    """Multilabel: what joins a row's labels in a text cell (`--label-separator`); None for the
    other kinds."""
    extra: dict = field(default_factory=dict)

    @property
    def generates(self) -> bool:
        """Whether the task writes free text (`--task generation`)."""
        return self.kind == "generation"

    @property
    def multilabel(self) -> bool:
        """Whether a row has any number of labels, each a yes/no of its own (`--task multilabel`)."""
        return self.kind == "multilabel"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        known = {
            k: d[k]
            for k in (
                "text_column",
                "label_names",
                "label_column",
                "template",
                "max_length",
                "suffix_tokens",
                "kind",
                "max_new_tokens",
                "label_separator",
            )
            if k in d
        }
        if "text_column" not in known:
            raise SoftpromptError("softprompt.json has no 'text_column'; the file is damaged")
        extra = dict(d.get("extra") or {})
        extra.update({k: v for k, v in d.items() if k not in known and k != "extra"})
        return cls(**known, extra=extra)

    def render(self, text: str) -> str:
        return self.template.format(text=text, text_column=self.text_column)

    def head(self) -> str:
        """The rendered template before the text: what every input starts with."""
        return self.render("\x00").split("\x00")[0]

    def tail(self) -> str:
        """The rendered template after the text (e.g. ` Label : `)."""
        return self.render("\x00").split("\x00", 1)[1]


def suffix_placeholders(n: int) -> list[int]:
    """Token ids standing for `n` suffix soft tokens in a row: -n .. -1. Id -k is the prompt's
    k-th vector from the end, so `prompt[id]` (Python's negative indexing) is its embedding
    (see `forward.batch`, which turns them into slots). They are never real vocabulary ids (those are >= 0)."""
    return list(range(-n, 0))


@dataclass
class Table:
    """Rows read from a file or Hub dataset: texts, and labels as names (None if absent); a
    multilabel table's labels are each row's list of names."""

    source: str
    texts: list[str]
    labels: list | None
    columns: list[str]
    label_order: list[str] | None = None
    """Label names in the dataset's own order (a ClassLabel's names), when it has one."""


def validate_template(template: str) -> None:
    """Raise SoftpromptError if `template` is not a valid input template."""
    problems = template_problems(template)
    if problems:
        raise SoftpromptError(problems[0])


def load_table(
    source: str,
    text_column: str,
    label_column: str | None = None,
    *,
    subset: str | None = None,
    split: str = "train",
    flag: str = "--data",
    need_labels: bool = True,
    separator: str | None = None,
) -> Table:
    """Read `source` (a local CSV/TSV/JSONL/Parquet file, or a Hub dataset id) into a Table.

    Integer ClassLabel labels become their names with `_` replaced by a space, as in the guide.
    With `separator` (`--task multilabel`) each row's labels are a list: a text cell split on
    it, a JSONL list (or a Hub dataset's sequence of ClassLabels) as it is (`label_sets`).
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise SoftpromptError(f"{flag} {source}: file not found")
        fmt = LOCAL_FORMATS.get(suffix)
        if fmt is None:
            raise SoftpromptError(
                f"{flag} {source}: unknown file type {suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet"
            )
        try:
            if fmt == "csv":  # every cell a string: "0123" stays "0123", an empty cell stays ""
                import pandas as pd

                frame = pd.read_csv(
                    path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False
                )
                ds = datasets.Dataset.from_pandas(frame, preserve_index=False)
            else:
                ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - parsers raise many types; report the file
            raise SoftpromptError(
                f"{flag} {source}: could not read as {suffix[1:]}: {first_line(e)}"
            ) from None
    else:
        try:
            ds = datasets.load_dataset(source, subset, split=split)
        except Exception as e:  # noqa: BLE001
            raise SoftpromptError(
                f"{flag} {source}: not a local file, and loading it from the Hugging Face Hub failed "
                f"(subset={subset!r}, split={split!r}): {first_line(e)}"
            ) from None
    columns = list(ds.column_names)
    wanted = [("--text-column", text_column)] + (
        [("--label-column", label_column)] if label_column and need_labels else []
    )
    for col_flag, col in wanted:
        if col not in columns:
            raise SoftpromptError(
                f"{flag} {source}: no column {col!r} ({col_flag}); columns found: {', '.join(map(repr, columns))}"
            )
    if len(ds) == 0:
        raise SoftpromptError(f"{flag} {source}: no rows")
    texts = ["" if t is None else str(t) for t in ds[text_column]]
    labels = None
    order = None
    if label_column and need_labels and label_column in columns:
        feature = ds.features[label_column]
        raw = ds[label_column]
        if separator is not None:
            inner = getattr(feature, "feature", None)  # a list column's element type
            if isinstance(inner, datasets.ClassLabel):
                order = [n.replace("_", " ") for n in inner.names]
                raw = [None if v is None else [order[i] for i in v if i >= 0] for v in raw]
            where = f"{flag} {source}"
            labels = label_sets(raw, separator, where, label_column)
            return Table(
                source=source, texts=texts, labels=labels, columns=columns, label_order=order
            )
        if isinstance(feature, datasets.ClassLabel):
            order = [n.replace("_", " ") for n in feature.names]
            labels = [order[i] if i is not None and i >= 0 else None for i in raw]
        else:
            labels = [None if v is None or str(v).strip() == "" else str(v).strip() for v in raw]
        missing = [i for i, v in enumerate(labels) if v is None]
        if missing:
            rows = ", ".join(str(i) for i in missing[:5])
            raise SoftpromptError(
                f"{flag} {source}: column {label_column!r} is empty in {len(missing)} row(s) (rows {rows}); "
                "fill them or drop those rows"
            )
    return Table(source=source, texts=texts, labels=labels, columns=columns, label_order=order)


OTHER_SEPARATORS = (",", ";", "|")
"""Separators a multilabel cell may use instead of --label-separator: a row holding one of these
and not the chosen one is refused (`label_sets`)."""


def label_sets(cells: Sequence, separator: str, where: str, column: str) -> list[list[str]]:
    """Each row's labels (`--task multilabel`), first-seen order, no repeats: a list cell (JSONL,
    Parquet) as it is, a text cell split on `separator`, each name stripped. Refused, in one
    line naming `where` (flag and file), the row and what to do: a row with no label, and a row
    that separates its labels with another of `OTHER_SEPARATORS` (";" where --label-separator
    is ",") while it holds no `separator`."""
    out: list[list[str]] = []
    texts: list[tuple[int, str]] = []
    for i, v in enumerate(cells):
        if isinstance(v, (list, tuple)):
            names = [str(x).strip() for x in v if x is not None]
        elif v is None:
            names = []
        else:
            texts.append((i, str(v)))
            names = str(v).split(separator)
        out.append(list(dict.fromkeys(n for n in (x.strip() for x in names) if n)))
    empty = [i for i, names in enumerate(out) if not names]
    if empty:
        rows = ", ".join(str(i) for i in empty[:5])
        raise SoftpromptError(
            f"{where}: column {column!r} has no label in {len(empty)} row(s) (rows {rows}); "
            "give every row at least one label, or drop those rows"
        )
    others = [x for x in OTHER_SEPARATORS if x != separator]
    used = any(separator in v for _, v in texts)
    for i, v in texts:
        found = [x for x in others if x in v]
        if found and separator not in v:
            if used:
                raise SoftpromptError(
                    f"{where}: row {i} separates its labels with {found[0]!r} ({v!r}) while "
                    f"other rows use {separator!r} (--label-separator): use one separator in "
                    f"every row (fix row {i})"
                )
            raise SoftpromptError(
                f"{where}: no row of column {column!r} holds {separator!r} (--label-separator), "
                f"but row {i} holds {found[0]!r} ({v!r}): pass --label-separator '{found[0]}'"
            )
    return out


def label_set(table: Table) -> list[str]:
    """The labels present in a training table, in the dataset's order (ClassLabel) or sorted; a
    multilabel table's (each row a list): the union of its rows' labels."""
    labels = table.labels or []
    present = {n for v in labels for n in v} if labels and isinstance(labels[0], list) else set(labels)  # fmt: skip
    if table.label_order:
        return [n for n in table.label_order if n in present]
    return sorted(present)


def check_labels(table: Table, label_names: Sequence[str], flag: str) -> None:
    """Refuse rows whose label (or, multilabel, one of whose labels) is not one of label_names."""
    known = set(label_names)
    for i, lab in enumerate(table.labels or []):
        if isinstance(lab, list):
            new = [n for n in lab if n not in known]
            if new:
                raise SoftpromptError(
                    f"{flag} {table.source}: row {i} has label {new[0]!r}, which no training row "
                    f"has (the labels are {list(label_names)}); a label seen only here cannot be "
                    f"learned: add training rows with it, or drop it from row {i}"
                )
        elif lab not in known:
            raise SoftpromptError(
                f"{flag} {table.source}: row {i} has label {lab!r}, which is not one of the prompt's labels "
                f"{list(label_names)}; fix the row or remove it"
            )


def label_token_ids(tokenizer, label: str) -> list[int]:
    """A label's target tokens: the label's own tokens, then the end token (as in the guide)."""
    return list(tokenizer(label, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def _rendered_ids(tokenizer, task: Task, text: str) -> list[int]:
    """The rendered input's token ids; with suffix tokens, their placeholders after the text."""
    if not task.suffix_tokens:
        return list(tokenizer(task.render(text))["input_ids"])
    tail = task.tail()
    full = task.render(text)
    ids = list(tokenizer(full[: len(full) - len(tail)])["input_ids"])
    rest = list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []
    return ids + suffix_placeholders(task.suffix_tokens) + rest


def input_token_ids(tokenizer, task: Task, text: str, budget: int) -> list[int]:
    """Token ids of the rendered input, the text cut (at a character) until they fit `budget`.
    Suffix placeholders, like the prompt's vectors in front, do not count against it."""
    budget += task.suffix_tokens
    ids = _rendered_ids(tokenizer, task, text)
    if len(ids) <= budget:
        return ids
    empty = _rendered_ids(tokenizer, task, "")
    if len(empty) > budget:
        raise SoftpromptError(
            f"--max-length {task.max_length} leaves {budget} tokens for the input, but the template alone "
            f"needs {len(empty)}; raise --max-length"
        )
    lo, hi = 0, len(text)  # invariant: text[:lo] fits, text[:hi] does not
    best = empty
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = _rendered_ids(tokenizer, task, text[:mid])
        if len(cand) <= budget:
            lo, best = mid, cand
        else:
            hi = mid
    return list(best)


def encode_input(tokenizer, task: Task, text: str, budget: int) -> tuple[list[int], bool]:
    """(`input_token_ids`, was the text cut to fit?)."""
    ids = input_token_ids(tokenizer, task, text, budget)
    return ids, len(ids) < len(_rendered_ids(tokenizer, task, text))


def input_budget(tokenizer, task: Task) -> int:
    """Tokens left for the input when the longest label must fit after it."""
    longest = max((len(label_token_ids(tokenizer, n)) for n in task.label_names), default=0)
    return task.max_length - longest


@dataclass
class Encoded:
    """One training row: input ids, then label ids; the loss is on the label ids only."""

    input_ids: list[int]
    label_ids: list[int]
    label: int = -1
    """The row's class: its index in the task's label_names (-1: not known). A classification
    head trains on it (`--head`); label-word training reads `label_ids`."""
    labels: list[int] = field(default_factory=list)
    """Multilabel: the indices of the row's labels in label_names (its multi-hot target's ones);
    empty for the other kinds."""

    def __len__(self) -> int:
        return len(self.input_ids) + len(self.label_ids)


def encode_rows(
    tokenizer, task: Task, texts: Sequence[str], labels: Sequence[str]
) -> list[Encoded]:
    """Tokenise rows for training; the label is never cut (the input text is)."""
    out = []
    for text, label in zip(texts, labels, strict=True):
        lab = label_token_ids(tokenizer, label)
        budget = task.max_length - len(lab)
        if budget < 1:
            raise SoftpromptError(
                f"--max-length {task.max_length} is too short for the label {label!r} ({len(lab)} tokens); raise it"
            )
        k = task.label_names.index(label) if label in task.label_names else -1
        out.append(Encoded(input_token_ids(tokenizer, task, text, budget), lab, k))
    return out


def encode_label_sets(
    tokenizer, task: Task, texts: Sequence[str], label_sets: Sequence[Sequence[str]]
) -> list[Encoded]:
    """Tokenise multilabel rows: the input cut to the budget the engine gives it
    (`input_budget`), no label tokens (a head reads the labels), each row's label indices."""
    budget = input_budget(tokenizer, task)
    if budget < 1:
        raise SoftpromptError(
            f"--max-length {task.max_length} is too short for the longest label; raise it"
        )
    index = {n: k for k, n in enumerate(task.label_names)}
    return [
        Encoded(
            input_token_ids(tokenizer, task, text, budget),
            [],
            -1,
            [index[n] for n in names if n in index],
        )  # fmt: skip
        for text, names in zip(texts, label_sets, strict=True)
    ]


def multi_hot(rows: Sequence[Encoded], num_labels: int) -> Tensor:
    """The rows' multilabel targets [B, K] (float32): 1 where the row has the label."""
    out = torch.zeros(len(rows), num_labels)
    for i, r in enumerate(rows):
        out[i, r.labels] = 1.0
    return out


def target_token_ids(tokenizer, target: str) -> list[int]:
    """A generation target's tokens: the text's own, then the end token (as a label's)."""
    return label_token_ids(tokenizer, target)


@dataclass
class Cuts:
    """What encoding generation rows had to cut to fit --max-length (never dropped)."""

    inputs: int = 0
    """Rows whose input text was cut."""
    targets: int = 0
    """Rows whose target was cut (its end token kept)."""
    longest: int = 0
    """The longest row's tokens before any cut (input + target + end token)."""


def encode_targets(
    tokenizer, task: Task, texts: Sequence[str], targets: Sequence[str]
) -> tuple[list[Encoded], Cuts]:
    """Tokenise generation rows: the rendered input, then the target's tokens and the end
    token (the loss is on those). A row longer than task.max_length loses the end of its input
    text first, down to half of max_length, then the end of its target (keeping the end token);
    `Cuts` counts both, so that the caller can say so."""
    out, cuts = [], Cuts()
    empty = len(_rendered_ids(tokenizer, task, ""))
    for text, target in zip(texts, targets, strict=True):
        lab = target_token_ids(tokenizer, target)
        full = _rendered_ids(tokenizer, task, text)
        n_in = len(full) - task.suffix_tokens
        cuts.longest = max(cuts.longest, n_in + len(lab))
        if n_in + len(lab) <= task.max_length:
            out.append(Encoded(full, lab))
            continue
        # the input keeps what the target leaves, but at least half of max_length
        in_budget = max(task.max_length - len(lab), min(n_in, task.max_length // 2), empty)
        ids = input_token_ids(tokenizer, task, text, in_budget)
        if len(ids) < len(full):
            cuts.inputs += 1
        room = task.max_length - (len(ids) - task.suffix_tokens)
        if len(lab) > room:
            if room < 2:
                raise SoftpromptError(
                    f"--max-length {task.max_length} leaves no room for a target after the "
                    "template; raise --max-length"
                )
            lab = lab[: room - 1] + lab[-1:]
            cuts.targets += 1
        out.append(Encoded(ids, lab))
    return out, cuts


def collate_train(rows: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad rows to the batch's longest: input_ids, attention_mask, labels, each [B, T].

    Masks come from lengths, not from pad ids (pad may equal eos, which labels contain).
    """
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n_in, n = len(r.input_ids), len(r)
        ids[i, :n] = torch.tensor(r.input_ids + r.label_ids)
        mask[i, :n] = 1
        labels[i, n_in:n] = torch.tensor(r.label_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to the longest: (input_ids [B, T], attention_mask [B, T])."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(list(s))
            mask[i, T - len(s) :] = 1
    return ids, mask


def stratified_split(
    labels: Sequence[str], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded (train_idx, eval_idx), each sorted, holding out about `fraction` of each class by
    scikit-learn's `train_test_split(stratify=labels)`. A class with one row stays in train;
    every class with 2+ rows keeps at least one row in train and (fraction > 0) holds out at
    least one; fraction 0 holds out nothing."""
    from sklearn.model_selection import train_test_split  # lazily: slow to import

    counts = Counter(labels)
    rows = [i for i, v in enumerate(labels) if counts[v] > 1]  # one row cannot be split
    if fraction <= 0 or not rows:
        return list(range(len(labels))), []
    classes = len({labels[i] for i in rows})
    # scikit-learn needs at least one row of each class on each side; every class has 2+ rows
    n_held = min(max(round(len(rows) * fraction), classes), len(rows) - classes)
    train, held = train_test_split(
        rows, test_size=n_held, stratify=[labels[i] for i in rows], random_state=seed
    )
    # its allocation is proportional, so a small class can get no held row, or only held rows
    for lab in sorted({labels[i] for i in rows}):
        if not any(labels[i] == lab for i in held):
            held.append(train.pop(next(j for j, i in enumerate(train) if labels[i] == lab)))
        elif not any(labels[i] == lab for i in train):
            train.append(held.pop(next(j for j, i in enumerate(held) if labels[i] == lab)))
    singles = [i for i, v in enumerate(labels) if counts[v] == 1]
    return sorted(train + singles), sorted(held)


def shuffled_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train_idx, eval_idx), each sorted, holding out about `fraction` of n rows (at
    least one, at most n - 1; none at fraction 0): multilabel rows, which no single label
    stratifies."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = min(max(1, round(n * fraction)), n - 1)
    return sorted(idx[k:]), sorted(idx[:k])


def stratified_folds(labels: Sequence[str], k: int, seed: int) -> list[list[int]]:
    """k seeded folds of row indices (each sorted) by scikit-learn's `StratifiedKFold`: every
    fold gets its share of each class (within one row), and fold sizes differ by at most one.
    k must be between 2 and the size of the smallest class (`--folds`)."""
    from sklearn.model_selection import StratifiedKFold  # lazily: slow to import

    counts = {lab: n for lab, n in sorted(Counter(labels).items())}
    if k < 2 or k > min(counts.values(), default=0):
        raise SoftpromptError(
            f"--folds must be between 2 and the size of the smallest class ({counts}); got {k}"
        )
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [sorted(held.tolist()) for _, held in split.split(list(labels), list(labels))]


def batch_order(
    lengths: Sequence[int], batch_size: int, rng: random.Random, group_by_length: bool = True
) -> list[list[int]]:
    """Shuffled batches of row indices. With group_by_length, rows are sorted by length inside
    shuffled windows of 50 batches, so a batch pads little while the order stays random."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        window = batch_size * 50
        idx = [
            i
            for s in range(0, len(idx), window)
            for i in sorted(idx[s : s + window], key=lambda j: lengths[j])
        ]
    batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def common_prefix_length(seqs: Sequence[Sequence[int]], head: Sequence[int], keep: int = 1) -> int:
    """How many leading tokens of `head` every sequence starts with, leaving each sequence at
    least `keep` tokens of its own. Checked per row, so a row whose tokenisation merged across
    the template boundary (BPE) simply shortens the shared part."""
    n = len(head)
    for s in seqs:
        n = min(n, len(s) - keep)
        i = 0
        while i < n and s[i] == head[i]:
            i += 1
        n = i
        if n <= 0:
            return 0
    return max(n, 0)


def group_references(
    texts: Sequence[str], targets: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """Generation rows grouped by input: (each distinct input, first-seen order; its targets,
    the references a generated text is scored against)."""
    refs: dict[str, list[str]] = {}
    for t, y in zip(texts, targets, strict=True):
        refs.setdefault(t, []).append(y)
    return list(refs), list(refs.values())


def grouped_split(texts: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train_idx, eval_idx), each sorted, holding out about `fraction` of the distinct
    inputs with all their rows (so no reference of a held-out input trains)."""
    if fraction <= 0:
        return list(range(len(texts))), []
    inputs = list(dict.fromkeys(texts))
    rng = random.Random(seed)
    rng.shuffle(inputs)
    n_held = min(max(1, round(len(inputs) * fraction)), len(inputs) - 1)
    held = set(inputs[:n_held])
    keep = [i for i, t in enumerate(texts) if t not in held]
    out = [i for i, t in enumerate(texts) if t in held]
    return keep, out


def looks_like_free_text(labels: Sequence[str]) -> bool:
    """Whether a label column looks like free text rather than a closed label set: at least 10
    distinct values, and one for every two rows or fewer."""
    distinct = len(set(labels))
    return distinct >= 10 and distinct * 2 >= len(labels)


def empty_texts(table: Table) -> list[int]:
    """Rows whose input text is empty (or only spaces)."""
    return [i for i, t in enumerate(table.texts) if not t.strip()]

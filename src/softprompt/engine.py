"""The one inference engine: (predictors, texts) -> label probabilities or generations.

Every door calls it: `softprompt eval` / `predict`, the Python API (`SoftPrompt`), the
evaluation inside `train`, `softprompt cv`, and both endpoints of `softprompt serve`. What makes
an answer lives here and nowhere else:

- a `Predictor` is what a door names: one adapter, or an ensemble of adapters for one task,
  with its calibration bias (`softprompt cv`) and its labels, template and budget;
- each member's prompt KV (with the template's head after it) is computed once and cached,
  least recently used out first (`KVCache`);
- a batch may mix predictors: every (row, member) runs in one packed pass per prompt length,
  each after its own prompt, with its own suffix tokens after the text;
- a row's label probabilities are the mean of its members', then its predictor's bias.

A row's answer never depends on the rows it is batched with (up to float rounding).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters import Adapter, check_fits, prefix_config
from .calibrate import apply_bias
from .data import (
    Encoded,
    Task,
    collate_left,
    collate_train,
    encode_input,
    input_budget,
    input_token_ids,
    label_token_ids,
)
from .errors import SoftpromptError
from .kernels.features import head_features
from .kernels.generate import choose_tokens, decode_next
from .kernels.kv import (
    KV,
    common_prefix_length,
    extend_kv,
    prefix_kv,
    prefix_to_kv,
    run_after_prefix,
    slice_kv,
    stack_kv,
)
from .kernels.loss import label_loss, prefix_label_loss
from .kernels.packed import note_path, packed_fits
from .kernels.scoring import score_rows
from .modeling.load import check_model
from .readouts.head import ClassifierHead, RowFeatures, head_starts, needs

_ids = itertools.count()


@dataclass(eq=False)
class Member:
    """One prompt of a predictor: [P+S, H] float32 on the model's device; its last S vectors
    run after the text (suffix tokens). With kind "prefix" a deep prompt [P, layers*2*heads*d]
    (its keys/values in every layer, `kernels.kv.prefix_to_kv`)."""

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
            "labels": list(self.task.label_names),
            "head": heads.pop() if len(heads) == 1 else sorted(heads),
            "can_generate": self.can_generate,
            "num_virtual_tokens": self.num_virtual_tokens,
            "suffix_tokens": self.task.suffix_tokens,
            "method": self.members[0].kind,
            "template": self.task.template,
            "max_length": self.task.max_length,
            "base_model": self.base_model,
            "calibration_bias": self.bias,
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
    if not predictor.task.label_names:
        raise SoftpromptError(
            f"{predictor.name} has no label names (a plain PEFT adapter); pass them with "
            "--labels (e.g. --labels 'complaint,no complaint') or use --generate"
        )


def _saved_bias(adapter: Adapter) -> list[float] | None:
    task = adapter.task
    cal = (task.extra.get("calibration") or {}) if task is not None else {}
    return cal.get("bias")


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


def make_predictor(
    model,
    tokenizer,
    adapters: Sequence[Adapter],
    *,
    name: str | None = None,
    bias: Sequence[float] | None | str = "saved",
) -> Predictor:
    """A predictor of one adapter, or an ensemble of several for the same task.

    Refuses (SoftpromptError, one line naming the member and the difference) an adapter for
    another model, members that disagree on base model, labels, template, text column,
    max_length or suffix tokens, and a calibration bias whose length is not the labels'.
    `bias`: "saved" (the first adapter's, from `softprompt cv`), None, or the values.
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
    values = _saved_bias(first) if bias == "saved" else bias
    if values is not None:
        values = [float(x) for x in values]
        if len(values) != len(task.label_names):
            raise SoftpromptError(
                f"{first.path}: the calibration bias has {len(values)} entries for "
                f"{len(task.label_names)} labels {task.label_names}; remove 'calibration' from "
                "softprompt.json (or run `softprompt cv` again)"
            )
    for a in adapters:
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
        bias=values,
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
) -> Predictor:
    """A predictor of prompt [P+S, H] (or an ensemble [K, P+S, H]) for `task`, not read from disk
    (training's per-epoch evaluation, `evaluate.label_probabilities`); raw unless `bias` is given.
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
    return make_predictor(model, tokenizer, adapters, name=name, bias=bias)


def raw_task(task: Task) -> Task:
    """Completions: the client's text goes right after the soft prompt, no template (suffix
    tokens, if the adapter has them, still follow the text)."""
    return replace(task, template="{text}", label_names=[])


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


def kv_bytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class KVCache:
    """Each member's prompt KV with its predictor's template head after it, computed once and
    kept, least recently used first out, within `max_bytes` (None: no bound; the member in use is
    always kept, even alone over the budget). `get` runs on the model's thread; `discard` may
    come from another."""

    def __init__(self, model, max_bytes: int | None = None):
        self.model = model
        self.max_bytes = max_bytes
        self._kv: OrderedDict[int, KV] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, member: Member, head: Sequence[int] = (), keep: bool = True) -> KV:
        with self._lock:
            kv = self._kv.get(member.uid)
            if kv is not None:
                self._kv.move_to_end(member.uid)
                self.hits += 1
                return kv
        with torch.no_grad():
            ids = torch.tensor(list(head), dtype=torch.long) if len(head) else None
            if member.kind == "prefix":  # a deep prompt is a KV already; the head runs after it
                kv = extend_kv(self.model, prefix_to_kv(self.model, member.prompt), head)
            elif member.front_length == 0 and ids is None:  # the base model: an empty KV
                kv = slice_kv(prefix_kv(self.model, member.prompt.new_zeros(1, member.prompt.shape[1])), 0)  # fmt: skip
            else:
                kv = prefix_kv(self.model, member.front, ids)
        with self._lock:
            self.misses += 1
            if not keep:
                return kv
            self._kv[member.uid] = kv
            self.bytes += kv_bytes(kv)
            while self.max_bytes is not None and self.bytes > self.max_bytes and len(self._kv) > 1:
                _, old = self._kv.popitem(last=False)
                self.bytes -= kv_bytes(old)
        return kv

    def discard(self, member: Member) -> None:
        with self._lock:
            kv = self._kv.pop(member.uid, None)
            if kv is not None:
                self.bytes -= kv_bytes(kv)

    def __len__(self) -> int:
        return len(self._kv)


def _is_sharded(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


class Engine:
    """The frozen model, its tokenizer and the prompt KV cache; turns rows into answers.

    `share_head=False` runs the template's head with every row instead of caching it with the
    prompt (the same numbers up to rounding; for tests). On an FSDP-sharded model no KV can be
    kept, and a model that cannot run packed rows (`kernels.packed.packed_problem`) cannot take them:
    there every (row, label) pair runs as one plain forward pass (the padded path).
    """

    def __init__(
        self, model, tokenizer, *, kv_cache_bytes: int | None = None, share_head: bool = True
    ):
        check_model(model)
        if not _is_sharded(model):
            note_path(model)
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache = KVCache(model, kv_cache_bytes)
        self.share_head = share_head
        self.device = model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ doors' entry points

    def predictor(self, adapters: Sequence[Adapter], **kw) -> Predictor:
        return make_predictor(self.model, self.tokenizer, adapters, **kw)

    def base_predictor(self, name: str) -> Predictor:
        """The base model itself, no soft prompt in front (P = 0): for generation; it has no
        labels, so label scoring refuses it (`need_labels`)."""
        from .modeling.load import hidden_size

        prompt = torch.zeros(0, hidden_size(self.model))
        adapter = Adapter(prompt=prompt, config={}, task=None, path=name, base_model=name)
        return make_predictor(self.model, self.tokenizer, [adapter], name=name, bias=None)

    def encode(self, predictor: Predictor, text: str) -> tuple[list[int], bool]:
        """A classification input: rendered with the predictor's template, cut to its budget."""
        return encode_input(self.tokenizer, predictor.task, text, predictor.budget)

    def classify(
        self,
        predictor: Predictor,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        progress: bool = False,
        calibrated: bool = True,
    ) -> Tensor:
        """Each label's probability for each text: [N, L] (rows sum to 1), the predictor's bias
        applied unless `calibrated` is False."""
        need_labels(predictor)
        rows = [ClassifyRow(predictor, self.encode(predictor, t)[0]) for t in texts]
        out = torch.empty(len(rows), len(predictor.label_ids))
        per_batch = max(1, batch_size // len(predictor.members))
        batches = _length_sorted_batches([len(r.ids) for r in rows], per_batch)
        for idx in tqdm(batches, desc="classify", disable=not progress, unit="batch"):
            probs = self.label_probabilities([rows[i] for i in idx], calibrated=calibrated)
            out[idx] = torch.stack(probs)
        return out

    def generate_texts(
        self,
        predictor: Predictor,
        texts: Sequence[str],
        *,
        max_new_tokens: int = 6,
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[str]:
        """Greedy free generation after each templated text, as in the PEFT guide."""
        need_generation(predictor)
        task = predictor.task
        budget = task.max_length - 1 if not task.label_names else predictor.budget
        rows = [
            GenerateRow(predictor, input_token_ids(self.tokenizer, task, t, budget), max_new_tokens)
            for t in texts
        ]
        out = [""] * len(rows)
        batches = _length_sorted_batches([len(r.ids) for r in rows], batch_size)
        for idx in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
            for i, (toks, _) in zip(idx, self.generate([rows[i] for i in idx]), strict=True):
                out[i] = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
        return out

    def run(self, rows: Sequence[ClassifyRow | GenerateRow | PromptLogprobRow]) -> list:
        """A server batch: each classify row's probabilities (list of floats, its labels'
        order, calibrated), each generate row's (new tokens, finished by eos), each prompt
        log-probability row's (`prompt_logprobs`)."""
        out: list = [None] * len(rows)
        cls = [i for i, r in enumerate(rows) if isinstance(r, ClassifyRow)]
        gen = [i for i, r in enumerate(rows) if isinstance(r, GenerateRow)]
        for i, r in enumerate(rows):
            if isinstance(r, PromptLogprobRow):
                out[i] = self.prompt_logprobs(r)
        if cls:
            for i, p in zip(cls, self.label_probabilities([rows[i] for i in cls]), strict=True):
                out[i] = p.tolist()
        if gen:
            for i, g in zip(gen, self.generate([rows[i] for i in gen]), strict=True):
                out[i] = g
        return out

    @torch.no_grad()
    def prompt_logprobs(self, row: PromptLogprobRow) -> tuple[Tensor, Tensor, Tensor]:
        """Log-probability of each of the row's tokens after the prompt and the tokens before
        it: ([T-1] for tokens 1..T-1 (token 0 has no context of text), top ids [T-1, k], their
        log-probabilities [T-1, k]), on the CPU. Equal to `log_softmax` of `concat_forward`."""
        p = row.predictor
        need_generation(p)
        if p.is_ensemble:
            raise SoftpromptError(f"{p.name} is an ensemble: log-probabilities use one prompt")
        m = p.members[0]
        kv = slice_kv(self.kv_cache.get(m, p.template_head, keep=not p.unloaded), m.front_length)
        ids = [i for i in row.ids if i >= 0]
        x = torch.tensor([ids], device=self.device)
        hidden, _ = run_after_prefix(self.model, kv, x, torch.ones_like(x))
        logp = torch.log_softmax(self.model.get_output_embeddings()(hidden[0, :-1]).float(), -1)
        picked = logp.gather(1, x[0, 1:, None])[:, 0]
        top = logp.topk(min(row.top, logp.shape[-1]), -1)
        return picked.cpu(), top.indices.cpu(), top.values.cpu()

    # ------------------------------------------------------------------ one batch

    @torch.no_grad()
    def label_probabilities(
        self, rows: Sequence[ClassifyRow], *, calibrated: bool = True
    ) -> list[Tensor]:
        """One batch of classify rows of any predictors: each row's label probabilities [L]
        (mean over its predictor's members, then its bias)."""
        # every (row, member) is a unit; units with prompts of one length share a packed pass
        units = [(b, m) for b, r in enumerate(rows) for m in r.predictor.members]
        groups: dict[int, list[int]] = {}
        for u, (_, m) in enumerate(units):
            groups.setdefault(m.front_length, []).append(u)
        member_probs: list[Tensor | None] = [None] * len(units)
        for part in groups.values():
            scores = self._score([rows[units[u][0]] for u in part], [units[u][1] for u in part])
            for u, s in zip(part, scores, strict=True):
                member_probs[u] = torch.softmax(s.float(), -1).cpu()
        out = []
        u = 0
        for r in rows:
            k = len(r.predictor.members)
            p = torch.stack(member_probs[u : u + k]).mean(0)
            u += k
            bias = r.predictor.bias if calibrated else None
            out.append(apply_bias(p[None], bias)[0])
        return out

    def _score(self, rows: Sequence[ClassifyRow], members: Sequence[Member]) -> list[Tensor]:
        """Each row's label scores after its member's prompt (one length P), whose softmax is
        its label probabilities: the log-probability of each label's tokens, or with a
        classification head its logits. One pass for both kinds of rows."""
        conts: dict[tuple[int, ...], int] = {}
        for r, m in zip(rows, members, strict=True):
            if m.head is None:
                for c in r.predictor.label_ids:
                    conts.setdefault(tuple(c), len(conts))
        span = max(m.prompt.shape[0] + len(r.ids) for r, m in zip(rows, members, strict=True))
        span += max((len(c) for c in conts), default=0)
        if _is_sharded(self.model) or not packed_fits(self.model, span):  # says why once
            return self._score_full(rows, members, list(conts))
        kv, index, bank, h = self._prompts(rows, members)
        ids, mask = collate_left([r.ids[h:] for r in rows], self.tokenizer.pad_token_id)
        layers, last = needs([m.head for m in members])
        starts = torch.stack([self._starts([r])[0] for r in rows]) - h if layers else None
        scores, feats = score_rows(
            self.model,
            kv,
            ids.to(self.device),
            mask.to(self.device),
            list(conts),
            rows=index,
            prompts=bank,
            trie=[m.head is None for m in members],
            layers=layers,
            starts=starts,
            last=last,
        )
        return [
            _row_logits(m.head, feats, b)
            if m.head is not None
            else scores[b, [conts[tuple(c)] for c in r.predictor.label_ids]]
            for b, (r, m) in enumerate(zip(rows, members, strict=True))
        ]

    def _starts(self, rows: Sequence[ClassifyRow]) -> Tensor:
        """Where each row's text begins in its ids [B] (after its template's head)."""
        return torch.cat([head_starts([r.ids], r.predictor.template_head) for r in rows])

    def _score_full(self, rows, members, conts) -> list[Tensor]:
        """`_score` without a KV cache or packing (`full_label_scores`, `head_features` on padded
        rows): for a sharded model, and for one that cannot run packed rows
        (`kernels.packed.packed_problem`)."""
        pad = self.tokenizer.pad_token_id
        index = {tuple(c): i for i, c in enumerate(conts)}
        out: list = [None] * len(rows)
        for kind, headed in {(m.kind, m.head is not None) for m in members}:
            part = [
                b for b, m in enumerate(members) if (m.kind, m.head is not None) == (kind, headed)
            ]
            prompts = torch.stack([members[b].prompt for b in part])
            seqs = [rows[b].ids for b in part]
            if headed:
                batch = collate_train([Encoded(list(q), []) for q in seqs], pad)
                feats = head_features(
                    self.model, prompts, batch["input_ids"].to(self.device),
                    batch["attention_mask"].to(self.device), self._starts([rows[b] for b in part]),
                    [members[b].head for b in part], kind=kind, packed=False,
                )  # fmt: skip
                for j, b in enumerate(part):
                    out[b] = _row_logits(members[b].head, feats, j)
                continue
            logp = full_label_scores(self.model, prompts, seqs, conts, pad, kind=kind)
            for j, b in enumerate(part):
                out[b] = logp[j, [index[tuple(c)] for c in rows[b].predictor.label_ids]]
        return out

    def _prompts(self, rows, members: Sequence[Member]):
        """(stacked KV of the distinct members over their prompt and the first h tokens of their
        template head [N, heads, P+h, d], each row's index into it [B], their suffix vectors
        right-aligned [N, S, H] or None, h)."""
        h = 0
        if self.share_head:  # rows start after the part of their head that all of them have
            h = min(common_prefix_length([r.ids], r.predictor.template_head, keep=1) for r in rows)
        slot: dict[int, int] = {}
        distinct: list[tuple[Member, Predictor]] = []
        for r, m in zip(rows, members, strict=True):
            if m.uid not in slot:
                slot[m.uid] = len(distinct)
                distinct.append((m, r.predictor))
        kvs = [
            slice_kv(
                self.kv_cache.get(
                    m, p.template_head if self.share_head else (), keep=not p.unloaded
                ),
                m.front_length + h,
            )
            for m, p in distinct
        ]
        index = torch.tensor([slot[m.uid] for m in members], device=self.device)
        S = max(m.suffix_tokens for m, _ in distinct)
        bank = None
        if S:
            H = distinct[0][0].prompt.shape[1]
            bank = torch.zeros(len(distinct), S, H, device=self.device)
            for i, (m, _) in enumerate(distinct):
                if m.suffix_tokens:
                    bank[i, S - m.suffix_tokens :] = m.suffix
        return stack_kv(kvs), index, bank, h

    @torch.no_grad()
    def generate(self, rows: Sequence[GenerateRow]) -> list[tuple[list[int], bool]]:
        """Each row's new tokens (up to its max_tokens, without the end token) and whether it
        ended by the end token: `begin` the rows, then `step` until every row has ended (a row
        leaves at its end token, its max_tokens, or when its `on_token` says so)."""
        done: dict[int, tuple[list[int], bool]] = {}
        batch = self.begin(rows)
        while batch.rows:
            for r, result in self.step(batch):
                done[id(r)] = result
        return [done[id(r)] for r in rows]

    @torch.no_grad()
    def begin(self, rows: Sequence[GenerateRow]) -> Decoding:
        """Run the rows' inputs after their prompts (rows of one prompt length in one pass) and
        return them ready to decode, their first tokens' logits computed."""
        groups: dict[int, list[GenerateRow]] = {}
        for r in rows:
            need_generation(r.predictor)
            if r.predictor.is_ensemble:
                raise SoftpromptError(
                    f"{r.predictor.name} is an ensemble: generation uses one prompt (ensembles "
                    "work with label scoring)"
                )
            groups.setdefault(r.predictor.num_virtual_tokens, []).append(r)
        batch = Decoding([], (), torch.zeros(0, 0, device=self.device), torch.zeros(0, 0), [])
        head = self.model.get_output_embeddings()
        for part in groups.values():
            members = [r.predictor.members[0] for r in part]
            kv, index, bank, h = self._prompts(part, members)
            ids, mask = collate_left([r.ids[h:] for r in part], self.tokenizer.pad_token_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden, cache = run_after_prefix(
                self.model, kv, ids, mask, index, use_cache=True, prompts=bank
            )
            P = kv[0][0].shape[2]
            full = torch.cat([mask.new_ones(len(part), P), mask], 1)
            new = Decoding(
                list(part),
                tuple((layer.keys, layer.values) for layer in cache.layers),
                full,
                head(hidden[:, -1]).float(),
                [[] for _ in part],
            )
            batch = merge_decoding(batch, new)
        return batch

    @torch.no_grad()
    def step(self, batch: Decoding) -> list[tuple[GenerateRow, tuple[list[int], bool]]]:
        """One decoding step for every row of `batch` (in place): choose each row's token (its
        own temperature and top_p), end the rows that are done, run the others one token
        further. Returns the rows that ended, each with (new tokens, ended by the end token)."""
        B = len(batch.rows)
        nxt = torch.empty(B, dtype=torch.long, device=batch.logits.device)
        modes: dict[tuple[float, float], list[int]] = {}
        for j, r in enumerate(batch.rows):
            modes.setdefault((r.temperature, r.top_p), []).append(j)
        for (temperature, top_p), idx in modes.items():
            nxt[idx] = choose_tokens(batch.logits[idx], temperature, top_p)
        eos = self.tokenizer.eos_token_id
        ended, keep = [], []
        for j, r in enumerate(batch.rows):
            toks = batch.toks[j]
            if r.max_tokens <= 0:
                ended.append((r, (toks, False)))
                continue
            t = int(nxt[j])
            if eos is not None and t == eos:
                ended.append((r, (toks, True)))
                continue
            toks.append(t)
            stop = r.on_token is not None and r.on_token(t, batch.logits[j])
            if stop or len(toks) >= r.max_tokens:
                ended.append((r, (toks, False)))
            else:
                keep.append(j)
        batch.keep(keep)
        if batch.rows:
            batch.logits, batch.kv, batch.mask = decode_next(
                self.model, batch.kv, batch.mask, nxt[keep]
            )
        return ended

    def drop(self, batch: Decoding, rows: Sequence[GenerateRow]) -> None:
        """Take rows out of a running batch (their client left)."""
        gone = {id(r) for r in rows}
        batch.keep([j for j, r in enumerate(batch.rows) if id(r) not in gone])


@dataclass(eq=False)
class Decoding:
    """Generate rows decoding together, each after its own prompt: per layer keys/values
    [B, heads, L, d] left-padded to one length L, which positions are valid [B, L], each row's
    next-token logits [B, V] and its new tokens so far. Rows join (`merge_decoding`) and leave
    (`keep`) between steps."""

    rows: list[GenerateRow]
    kv: KV
    mask: Tensor
    logits: Tensor
    toks: list[list[int]]

    def keep(self, idx: list[int]) -> None:
        """Keep only the rows at these positions."""
        if len(idx) == len(self.rows):
            return
        self.rows = [self.rows[j] for j in idx]
        self.toks = [self.toks[j] for j in idx]
        if not idx:
            self.kv, self.mask, self.logits = (), self.mask[:0], self.logits[:0]
            return
        at = torch.tensor(idx, device=self.mask.device)
        self.kv = tuple((k[at], v[at]) for k, v in self.kv)
        self.mask, self.logits = self.mask[at], self.logits[at]
        lead = int((self.mask.cumsum(-1) == 0).sum(-1).min())  # padding no row needs now
        if lead:
            self.kv = tuple((k[:, :, lead:], v[:, :, lead:]) for k, v in self.kv)
            self.mask = self.mask[:, lead:]


def merge_decoding(a: Decoding, b: Decoding) -> Decoding:
    """One batch of both: the shorter side's keys/values and mask padded on the left."""
    if not a.rows:
        return b
    if not b.rows:
        return a
    L = max(a.mask.shape[1], b.mask.shape[1])

    def pad(t: Tensor, n: int) -> Tensor:  # n zeros in front along the sequence axis
        if n == 0:
            return t
        shape = list(t.shape)
        axis = 2 if t.dim() == 4 else 1
        shape[axis] = n
        return torch.cat([t.new_zeros(shape), t], axis)

    na, nb = L - a.mask.shape[1], L - b.mask.shape[1]
    kv = tuple(
        (torch.cat([pad(ka, na), pad(kb, nb)]), torch.cat([pad(va, na), pad(vb, nb)]))
        for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True)
    )
    return Decoding(
        a.rows + b.rows,
        kv,
        torch.cat([pad(a.mask, na), pad(b.mask, nb)]),
        torch.cat([a.logits, b.logits]),
        a.toks + b.toks,
    )


def full_label_scores(
    model,
    prompt: Tensor,
    seqs: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_id: int,
    *,
    kind: str = "prompt",
) -> Tensor:
    """Log-probability of each continuation after prompt + each input: [B, L], as
    `score_continuations` gives, by one plain forward over every (input, continuation) pair (no
    KV cache): L times the compute, for sharded (FSDP) models, where a cache cannot be kept.
    `prompt` is one prompt [P+S, H] or one per input [B, P+S, H]; with kind "prefix" deep
    prompts [(B,) P, layers*2*heads*d]."""
    pairs = [Encoded(list(s), list(c)) for s in seqs for c in continuations]
    batch = {k: v.to(prompt.device) for k, v in collate_train(pairs, pad_id).items()}
    if prompt.dim() == 3:
        prompt = prompt.repeat_interleave(len(continuations), 0)
    if kind == "prefix":
        tok = prefix_label_loss(model, prompt, **batch, reduction="none", packed=False)
    else:
        tok = label_loss(model, prompt, **batch, reduction="none", shared_prefix=False)
    keep = batch["labels"][:, 1:] != -100  # the tokens label_loss scores, in its order
    row = torch.arange(len(pairs), device=tok.device)[:, None].expand_as(keep)[keep]
    logp = torch.zeros(len(pairs), device=tok.device).index_add_(0, row, -tok)
    return logp.view(len(seqs), len(continuations))


def _row_logits(head: ClassifierHead, feats: RowFeatures, b: int) -> Tensor:
    """Row b's label logits [K] through `head`."""
    one = RowFeatures(
        None if feats.last is None else feats.last[b : b + 1],
        {i: x[b : b + 1] for i, x in feats.pooled.items()},
    )
    return head(one)[0]


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

"""The one inference engine: (predictors, texts) -> label probabilities or generations.

Every door calls it: `softprompt eval` / `predict`, the Python API (`SoftPrompt`), the
evaluation inside `train`, `softprompt cv`, and every endpoint of `softprompt serve`. What makes
an answer lives here and nowhere else:

- a `Predictor` (`predictors`) is what a door names: one adapter or an ensemble;
- each member's prompt KV (with the template's head after it) is computed once and cached
  (`KVCache`);
- a batch may mix predictors: every (row, member) runs in one packed pass per prompt length
  (`forward.run`), each after its own prompt, with its own suffix tokens after the text, read
  through its label words or its classification head (`readouts/`);
- a row's label probabilities are the mean of its members' (softmax over the labels, or for a
  multilabel predictor each label's sigmoid), then its predictor's bias.

A row's answer never depends on the rows it is batched with (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters import Adapter
from .calibrate import apply_bias
from .data import common_prefix_length, encode_input, input_token_ids
from .errors import SoftpromptError
from .forward.batch import after_kv, padded
from .forward.kv import slice_kv, stack_kv
from .forward.layout import note_path, packed_fits
from .forward.run import run
from .kvcache import KVCache
from .modeling.load import check_model
from .predictors import (
    ClassifyRow,
    GenerateRow,
    Member,
    Predictor,
    PromptLogprobRow,
    make_predictor,
    need_generation,
    need_labels,
)
from .readouts.generation import (
    Decoding,
    beam_search,
    choose_tokens,
    decode_next,
    merge_decoding,
    prefill,
)
from .readouts.head import ClassifierHead, RowFeatures, head_starts, needs, row_features
from .readouts.words import (
    full_label_scores,
    label_trie,
    padded_prompts,
    token_logprobs,
    trie_scores,
)


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
    kept, and a model that cannot run packed rows (`forward.layout.packed_problem`) cannot take
    them: there every (row, label) pair runs after its own prompt, padded.
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
        """Each label's probability for each text: [N, L] (rows sum to 1; multilabel: each
        label's own sigmoid), the predictor's bias applied unless `calibrated` is False."""
        need_labels(predictor)
        rows = [ClassifyRow(predictor, self.encode(predictor, t)[0]) for t in texts]
        out = torch.empty(len(rows), len(predictor.task.label_names))
        per_batch = max(1, batch_size // len(predictor.members))
        batches = _length_sorted_batches([len(r.ids) for r in rows], per_batch)
        for idx in tqdm(batches, desc="classify", disable=not progress, unit="batch"):
            probs = self.label_probabilities([rows[i] for i in idx], calibrated=calibrated)
            out[idx] = torch.stack(probs)
        return out

    def generate(
        self,
        predictor: Predictor,
        texts: Sequence[str],
        *,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        stop: Sequence[str] = (),
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[str]:
        """Each templated text written on: greedy (num_beams 1) or beam search, up to
        max_new_tokens (default: a generation task's own, else 6, as the PEFT guide), ending at
        the end token or before the first stop string."""
        need_generation(predictor)
        if num_beams < 1:
            raise SoftpromptError(f"--num-beams must be at least 1 (got {num_beams})")
        if max_new_tokens is None:
            max_new_tokens = predictor.task.max_new_tokens or 6
        stops = [x for x in stop if x]
        rows = [
            GenerateRow(predictor, self.encode_generation(predictor, t), max_new_tokens)
            for t in texts
        ]
        if stops and num_beams == 1:
            for r in rows:
                r.on_token = _stop_check(self.tokenizer, stops)
        out = [""] * len(rows)
        per_batch = max(1, batch_size // num_beams)
        batches = _length_sorted_batches([len(r.ids) for r in rows], per_batch)
        for idx in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
            part = [rows[i] for i in idx]
            if num_beams == 1:
                toks = [t for t, _ in self.complete(part)]
            else:
                started = self.begin(part)
                found = beam_search(
                    self.model, started, num_beams, max_new_tokens,
                    self.tokenizer.eos_token_id, length_penalty,
                )  # fmt: skip
                by_row = {id(r): t for r, t in zip(started.rows, found, strict=True)}
                toks = [by_row[id(r)] for r in part]
            for i, t in zip(idx, toks, strict=True):
                out[i] = cut_at_stop(self.tokenizer.decode(t, skip_special_tokens=True), stops).strip()  # fmt: skip
        return out

    def encode_generation(self, predictor: Predictor, text: str) -> list[int]:
        """A text to write on: rendered with the predictor's template, cut to its max_length
        (a classification task's: its label budget). Every door that generates after the
        template uses it (`predict`, `eval`, a generation adapter's completions and chat)."""
        task = predictor.task
        budget = task.max_length - 1 if not task.label_names else predictor.budget
        return input_token_ids(self.tokenizer, task, text, budget)

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
            for i, g in zip(gen, self.complete([rows[i] for i in gen]), strict=True):
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
        batch = after_kv([ids], [0], m.front_length, 0, self.device)
        hidden = run(self.model, batch, kv=kv)
        picked, top_ids, top_logp = token_logprobs(self.model, hidden, batch, 0, row.top)
        return picked.cpu(), top_ids.cpu(), top_logp.cpu()

    # ------------------------------------------------------------------ one batch

    @torch.no_grad()
    def label_probabilities(
        self, rows: Sequence[ClassifyRow], *, calibrated: bool = True
    ) -> list[Tensor]:
        """One batch of classify rows of any predictors: each row's label probabilities [L]
        (mean over its predictor's members, then its bias). A multilabel predictor's are each
        label's sigmoid of its head's logit (they need not sum to 1), averaged over members;
        its thresholds decide later (`predictors.chosen_labels`)."""
        # every (row, member) is a unit; units with prompts of one length share a packed pass
        units = [(b, m) for b, r in enumerate(rows) for m in r.predictor.members]
        groups: dict[int, list[int]] = {}
        for u, (_, m) in enumerate(units):
            groups.setdefault(m.front_length, []).append(u)
        member_probs: list[Tensor | None] = [None] * len(units)
        for part in groups.values():
            scores = self._score([rows[units[u][0]] for u in part], [units[u][1] for u in part])
            for u, s in zip(part, scores, strict=True):
                multi = rows[units[u][0]].predictor.task.multilabel  # each label its own yes/no
                member_probs[u] = (torch.sigmoid if multi else _softmax)(s.float()).cpu()
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
            return self._score_padded(rows, members, list(conts))
        kv, index, bank, h = self._prompts(rows, members)
        tokens, parents, depths, reads = label_trie(list(conts)) if conts else ([], [], [], [])
        scored = [b for b, m in enumerate(members) if m.head is None]
        batch = after_kv(
            [r.ids[h:] for r in rows],
            index,
            kv[0][0].shape[2],
            0 if bank is None else bank.shape[1],
            self.device,
            trie=(tokens, parents, depths),
            scored=[m.head is None for m in members],
        )
        layers, last = needs([m.head for m in members])
        hidden = run(self.model, batch, kv=kv, suffix=bank, layers=layers, stop=not (scored or last))  # fmt: skip
        words = trie_scores(self.model, hidden, batch, reads, scored) if scored else None
        feats = row_features(hidden, batch, [m.head for m in members], self._starts(rows) - h)
        out = []
        for b, (r, m) in enumerate(zip(rows, members, strict=True)):
            if m.head is not None:
                out.append(_row_logits(m.head, feats, b))
            else:
                out.append(words[scored.index(b), [conts[tuple(c)] for c in r.predictor.label_ids]])  # fmt: skip
        return out

    def _starts(self, rows: Sequence[ClassifyRow]) -> Tensor:
        """Where each row's text begins in its ids [B] (after its template's head)."""
        return torch.cat([head_starts([r.ids], r.predictor.template_head) for r in rows])

    def _score_padded(self, rows, members, conts) -> list[Tensor]:
        """`_score` without a KV cache or packing: each row (and, with label words, each
        (row, label) pair) after its own copy of its prompt, padded. For a sharded model, and
        for one that cannot run packed rows (`forward.layout.packed_problem`)."""
        index = {tuple(c): i for i, c in enumerate(conts)}
        out: list = [None] * len(rows)
        for kind, headed in {(m.kind, m.head is not None) for m in members}:
            part = [b for b, m in enumerate(members) if (m.kind, m.head is not None) == (kind, headed)]  # fmt: skip
            prompts = torch.stack([members[b].prompt for b in part])
            seqs = [rows[b].ids for b in part]
            if headed:
                heads = [members[b].head for b in part]
                S = members[part[0]].suffix_tokens if kind == "prompt" else 0
                batch = padded(seqs, S, self.device)
                layers, last = needs(heads)
                hidden = run(self.model, batch, **padded_prompts(self.model, prompts, kind, S), layers=layers, stop=not last)  # fmt: skip
                feats = row_features(hidden, batch, heads, self._starts([rows[b] for b in part]))
                for j, b in enumerate(part):
                    out[b] = _row_logits(members[b].head, feats, j)
                continue
            logp = full_label_scores(self.model, prompts, seqs, conts, kind=kind)
            for j, b in enumerate(part):
                out[b] = logp[j, [index[tuple(c)] for c in rows[b].predictor.label_ids]]
        return out

    def _prompts(self, rows, members: Sequence[Member]):
        """(stacked KV of the distinct members over their prompt and the first h tokens of their
        template head [N, heads, P+h, d], each row's prompt index [B], their suffix vectors
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
        index = [slot[m.uid] for m in members]
        S = max(m.suffix_tokens for m, _ in distinct)
        bank = None
        if S:
            H = distinct[0][0].prompt.shape[1]
            bank = torch.zeros(len(distinct), S, H, device=self.device)
            for i, (m, _) in enumerate(distinct):
                if m.suffix_tokens:
                    bank[i, S - m.suffix_tokens :] = m.suffix
        return stack_kv(kvs), index, bank, h

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def complete(self, rows: Sequence[GenerateRow]) -> list[tuple[list[int], bool]]:
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
        for part in groups.values():
            kv, index, bank, h = self._prompts(part, [r.predictor.members[0] for r in part])
            logits, cache, mask = prefill(self.model, kv, [r.ids[h:] for r in part], index, bank)
            new = Decoding(list(part), cache, mask, logits, [[] for _ in part])
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


def _softmax(scores: Tensor) -> Tensor:
    return torch.softmax(scores, -1)


def _row_logits(head: ClassifierHead, feats: RowFeatures, b: int) -> Tensor:
    """Row b's label logits [K] through `head`."""
    one = RowFeatures(
        None if feats.last is None else feats.last[b : b + 1],
        {i: x[b : b + 1] for i, x in feats.pooled.items()},
    )
    return head(one)[0]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first of the stop strings (all of it when none occurs)."""
    found = [i for i in (text.find(x) for x in stops if x) if i >= 0]
    return text[: min(found)] if found else text


def _stop_check(tokenizer, stops: Sequence[str]):
    """A GenerateRow.on_token that ends the row once its text holds a stop string."""
    ids: list[int] = []

    def on_token(token: int, logits: Tensor) -> bool:
        ids.append(token)
        text = tokenizer.decode(ids[-64:], skip_special_tokens=True)
        return any(x in text for x in stops)

    return on_token


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

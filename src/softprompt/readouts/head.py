"""A trained classification head on the frozen model's hidden states (`--head`).

Two kinds, both a linear layer [K labels, H] on one vector per row:
- "linear": the final layer's (normed) state at the row's last input token, through `score`
  (no bias): PEFT's SEQ_CLS form (transformers' `...ForSequenceClassification`). It starts from
  the LM head's rows of the label words' first tokens, so step 0 answers close to label scoring.
- "pooled": the mean over the row's text positions (from the end of the template's head to the
  end of the input) of the states of each layer of a band of middle layers (`pooled_layers`),
  standardised per layer with the training rows' mean and spread, averaged over the layers,
  through `weight` and `bias`. It starts from a logistic regression on the training rows' features (a linear probe),
  then trains with the prompt. softprompt's own kind: PEFT has no such head.

The features of a batch come from the rows' hidden states in whatever layout they ran (packed
lanes or padded rows): `forward.capture` records the band's layer outputs during the forward
pass and `pool_rows` averages them per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import SoftpromptError
from ..forward.batch import PromptBatch
from ..forward.run import Hidden

POOLED_BAND = (0.4, 0.7)
"""The layers a pooled head reads, as fractions of the model's depth: hidden-state indices
round(0.4 L) .. round(0.7 L) of L layers (12-21 of SmolLM2-135M's 30, 7-13 of Gemma 3 270M's
18). On RAFT complaints a linear probe on mean-pooled states peaks inside it on both models
(layer 16 of 30, 10 of 18); on the project's other tasks the best single layer lies a little
above it (22-30 of 30), 0.02-0.08 over the band when chosen on dev (docs/accuracy.md).
The last layer is never read: it is shaped for the next token and read through the final
norm."""


def pooled_layers(model) -> tuple[int, ...]:
    """The hidden-state indices (1 = the first layer's output) a pooled head averages."""
    from ..modeling.load import decoder_layers

    L = len(decoder_layers(model))
    top = max(L - 1, 1)  # never the last layer: its hidden state is read through the final norm
    lo, hi = (max(1, min(top, round(f * L))) for f in POOLED_BAND)
    return tuple(range(lo, hi + 1))


@dataclass
class RowFeatures:
    """What heads read of a batch, one vector per row (float32): `last` [B, H] the final (normed)
    state at each row's last input token (None where no head needs it), and `pooled` {layer
    index: [B, H]} each needed layer's states averaged over the row's text positions."""

    last: Tensor | None = None
    pooled: dict[int, Tensor] = field(default_factory=dict)


def needs(heads: Sequence[ClassifierHead | None]) -> tuple[tuple[int, ...], bool]:
    """(the layers any of `heads` pools, sorted; whether any reads the final layer)."""
    layers = sorted({i for h in heads if h is not None for i in h.layers})
    return tuple(layers), any(h is not None and h.needs_final for h in heads)


class ClassifierHead(torch.nn.Module):
    """logits [B, K] = weight @ feature (+ bias); see the module docstring for the two kinds.
    Parameters are float32 whatever the base model's dtype (as the prompt is)."""

    def __init__(
        self,
        kind: str,
        weight: Tensor,
        bias: Tensor | None = None,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        layers: Sequence[int] = (),
    ):
        super().__init__()
        if kind not in ("linear", "pooled"):
            raise SoftpromptError(f"unknown head kind {kind!r} (linear or pooled)")
        K, H = weight.shape
        self.kind = kind
        self.layers = tuple(int(i) for i in layers)
        self.weight = torch.nn.Parameter(weight.detach().float().clone())
        self.bias = None
        if kind == "pooled":
            if mean is None or std is None or not self.layers:
                raise SoftpromptError("a pooled head needs its layers, mean and std")
            self.bias = torch.nn.Parameter(
                (bias if bias is not None else torch.zeros(K)).detach().float().clone()
            )
            n = len(self.layers)  # one mean and spread [H] per layer pooled
            self.register_buffer("mean", mean.detach().float().clone().reshape(n, H))
            self.register_buffer("std", std.detach().float().clone().reshape(n, H))

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    @property
    def needs_final(self) -> bool:
        """Whether the head reads the final layer (else the forward can stop after `layers`)."""
        return self.kind == "linear"

    def forward(self, features: RowFeatures) -> Tensor:
        if self.kind == "linear":
            return features.last.float() @ self.weight.T
        return (
            standardise(features.pooled, self.layers, self.mean, self.std) @ self.weight.T
            + self.bias
        )

    def tensors(self) -> dict[str, Tensor]:
        """The head as named tensors (what an adapter file stores, see `adapters`)."""
        out = {"weight": self.weight.detach().float().cpu().contiguous()}
        if self.kind == "pooled":
            out["bias"] = self.bias.detach().float().cpu().contiguous()
            out["mean"] = self.mean.float().cpu().contiguous()
            out["std"] = self.std.float().cpu().contiguous()
        return out

    def describe(self) -> dict:
        """What softprompt.json records of the head (the tensors go to the adapter file)."""
        d = {"kind": self.kind, "num_labels": self.num_labels, "width": self.width}
        if self.layers:
            d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_tensors(cls, info: dict, tensors: dict[str, Tensor]) -> ClassifierHead:
        return cls(
            info["kind"],
            tensors["weight"],
            tensors.get("bias"),
            tensors.get("mean"),
            tensors.get("std"),
            info.get("layers", ()),
        )

    def copy(self) -> ClassifierHead:
        """A detached copy (what a checkpoint or an adapter keeps of a head in training)."""
        t = self.tensors()
        return ClassifierHead.from_tensors(self.describe(), t).to(self.weight.device)


def standardise(
    pooled: dict[int, Tensor], layers: Sequence[int], mean: Tensor, std: Tensor
) -> Tensor:
    """The pooled head's feature [B, H]: each layer's pooled states {index: [B, H]} standardised
    with its mean and spread ([len(layers), H] each), averaged over the layers. Per layer first:
    layers' scales differ by orders of magnitude (by ~50x in Gemma 3 270M's band), and a plain
    average would read the largest alone."""
    x = torch.stack([pooled[i].float() for i in layers])  # [n, B, H]
    return ((x - mean[:, None]) / std[:, None]).mean(0)


def label_word_head(model, tokenizer, label_names: Sequence[str]) -> ClassifierHead:
    """A "linear" head whose rows are the LM head's rows for each label's first token (the mean
    of its tokens' rows where two labels share a first token): at step 0 it ranks labels as
    their first tokens' logits do."""
    from ..data import label_token_ids

    out = model.get_output_embeddings()
    W = out.weight.detach().float()
    ids = [label_token_ids(tokenizer, n)[:-1] or label_token_ids(tokenizer, n) for n in label_names]
    firsts = [i[0] for i in ids]
    rows = []
    for i in ids:
        if firsts.count(i[0]) > 1:
            rows.append(W[torch.tensor(i, device=W.device)].mean(0))
        else:
            rows.append(W[i[0]])
    # (an LM head's bias, which few models have, is left out: PEFT's `score` has none)
    return ClassifierHead("linear", torch.stack(rows).cpu())


def fit_pooled_head(
    pooled: dict[int, Tensor],
    classes: Sequence[int],
    num_labels: int,
    layers: Sequence[int],
    *,
    weights: Sequence[float] | None = None,
    C: float = 0.1,
) -> ClassifierHead:
    """A "pooled" head started as a linear probe: the training rows' pooled states {index:
    [N, H]} standardised per layer by their own mean and spread (`standardise`), then an
    L2-regularised logistic regression (scikit-learn, `C`; rows weighed by `weights`, e.g.
    --balance). Deterministic."""
    from sklearn.linear_model import LogisticRegression  # lazily: slow to import

    z, mean, std = _probe_features(pooled, layers)
    y = list(classes)
    W = torch.zeros(num_labels, z.shape[1])
    b = torch.zeros(num_labels)
    present = sorted(set(y))
    if len(present) >= 2:
        clf = LogisticRegression(C=C, max_iter=5000)
        clf.fit(z, y, sample_weight=None if weights is None else list(weights))
        coef = torch.tensor(clf.coef_, dtype=torch.float32)
        icpt = torch.tensor(clf.intercept_, dtype=torch.float32)
        if len(present) == 2:  # one row of log-odds: split it symmetrically over the two labels
            coef = torch.stack([-coef[0] / 2, coef[0] / 2])
            icpt = torch.stack([-icpt[0] / 2, icpt[0] / 2])
        for j, c in enumerate(present):
            W[c], b[c] = coef[j], icpt[j]
    return ClassifierHead("pooled", W, b, mean, std, layers)


def _probe_features(pooled: dict[int, Tensor], layers: Sequence[int]):
    """(the rows' standardised features [N, H] as numpy, each layer's mean and spread [n, H])."""
    x = torch.stack([pooled[i].detach().float().cpu() for i in layers])  # [n, N, H]
    mean = x.mean(1)
    std = x.std(1, unbiased=False).clamp_min(1e-6) + 1e-6
    z = standardise({i: x[j] for j, i in enumerate(layers)}, layers, mean, std).numpy()
    return z, mean, std


def fit_pooled_multilabel_head(
    pooled: dict[int, Tensor],
    targets: Sequence[Sequence[int]],
    num_labels: int,
    layers: Sequence[int],
    *,
    balance: bool = False,
    C: float = 0.1,
) -> ClassifierHead:
    """A "pooled" head for `--task multilabel` started as one binary probe per label: for
    label k, an L2-regularised logistic regression (scikit-learn, `C`) of "row has k" on the
    standardised features (`standardise`), its weights and intercept as row k and bias k. The
    head's per-label sigmoid is then each probe's probability, so step 0 answers as K
    independent probes do (one multinomial probe would tie the labels together through a
    softmax the task does not have). With `balance` each probe weighs its classes "balanced"
    (positives by negatives / positives, as --balance's pos_weight does). A label that every
    row has, or none does, gets no weights and the log-odds of its rate (clamped) as its bias.
    Deterministic."""
    from sklearn.linear_model import LogisticRegression  # lazily: slow to import

    z, mean, std = _probe_features(pooled, layers)
    N = z.shape[0]
    W = torch.zeros(num_labels, z.shape[1])
    b = torch.zeros(num_labels)
    for k in range(num_labels):
        y = [int(k in t) for t in targets]
        pos = sum(y)
        if 0 < pos < N:
            clf = LogisticRegression(C=C, max_iter=5000, class_weight="balanced" if balance else None)  # fmt: skip
            clf.fit(z, y)
            W[k] = torch.tensor(clf.coef_[0], dtype=torch.float32)
            b[k] = float(clf.intercept_[0])
        else:
            rate = min(max(pos / max(N, 1), 0.01), 0.99)
            b[k] = float(torch.logit(torch.tensor(rate)))
    return ClassifierHead("pooled", W, b, mean, std, layers)


# --------------------------------------------------------------------------- the features


def pool_rows(
    states: dict[int, Tensor], row_of: Tensor, index: Tensor, start: Tensor, rows: int
) -> dict[int, Tensor]:
    """Each layer's states {index: [lanes, W, H]} averaged per row: {index: [rows, H]} (float32),
    in any layout: per position [lanes, W] its row (`row_of`, -1: none) and its place in the row
    (`index`, -1: not an input token); a row pools its positions with index >= start[row]."""
    r = row_of.clamp(min=0)
    sel = (row_of >= 0) & (index >= 0) & (index >= start.to(index.device)[r])
    who = row_of[sel]
    counts = torch.bincount(who, minlength=rows).clamp_min(1)[:, None].float()
    out = {}
    for i, x in states.items():
        x = x[sel].float()
        out[i] = x.new_zeros(rows, x.shape[-1]).index_add_(0, who, x) / counts
    return out


def head_starts(seqs: Sequence[Sequence[int]], head_ids: Sequence[int]) -> Tensor:
    """Where each row's pooled part begins [B]: after the template's head (`Task.head`) as it
    tokenised in that row (a row whose text merged with the head's last token starts earlier),
    leaving at least its last token."""
    from ..data import common_prefix_length

    return torch.tensor([common_prefix_length([s], head_ids, keep=1) for s in seqs])


def row_features(
    hidden: Hidden, batch: PromptBatch, heads: Sequence[ClassifierHead | None], starts: Tensor
) -> RowFeatures:
    """What `heads` read of the batch's rows (`needs`): the final state at each row's last input
    position, each needed layer's states pooled over each row's positions from starts[b] (in
    the row's tokens as the batch holds them)."""
    layers, last = needs(heads)
    B = len(batch.places)
    out = RowFeatures()
    if layers:
        out.pooled = pool_rows(hidden.layers, batch.row, batch.index, starts, B)
    if last:
        W = batch.ids.shape[1]
        at = [lane * W + off + n - 1 for (lane, off), n in zip(batch.places, batch.lengths, strict=True)]  # fmt: skip
        flat = hidden.final.reshape(-1, hidden.final.shape[-1])
        out.last = flat[torch.tensor(at, device=flat.device)].float()
    return out


def rows_features(model, prompt, rows, heads, head_ids, kind: str, packed: bool) -> RowFeatures:
    """What `heads` read of training rows' inputs after `prompt`: one forward (`forward_rows`),
    the pooled part of each row starting after its template's head (`head_ids`)."""
    from .words import forward_rows

    starts = head_starts([r.input_ids for r in rows], head_ids)
    layers, last = needs(heads)
    hidden, batch = forward_rows(
        model, prompt, rows, kind=kind, packed=packed, labels=False, starts=starts.tolist(),
        layers=layers, stop=not last,
    )  # fmt: skip
    return row_features(hidden, batch, heads, starts - batch.skipped)

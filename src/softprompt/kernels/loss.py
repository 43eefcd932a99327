"""The training loss over label tokens, for a soft prompt (`label_loss`) or a deep prompt
(`prefix_label_loss`): rows packed into lanes after the prompt, or padded (the reference layout)
where packing cannot run. Equal to `reference.reference_loss` up to float rounding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SoftpromptError
from .capture import run_capturing
from .kv import _cache_from, prefix_to_kv, run_after_prefix
from .packed import lane_width, pack_rows, packed_fits, packed_mask, run_packed
from .reference import _concat_inputs, embed_ids, prefix_length


def label_loss(
    model,
    prompt: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    reduction: str = "mean",
    shared_prefix: bool = True,
    share_head: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over label tokens (labels [B, T], -100 elsewhere): their mean, or their sum
    with reduction="sum" (a data-parallel shard divides the sum by the global token count), or
    with reduction="none" (and no weights) each label token's, in row-major order.
    `weights` [B] weighs each row's tokens (the mean is then sum(w * loss) / sum(w)).

    Inputs are right-padded [B, T]. The LM head is applied only where a label token is
    predicted, and the loss equals `reference_loss` (and PEFT's loss) up to float rounding.

    shared_prefix=True: the prompt [P, H] runs once per lane, at the start of the lane, and the
    rows packed after it in the same forward pass all see it (one lane for a batch of 8 tweets:
    the weights are read once per step, not once for a small prompt pass and again for the rows).
    With `share_head` the leading tokens every row has in common (the template's head, e.g.
    `Tweet text :`) run once with the prompt instead of once per row, and the last column
    (only ever a target) is not run at all.
    shared_prefix=False: prompt and tokens run concatenated through the model with no KV cache,
    which is what gradient checkpointing needs (a checkpointed layer runs without a cache).
    """
    if shared_prefix and not packed_fits(model, prompt.shape[-2] + input_ids.shape[1]):
        shared_prefix = False
    if shared_prefix:
        h = _shared_head_length(input_ids, labels) if share_head else 0
        if prompt.dim() != 2:
            raise SoftpromptError(
                f"label_loss(shared_prefix=True) takes one prompt [P, H], got shape "
                f"{tuple(prompt.shape)}: for one prompt per row pass shared_prefix=False"
            )
        return _shared_prefix_loss(
            model, prompt, input_ids, attention_mask, labels, h, weights, reduction
        )
    embeds, mask = _concat_inputs(model, prompt, input_ids, attention_mask)
    hidden = model.get_decoder()(
        inputs_embeds=embeds, attention_mask=mask, use_cache=False
    ).last_hidden_state[:, embeds.shape[1] - input_ids.shape[1] :]  # after the prompt
    return _padded_loss(model, hidden, labels, weights, reduction)


def _shared_head_length(input_ids: Tensor, labels: Tensor) -> int:
    """How many leading tokens all rows [B, T] have in common (the template's head) before the
    token that predicts the first label token (labels [B, T]): that token must stay in the rows,
    its output is used."""
    first_label = int((labels != -100).long().argmax(-1).min())
    same = (input_ids == input_ids[:1]).all(0)[: max(first_label - 1, 0)]
    return int(same.long().cumprod(0).sum())


def _shared_prefix_loss(
    model,
    prompt: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    h: int,
    weights: Tensor | None,
    reduction: str,
) -> Tensor:
    """`label_loss` with shared_prefix=True: the prompt [P, H] (its front vectors) and the first
    `h` tokens of the rows [B, T] run once at the start of each lane, and the rest of the rows,
    packed after them, all see them."""
    hidden, _, target, row_of, index = shared_prefix_hidden(
        model, prompt, input_ids, attention_mask, labels, h
    )
    return _packed_loss(model, hidden, target, row_of, index, weights, reduction)


def shared_prefix_hidden(
    model,
    prompt: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor | None,
    h: int,
    *,
    keep_last: bool = False,
    layers: Sequence[int] = (),
    stop: bool = False,
) -> tuple[Tensor | None, dict[int, Tensor], Tensor, Tensor, Tensor]:
    """The packed forward of `label_loss(shared_prefix=True)`: the prompt [P, H] (its front
    vectors) and the first `h` tokens of the rows [B, T] run once at the start of each lane, the
    rest of the rows packed after them (`_pack_label_rows`; `keep_last` keeps each row's last
    token, which a classification head reads). Returns (final hidden states of the packed
    positions [lanes, W, H] (None when `stop` ended the pass after `layers`), the outputs of
    `layers` at those positions {index: [lanes, W, H]}, target, row_of, index [lanes, W])."""
    dtype = model.get_input_embeddings().weight.dtype
    P = prefix_length(prompt, input_ids)  # the rest are suffix tokens, inside the rows
    head = embed_ids(model, input_ids[0, :h], prompt)
    prefix = torch.cat([prompt[:P].to(dtype), head])  # [Q, H]
    Q = prefix.shape[0]
    ids, target, row_of, index = _pack_label_rows(
        input_ids, attention_mask, labels, h, Q, keep_last
    )
    lanes, width = ids.shape
    device = input_ids.device
    # The prefix sees itself causally; a row sees the whole prefix and its own earlier
    # tokens (`packed_mask` with the prefix as every position's past).
    rows_mask = packed_mask(
        row_of, index, torch.ones((lanes, width, Q), dtype=torch.bool, device=device), dtype
    )
    head_mask = torch.full((Q, Q + width), torch.finfo(dtype).min, dtype=dtype, device=device)
    head_mask[:, :Q].triu_(1)
    hidden, states = run_capturing(
        lambda: run_packed(
            model,
            {
                "inputs_embeds": torch.cat(
                    [prefix.expand(lanes, -1, -1), embed_ids(model, ids, prompt)], 1
                )
            },
            torch.cat([head_mask.expand(lanes, 1, -1, -1), rows_mask], 2),
            torch.cat(
                [torch.arange(Q, device=device).expand(lanes, -1), index.clamp(min=0) + Q], 1
            ),
        ),
        model,
        layers,
        stop=stop,
    )
    states = {i: x[:, Q:] for i, x in states.items()}
    return (None if hidden is None else hidden[:, Q:]), states, target, row_of, index


def _pack_label_rows(
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor | None,
    h: int,
    prefix: int,
    keep_last: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded training rows [B, T] packed into lanes (`pack_rows`), each row from its
    token h (the first h are shared and run elsewhere) up to its last but one (the last is only
    ever a target), or to its last with `keep_last` (rows a classification head reads, whose
    `labels` may be None); `prefix` positions come before each lane (for the lane width's cost).
    Returns (ids, target, row_of, index), each [lanes, width]: the token, the label it predicts
    (-100: none), its row (-1: unused) and its place among its row's packed tokens."""
    if labels is None:
        labels = torch.full_like(input_ids, -100)
    drop = 0 if keep_last else 1
    lengths = [max(int(n) - drop - h, 0) for n in attention_mask.sum(-1).tolist()]
    width = lane_width(lengths, prefix)
    lanes, places = pack_rows(lengths, width)
    device = input_ids.device
    ids = input_ids.new_full((lanes, width), max(int(input_ids[0, 0]), 0))
    target = labels.new_full((lanes, width), -100)
    row_of = torch.full((lanes, width), -1, dtype=torch.long, device=device)
    index = torch.full((lanes, width), -1, dtype=torch.long, device=device)
    for b, (lane, off) in enumerate(places):
        n = lengths[b]
        ids[lane, off : off + n] = input_ids[b, h : h + n]
        target[lane, off : off + n] = labels[b, h + 1 : h + 1 + n] if drop else -100
        row_of[lane, off : off + n] = b
        index[lane, off : off + n] = torch.arange(n, device=device)
    return ids, target, row_of, index


def _packed_loss(model, hidden, target, row_of, index, weights, reduction) -> Tensor:
    """The loss of packed lanes' hidden states [lanes, width, H]: the LM head only where a label
    is predicted; token losses put back in row-major order, as the padded layout gives them."""
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[keep])
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    rows = row_of[keep]
    order = torch.argsort(rows * (int(index.max()) + 2) + index[keep])
    return _reduce(tok[order], rows[order], weights, reduction)


def _padded_loss(model, hidden, labels, weights, reduction) -> Tensor:
    """The loss of right-padded rows' hidden states [B, T, H] aligned with `labels` [B, T]."""
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    return _reduce(tok, keep.nonzero()[:, 0], weights, reduction)


def _reduce(tok: Tensor, rows: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    """Label tokens' losses `tok` (of rows `rows`, row-major) reduced as `label_loss` says."""
    if weights is None:
        if reduction == "none":
            return tok
        return tok.sum() if reduction == "sum" else tok.mean()
    w = weights.to(tok.device, torch.float32)[rows]
    tok = tok * w
    return tok.sum() if reduction == "sum" else tok.sum() / w.sum()


def prefix_label_loss(
    model,
    prefix: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    reduction: str = "mean",
    weights: Tensor | None = None,
    packed: bool = True,
) -> Tensor:
    """`label_loss` for a deep prompt `prefix` [P, layers*2*heads*d] (`prefix_to_kv`): the rows
    run after its keys/values in every layer, at positions P.. (as PEFT's prefix tuning runs
    them). The prefix needs no forward pass of its own: packed, the rows share lanes after it
    (each seeing the whole prefix and its own earlier tokens); with packed=False (or a model that
    cannot run packed rows) each right-padded row runs after its own copy, with a 2D mask."""
    kv = prefix_to_kv(model, prefix)
    P = kv[0][0].shape[2]
    if packed and not packed_fits(model, P + input_ids.shape[1]):
        packed = False
    if not packed:
        hidden, _ = run_after_prefix(model, kv, input_ids, attention_mask)
        return _padded_loss(model, hidden, labels, weights, reduction)
    hidden, _, target, row_of, index = prefix_packed_hidden(
        model, kv, input_ids, attention_mask, labels
    )
    return _packed_loss(model, hidden, target, row_of, index, weights, reduction)


def prefix_packed_hidden(
    model,
    kv,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor | None,
    *,
    keep_last: bool = False,
    layers: Sequence[int] = (),
    stop: bool = False,
) -> tuple[Tensor | None, dict[int, Tensor], Tensor, Tensor, Tensor]:
    """The packed forward of `prefix_label_loss`: rows [B, T] packed into lanes after a deep
    prompt's keys/values `kv` (each lane's past); returns what `shared_prefix_hidden` returns."""
    P = kv[0][0].shape[2]
    ids, target, row_of, index = _pack_label_rows(
        input_ids, attention_mask, labels, 0, 0, keep_last
    )
    lanes, width = ids.shape
    dtype = model.get_input_embeddings().weight.dtype
    past = torch.ones((lanes, width, P), dtype=torch.bool, device=ids.device)
    hidden, states = run_capturing(
        lambda: run_packed(
            model,
            {"input_ids": ids},
            packed_mask(row_of, index, past, dtype),
            index.clamp(min=0) + P,
            _cache_from(kv, lanes),
        ),
        model,
        layers,
        stop=stop,
    )
    return hidden, states, target, row_of, index

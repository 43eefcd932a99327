"""ONE description of rows to run after their prompts (`PromptBatch`), and the three ways rows
are laid out in it:

- `after_front`: one soft prompt (and the template tokens every row starts with) runs at the
  start of every lane, the rows packed after it (training a prompt: the prompt gets gradients
  through every lane);
- `after_kv`: each lane's past is the cached keys/values of the prompts its rows use, one or
  several per lane, the rows packed after them, each with its label trie if it is scored
  (inference; training a deep prompt, whose keys/values are the parameters);
- `padded`: one row per lane after its own prompt, a 2D padding mask (models that cannot take
  a 4D mask, sharded or checkpointed training, generation's prefill).

Rows are token lists; a suffix placeholder -k (`data.suffix_placeholders`) becomes a slot that
takes the row's prompt's k-th suffix vector from the end (`slot`), so no tensor ever carries a
negative id and nothing is read back from the device to find them. Readouts (`readouts/`) find
a row's positions through `row` and `index`, whatever the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import lane_width, pack_rows


@dataclass
class PromptBatch:
    """Rows laid out in lanes [L, W] for one forward pass (see the module docstring)."""

    ids: Tensor
    """[L, W] token ids (anything where `slot` or nothing goes)."""
    slot: Tensor
    """[L, W] the suffix vector that goes there (index into the suffix bank's width), -1: the
    token."""
    prompt: Tensor
    """[L, W] whose prompt each position belongs to (the suffix bank's and the KV's index)."""
    row: Tensor
    """[L, W] the position's row, -1: unused."""
    index: Tensor
    """[L, W] its place among its row's tokens in the batch, -1: a trie node or unused."""
    node: Tensor
    """[L, W] its label-trie node, -1: none."""
    pos: Tensor
    """[L, W] its position id."""
    target: Tensor | None = None
    """[L, W] the token it predicts in training (-100: none)."""
    front: int = 0
    """`after_front`: positions of prompt (and shared tokens) at the start of every lane."""
    skipped: int = 0
    """`after_front`: each row's leading tokens run in front instead (`index` counts after them)."""
    lane_prompts: Tensor | None = None
    """`after_kv`: [L, M] the prompts whose keys/values each lane sees, laid one after another."""
    past_slot: Tensor | None = None
    """`after_kv`: [L, W] which of its lane's M prompts a position sees."""
    ancestors: Tensor | None = None
    """[K, K] trie node k's ancestors, itself included."""
    mask: Tensor | None = None
    """`padded`: [L, W] which positions are real (a 2D padding mask)."""
    has_slots: bool = False
    """Whether any position takes a suffix vector (else the model embeds the ids itself)."""
    places: list[tuple[int, int]] | None = None
    """Each row's (lane, offset) (host side, for the readouts)."""
    lengths: list[int] | None = None
    """Each row's tokens in the batch: its input as run, without trie nodes (host side)."""

    @property
    def padded(self) -> bool:
        return self.mask is not None


def _slots(tokens: Sequence[int], width: int) -> tuple[list[int], list[int]]:
    """(ids with placeholders as 0, slot per token): placeholder -k takes suffix vector width-k."""
    return [max(t, 0) for t in tokens], [width + t if t < 0 else -1 for t in tokens]


def after_front(
    rows: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]] | None,
    shared: int,
    front: int,
    suffix_width: int,
    device,
) -> PromptBatch:
    """Training rows (token lists, each its input then its label tokens, `targets` each row's
    label-token targets aligned with it: -100 on the input) packed into lanes after `front`
    positions (the prompt and the `shared` leading tokens every row has, run at each lane's
    start). A row runs from its token `shared` to its last but one, which predicts its last
    (with `targets` None, to its last: a classification head reads it). Lane width: the
    cheapest for these lengths with `front` paid per lane (`lane_width`)."""
    drop = 1 if targets is not None else 0
    lengths = [max(len(r) - drop - shared, 0) for r in rows]
    width = lane_width(lengths, front)
    lanes, places = pack_rows(lengths, width)
    fill = max(rows[0][0], 0) if rows and rows[0] else 0
    ids = torch.full((lanes, width), fill, dtype=torch.long)
    slot = torch.full((lanes, width), -1, dtype=torch.long)
    target = torch.full((lanes, width), -100, dtype=torch.long)
    row = torch.full((lanes, width), -1, dtype=torch.long)
    index = torch.full((lanes, width), -1, dtype=torch.long)
    for b, (lane, off) in enumerate(places):
        n = lengths[b]
        tok, sl = _slots(rows[b][shared : shared + n], suffix_width)
        ids[lane, off : off + n] = torch.tensor(tok, dtype=torch.long)
        slot[lane, off : off + n] = torch.tensor(sl, dtype=torch.long)
        if targets is not None:
            target[lane, off : off + n] = torch.tensor(targets[b][shared + 1 : shared + 1 + n])
        row[lane, off : off + n] = b
        index[lane, off : off + n] = torch.arange(n)
    return PromptBatch(
        ids=ids.to(device),
        slot=slot.to(device),
        prompt=torch.zeros_like(ids).to(device),
        row=row.to(device),
        index=index.to(device),
        node=torch.full_like(ids, -1).to(device),
        pos=(index.clamp(min=0) + front).to(device),
        target=target.to(device) if targets is not None else None,
        front=front,
        skipped=shared,
        has_slots=bool((slot >= 0).any()),
        places=places,
        lengths=lengths,
    )


def after_kv(
    rows: Sequence[Sequence[int]],
    prompt_of: Sequence[int],
    past: int,
    suffix_width: int,
    device,
    *,
    trie: tuple[list[int], list[int], list[int]] | None = None,
    scored: Sequence[bool] | None = None,
    targets: Sequence[Sequence[int]] | None = None,
    one_past: bool = False,
) -> PromptBatch:
    """Rows (token lists) packed into lanes after cached keys/values `past` positions long: row
    b sees those of prompt prompt_of[b] (a lane holds the prompts of its rows, one after another).
    A `scored` row has the label trie (`trie`: its nodes' tokens, parents, depths) after its
    input, each node seeing the input and its ancestors. With `targets` the rows are training
    rows after a deep prompt (as in `after_front`: each predicts the next token, its last one
    not run). `one_past`: every lane sees the same single prompt (its keys/values broadcast, not
    gathered per lane)."""
    B = len(rows)
    tokens, parents, depths = trie if trie is not None else ([], [], [])
    K = len(tokens)
    want = [True] * B if scored is None else [bool(s) for s in scored]
    drop = 1 if targets is not None else 0
    n_in = [max(len(r) - drop, 0) for r in rows]
    span = [n + (K if want[b] else 0) for b, n in enumerate(n_in)]
    lanes, places = pack_rows(span, lane_width(span))
    slots: list[list[int]] = [[] for _ in range(lanes)]
    for b, (lane, _) in enumerate(places):
        if prompt_of[b] not in slots[lane]:
            slots[lane].append(prompt_of[b])
    M = max(len(x) for x in slots)
    W = max(off + n for (_, off), n in zip(places, span, strict=True))
    if targets is not None:  # training a deep prompt: lanes as wide as `lane_width` chose
        W = max(W, lane_width(span))
    fill = max(rows[0][0], 0) if targets is not None and rows and rows[0] else 0
    ids = torch.full((lanes, W), fill, dtype=torch.long)
    slot = torch.full((lanes, W), -1, dtype=torch.long)
    target = torch.full((lanes, W), -100, dtype=torch.long)
    row = torch.full((lanes, W), -1, dtype=torch.long)
    index = torch.full_like(row, -1)
    node = torch.full_like(row, -1)
    pos = torch.zeros_like(row)
    past_slot = torch.zeros_like(row)
    prompt = torch.zeros_like(row)
    trie_ids = torch.tensor(tokens, dtype=torch.long)
    trie_pos = torch.tensor(depths, dtype=torch.long)
    for b, (lane, off) in enumerate(places):
        n, k = n_in[b], span[b] - n_in[b]
        tok, sl = _slots(rows[b][:n], suffix_width)
        ids[lane, off : off + n] = torch.tensor(tok, dtype=torch.long)
        slot[lane, off : off + n] = torch.tensor(sl, dtype=torch.long)
        ids[lane, off + n : off + n + k] = trie_ids[:k]
        if targets is not None:
            target[lane, off : off + n] = torch.tensor(targets[b][1 : 1 + n])
        row[lane, off : off + n + k] = b
        index[lane, off : off + n] = torch.arange(n)
        node[lane, off + n : off + n + k] = torch.arange(k)
        pos[lane, off : off + n] = torch.arange(past, past + n)
        pos[lane, off + n : off + n + k] = past + n - 1 + trie_pos[:k]
        past_slot[lane, off : off + n + k] = slots[lane].index(prompt_of[b])
        prompt[lane, off : off + n + k] = prompt_of[b]
    return PromptBatch(
        ids=ids.to(device),
        slot=slot.to(device),
        prompt=prompt.to(device),
        row=row.to(device),
        index=index.to(device),
        node=node.to(device),
        pos=pos.to(device),
        target=target.to(device) if targets is not None else None,
        lane_prompts=None
        if one_past
        else torch.tensor([x + [x[0]] * (M - len(x)) for x in slots]).to(device),
        past_slot=past_slot.to(device),
        ancestors=_ancestors(parents).to(device) if K else None,
        has_slots=bool((slot >= 0).any()),
        places=places,
        lengths=n_in,
    )


def padded(
    rows: Sequence[Sequence[int]],
    suffix_width: int,
    device,
    *,
    prompt_of: Sequence[int] | None = None,
    targets: Sequence[Sequence[int]] | None = None,
    left: bool = False,
    pad_id: int = 0,
) -> PromptBatch:
    """One row per lane, padded (right, or `left` for generation) to the longest, with a 2D
    mask; row b after prompt prompt_of[b] (default: row b's own, or the one prompt). With
    `targets` each position predicts the row's next token (training)."""
    B = len(rows)
    T = max(len(r) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    slot = torch.full((B, T), -1, dtype=torch.long)
    target = torch.full((B, T), -100, dtype=torch.long)
    index = torch.full((B, T), -1, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        at = slice(T - n, T) if left else slice(0, n)
        tok, sl = _slots(r, suffix_width)
        ids[b, at] = torch.tensor(tok, dtype=torch.long)
        slot[b, at] = torch.tensor(sl, dtype=torch.long)
        index[b, at] = torch.arange(n)
        mask[b, at] = 1
        if targets is not None and n > 1:
            target[b, : n - 1] = torch.tensor(targets[b][1:n])
    row = torch.where(mask.bool(), torch.arange(B)[:, None], -1)
    which = torch.arange(B) if prompt_of is None else torch.tensor(list(prompt_of))
    return PromptBatch(
        ids=ids.to(device),
        slot=slot.to(device),
        prompt=which[:, None].expand(B, T).to(device),
        row=row.to(device),
        index=index.to(device),
        node=torch.full_like(ids, -1).to(device),
        pos=(mask.cumsum(-1) - 1).clamp(min=0).to(device),
        target=target.to(device) if targets is not None else None,
        mask=mask.to(device),
        has_slots=bool((slot >= 0).any()),
        places=[(b, T - len(r) if left else 0) for b, r in enumerate(rows)],
        lengths=[len(r) for r in rows],
    )


def _ancestors(parents: Sequence[int]) -> Tensor:
    """[K, K] bool: trie node k's ancestors (`parents`, -1 ends), itself included."""
    K = len(parents)
    anc = torch.zeros(K, K, dtype=torch.bool)
    for k in range(K):
        a = k
        while a >= 0:
            anc[k, a] = True
            a = parents[a]
    return anc

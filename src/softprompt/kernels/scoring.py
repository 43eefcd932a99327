"""Label scoring: every label's tokens (a trie, shared prefixes once) run after each row, in one
packed pass after the prompt's KV (`score_continuations`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..readouts.head import RowFeatures, pool_rows
from .capture import run_capturing
from .kv import KV, _cache_from
from .packed import _require_packed, pack_rows, packed_mask, run_packed
from .reference import _ids_or_embeds


def _continuation_trie(
    continuations: Sequence[Sequence[int]],
) -> tuple[list[int], list[int], list[int], list[list[tuple[int, int]]]]:
    """The continuations' proper prefixes as a trie, for scoring them all in one pass.

    Returns (tokens, parents, depths, reads): trie node k (a distinct prefix c[:j], 1 <= j <
    len(c)) holds token c[j-1], its parent node (-1 for the input's last position) and its depth
    j; reads[i] lists (node, token) for continuation i: the token scored at that node's output
    (node -1 = the input's last position). "complaint" + eos and "no complaint" + eos need 3
    nodes, not 2 rows of 2 columns after a copy of the row's cache.
    """
    nodes: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    reads: list[list[tuple[int, int]]] = []
    for c in continuations:
        c = [int(t) for t in c]
        if not c:
            raise ValueError("a continuation has no tokens")
        for j in range(1, len(c)):
            key = tuple(c[:j])
            if key not in nodes:
                nodes[key] = len(tokens)
                tokens.append(c[j - 1])
                parents.append(nodes[key[:-1]] if j > 1 else -1)
                depths.append(j)
        reads.append([(nodes[tuple(c[:j])] if j else -1, c[j]) for j in range(len(c))])
    return tokens, parents, depths, reads


def score_continuations(
    model,
    kv: KV,
    input_ids: Tensor,
    attention_mask: Tensor,
    continuations: Sequence[Sequence[int]],
    rows: Tensor | None = None,
    prompts: Tensor | None = None,
) -> Tensor:
    """Log-probability of each continuation after each row: [B, L] (`score_rows` for all rows)."""
    return score_rows(model, kv, input_ids, attention_mask, continuations, rows, prompts)[0]


def score_rows(
    model,
    kv: KV,
    input_ids: Tensor,
    attention_mask: Tensor,
    continuations: Sequence[Sequence[int]],
    rows: Tensor | None = None,
    prompts: Tensor | None = None,
    *,
    trie: Sequence[bool] | None = None,
    layers: Sequence[int] = (),
    starts: Tensor | None = None,
    last: bool = False,
) -> tuple[Tensor, RowFeatures]:
    """Log-probability of each continuation after each row: [B, L], and what classification
    heads read of the rows (RowFeatures: with `last`, the final state at each row's last input
    token; the states of `layers` averaged over each row's positions from starts[b]).

    input_ids [B, T] with attention_mask (any padding: only real tokens run). One forward pass
    per batch: the continuations' prefixes (a trie, shared tokens once) run after each row's
    input in the same pass, each trie token attending to the prompt, the row's real input and
    its own ancestors only; rows are packed into lanes, not padded (`pack_rows`, `packed_mask`;
    exact: each token sees what it would see run alone after its prompt). `rows` [B] picks each
    row's prompt out of kv's N. The LM head runs only at each row's last input token and trie.
    `prompts` (the whole prompts, [P+S, H] or [N, P+S, H]) fill the rows' suffix placeholders.
    A model that cannot run packed rows (`packed_problem`) is refused: use `engine.full_label_scores`.
    `trie` [B] says which rows are scored (the others, read by a head, run without the trie and
    score 0); when none is and no head reads the final layer, the pass ends after `layers`.
    """
    _require_packed(model)
    B = input_ids.shape[0]
    device = input_ids.device
    want = [True] * B if trie is None else [bool(t) for t in trie]
    scored = [b for b in range(B) if want[b]]
    tokens, parents, depths, reads = (
        _continuation_trie(continuations) if scored else ([], [], [], [])
    )
    K = len(tokens)
    P = kv[0][0].shape[2]
    prompt_of = [0] * B if rows is None else [int(r) for r in rows.tolist()]
    real = attention_mask.bool()
    n_in = real.sum(-1).tolist()
    # Each row (its real input, then the trie) packed into lanes; a lane's cached past holds
    # the prompts of its rows, each row seeing its own (one pass, little padding, large matrix
    # products, several adapters per lane).
    span = [n + (K if want[b] else 0) for b, n in enumerate(n_in)]
    lanes, places = pack_rows(span)
    slots: list[list[int]] = [[] for _ in range(lanes)]
    for b, (lane, _) in enumerate(places):
        if prompt_of[b] not in slots[lane]:
            slots[lane].append(prompt_of[b])
    M = max(len(x) for x in slots)
    gidx = torch.tensor([x + [x[0]] * (M - len(x)) for x in slots], device=device)
    width = max(off + n for (_, off), n in zip(places, span, strict=True))
    ids = input_ids.new_zeros(lanes, width)
    seg = torch.full((lanes, width), -1, dtype=torch.long, device=device)
    index = torch.full_like(seg, -1)
    node = torch.full_like(seg, -1)
    pos = torch.zeros_like(seg)
    slot = torch.zeros_like(seg)
    which = torch.zeros_like(seg)  # each position's prompt (for suffix placeholders)
    at = torch.zeros(B, 1 + K, dtype=torch.long, device=device)  # flat places the LM head reads
    trie_ids = torch.tensor(tokens, dtype=input_ids.dtype, device=device)
    trie_pos = torch.tensor(depths, dtype=torch.long, device=device)
    for b, (lane, off) in enumerate(places):
        n, k = n_in[b], span[b] - n_in[b]  # k: K trie tokens, or none
        ids[lane, off : off + n] = input_ids[b][real[b]]
        ids[lane, off + n : off + n + k] = trie_ids[:k]
        seg[lane, off : off + n + k] = b
        index[lane, off : off + n] = torch.arange(n, device=device)
        node[lane, off + n : off + n + k] = torch.arange(k, device=device)
        pos[lane, off : off + n] = torch.arange(P, P + n, device=device)
        pos[lane, off + n : off + n + k] = P + n - 1 + trie_pos[:k]
        slot[lane, off : off + n + k] = slots[lane].index(prompt_of[b])
        which[lane, off : off + n + k] = prompt_of[b]
        at[b] = lane * width + off + n - 1 + torch.arange(1 + K, device=device).clamp(max=k)
    anc = _ancestors(parents, device)
    past = (slot[:, :, None] == torch.arange(M, device=device)).repeat_interleave(P, -1)
    dtype = model.get_input_embeddings().weight.dtype
    hidden, states = run_capturing(
        lambda: run_packed(
            model,
            _ids_or_embeds(model, ids, prompts, which),
            packed_mask(seg, index, past, dtype, node, anc),
            pos,
            _cache_from(kv, gidx),
            torch.arange(P, device=device).repeat(M),
        ),
        model,
        layers,
        stop=not (scored or last),
    )
    features = RowFeatures()
    if layers:
        start = torch.zeros(B, dtype=torch.long) if starts is None else starts
        features.pooled = pool_rows(states, seg, index, start, B)
    if hidden is None:
        return torch.zeros(B, len(reads)), features
    hidden = hidden.reshape(lanes * width, -1)
    if last:
        features.last = hidden[at[:, 0]].float()
    if not scored:
        return torch.zeros(B, len(reads)), features
    # [B'*(1+K), H]: each scored row's last input position, then its trie nodes (2D and
    # contiguous: a strided 3D input sends the LM head to a batched matmul over a broadcast
    # weight, much slower)
    picked = hidden[at[scored].view(-1)]
    logp = torch.log_softmax(model.get_output_embeddings()(picked).float(), -1)
    out = torch.zeros(B, len(reads), device=device)
    out[scored] = _read_continuations(logp.view(len(scored), 1 + K, -1), reads)
    return out, features


def _ancestors(parents: Sequence[int], device: torch.device) -> Tensor:
    """[K, K] bool: trie node k's ancestors (`parents`, -1 ends), itself included."""
    K = len(parents)
    anc = torch.zeros(K, K, dtype=torch.bool, device=device)
    for k in range(K):
        a = k
        while a >= 0:
            anc[k, a] = True
            a = parents[a]
    return anc


def _read_continuations(logp: Tensor, reads: Sequence[Sequence[tuple[int, int]]]) -> Tensor:
    """Each continuation's log-probability [B, L]: the sum of its tokens' log-probabilities in
    logp [B, 1+K, V] (each row's last input position, then its trie nodes) at its `reads`
    (`_continuation_trie`)."""
    B, device = logp.shape[0], logp.device
    C = max(len(r) for r in reads)
    L = len(reads)
    col = torch.zeros(L, C, dtype=torch.long, device=device)
    tok = torch.zeros(L, C, dtype=torch.long, device=device)
    on = torch.zeros(L, C, dtype=logp.dtype, device=device)
    for i, r in enumerate(reads):
        for j, (nd, t) in enumerate(r):
            col[i, j], tok[i, j], on[i, j] = nd + 1, t, 1.0
    picked = logp[:, col.view(-1), tok.view(-1)].view(B, L, C)  # [B, L, C]
    return (picked * on).sum(-1)

"""Label words: the LM head's logits for each label's tokens, read off the one forward
(`forward.run`). Training: the cross-entropy over the label tokens (`label_loss`, `token_loss`).
Inference: every label's tokens as a trie after each row (`label_trie`), each label's
log-probability (`trie_scores`); and each input token's log-probability (`token_logprobs`).
The LM head runs only where something is read."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Encoded
from ..forward.batch import PromptBatch, after_front, after_kv, padded
from ..forward.kv import prefix_to_kv
from ..forward.layout import packed_fits
from ..forward.run import Hidden, run


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
    kind: str = "prompt",
) -> Tensor:
    """Cross-entropy over label tokens (labels [B, T], -100 elsewhere) of right-padded rows
    input_ids [B, T] after `prompt`: `rows_loss` for rows given as tensors (what
    `data.collate_train` makes). `prompt` may be one per row [B, P+S, H] (each row after its
    own, padded). shared_prefix=False runs each row after its own copy of the prompt."""
    rows = []
    for ids, n, lab in zip(input_ids.tolist(), attention_mask.sum(-1).tolist(), labels.tolist(), strict=True):  # fmt: skip
        k = next((i for i, t in enumerate(lab[:n]) if t != -100), n)
        rows.append(Encoded(ids[:k], ids[k:n]))
    return rows_loss(
        model, prompt, rows, kind=kind, packed=shared_prefix, share_head=share_head,
        reduction=reduction, weights=weights,
    )  # fmt: skip


def rows_loss(
    model,
    prompt: Tensor,
    rows: Sequence[Encoded],
    *,
    kind: str = "prompt",
    packed: bool = True,
    share_head: bool = True,
    reduction: str = "mean",
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over the label tokens of training rows (input then label tokens): their
    mean, their sum (reduction "sum": a data-parallel share divides it by the global count), or
    each label token's (reduction "none", no weights) in row-major order; `weights` [B] weighs
    each row's tokens (the mean is then sum(w * loss) / sum(w)). Equal to the reference
    (`forward.reference.reference_loss`) and PEFT's loss up to float rounding.

    kind "prompt": prompt [P+S, H], its last S vectors in the rows' placeholders. Packed, the
    prompt and the leading tokens all rows share (with `share_head`) run once at the start of
    each lane and the rows after them; padded (packed=False: gradient checkpointing, FSDP, a
    model that cannot run packed rows), each row after its own copy. kind "prefix": a deep prompt
    [P, layers*2*heads*d] whose keys/values every lane sees.
    """
    hidden, batch = forward_rows(
        model, prompt, rows, kind=kind, packed=packed, share_head=share_head
    )
    return token_loss(model, hidden, batch, weights, reduction)


def forward_rows(
    model,
    prompt: Tensor,
    rows: Sequence[Encoded],
    *,
    kind: str = "prompt",
    packed: bool = True,
    share_head: bool = True,
    labels: bool = True,
    starts: Sequence[int] | None = None,
    layers=(),
    stop: bool = False,
) -> tuple[Hidden, PromptBatch]:
    """The one forward over training rows after one prompt (see `label_loss`): with `labels`
    each row is its input then its label tokens (its last token not run); without, its input
    alone (a classification head reads it: `starts` [B], where each row's pooled part begins,
    caps the leading tokens shared in front)."""
    device = prompt.device
    seqs = [r.input_ids + (r.label_ids if labels else []) for r in rows]
    targets = [[-100] * len(r.input_ids) + r.label_ids for r in rows] if labels else None
    B = len(seqs)
    one = prompt.dim() == 2  # else one prompt per row: each row after its own, padded
    if kind == "prefix":
        kv = prefix_to_kv(model, prompt)
        span = kv[0][0].shape[2] + max(map(len, seqs))
        if one and packed and packed_fits(model, span):
            batch = after_kv(seqs, [0] * B, kv[0][0].shape[2], 0, device, targets=targets, one_past=True)  # fmt: skip
        else:
            batch = padded(seqs, 0, device, prompt_of=[0] * B if one else None, targets=targets)
        return run(model, batch, kv=kv, layers=layers, stop=stop), batch
    S = suffix_width(seqs)
    P = prompt.shape[-2] - S
    dtype = model.get_input_embeddings().weight.dtype
    suffix = prompt[..., P:, :] if S else None
    if one and packed and packed_fits(model, prompt.shape[0] + max(map(len, seqs))):
        h = shared_length(rows, starts) if share_head else 0
        head = seqs[0][:h]
        shared = model.get_input_embeddings()(torch.tensor(head, dtype=torch.long, device=device))
        front = torch.cat([prompt[:P].to(dtype), shared])  # [Q, H]
        batch = after_front(seqs, targets, h, front.shape[0], S, device)
        return run(model, batch, front=front, suffix=suffix, layers=layers, stop=stop), batch
    batch = padded(seqs, S, device, prompt_of=[0] * B if one else None, targets=targets)
    front = prompt[..., :P, :]
    return run(model, batch, front=front, suffix=suffix, layers=layers, stop=stop), batch


def suffix_width(seqs: Sequence[Sequence[int]]) -> int:
    """How many suffix soft tokens the rows carry (their placeholders are -S .. -1)."""
    low = min((t for s in seqs for t in s), default=0)
    return -low if low < 0 else 0


def shared_length(rows: Sequence[Encoded], starts: Sequence[int] | None = None) -> int:
    """How many leading tokens every row has in common (the template's head, run once in front
    of each lane), short of each row's last input token (its output is read: it predicts the
    first label token, or a head reads it), of where its pooled part begins (`starts`) and of
    any suffix placeholder."""
    limit = min(len(r.input_ids) for r in rows) - 1
    if starts is not None:
        limit = min(limit, *starts)
    first = rows[0].input_ids
    n = 0
    while n < limit and first[n] >= 0 and all(r.input_ids[n] == first[n] for r in rows):
        n += 1
    return n


def token_loss(model, hidden: Hidden, batch: PromptBatch, weights, reduction: str) -> Tensor:
    """The loss of the batch's `target` tokens from `hidden`: the LM head only where a target is
    predicted; token losses put back in row-major order (as a padded layout gives them)."""
    target = batch.target
    keep = target != -100
    logits = model.get_output_embeddings()(hidden.final[keep])
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    rows = batch.row[keep]
    order = torch.argsort(rows * (int(batch.index.max()) + 2) + batch.index[keep])
    return reduce_tokens(tok[order], rows[order], weights, reduction)


def reduce_tokens(tok: Tensor, rows: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    """Label tokens' losses `tok` (of rows `rows`, row-major) reduced as `label_loss` says."""
    if weights is None:
        if reduction == "none":
            return tok
        return tok.sum() if reduction == "sum" else tok.mean()
    w = weights.to(tok.device, torch.float32)[rows]
    tok = tok * w
    return tok.sum() if reduction == "sum" else tok.sum() / w.sum()


# --------------------------------------------------------------------------- label scoring


def label_trie(
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


def last_positions(batch: PromptBatch) -> Tensor:
    """Each row's last input position in the flattened batch [B] (lane * W + place)."""
    W = batch.ids.shape[1]
    return torch.tensor(
        [
            lane * W + off + n - 1
            for (lane, off), n in zip(batch.places, batch.lengths, strict=True)
        ],
        device=batch.ids.device,
    )


def trie_scores(
    model,
    hidden: Hidden,
    batch: PromptBatch,
    reads: Sequence[Sequence[tuple[int, int]]],
    scored: Sequence[int],
) -> Tensor:
    """Each scored row's log-probability of each label [len(scored), len(reads)]: the LM head
    at its last input position and its trie nodes (`forward.batch.after_kv` placed them right
    after its input), log-softmax, the labels' tokens read off (`label_trie`)."""
    K = max((nd for r in reads for nd, _ in r), default=-1) + 1
    W = batch.ids.shape[1]
    at = torch.tensor(
        [
            [lane * W + off + n - 1 + j for j in range(1 + K)]
            for b, ((lane, off), n) in enumerate(zip(batch.places, batch.lengths, strict=True))
            if b in set(scored)
        ],
        device=batch.ids.device,
    )
    # [B'*(1+K), H] (2D and contiguous: a strided 3D input sends the LM head to a batched
    # matmul over a broadcast weight, much slower)
    picked = hidden.final.reshape(-1, hidden.final.shape[-1])[at.view(-1)]
    logp = torch.log_softmax(model.get_output_embeddings()(picked).float(), -1)
    return _read(logp.view(len(scored), 1 + K, -1), reads)


def _read(logp: Tensor, reads: Sequence[Sequence[tuple[int, int]]]) -> Tensor:
    """Each continuation's log-probability [B, L]: the sum of its tokens' log-probabilities in
    logp [B, 1+K, V] (each row's last input position, then its trie nodes) at its `reads`."""
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


def token_logprobs(model, hidden: Hidden, batch: PromptBatch, row: int, top: int):
    """Log-probability of each of row `row`'s tokens 1..T-1 after the tokens before it [T-1],
    the `top` most likely tokens at each position and their log-probabilities [T-1, top]."""
    lane, off = batch.places[row]
    n = batch.lengths[row]
    states = hidden.final[lane, off : off + n - 1]
    ids = batch.ids[lane, off + 1 : off + n]
    logp = torch.log_softmax(model.get_output_embeddings()(states).float(), -1)
    picked = logp.gather(1, ids[:, None])[:, 0]
    best = logp.topk(min(top, logp.shape[-1]), -1)
    return picked, best.indices, best.values


# --------------------------------------------------------------------------- padded scoring


def padded_prompts(model, prompts: Tensor, kind: str, S: int) -> dict:
    """What `run` takes for padded rows each after its own prompt: a deep prompt's keys/values
    (kind "prefix", prompts [B, P, layers*2*heads*d]), or the front vectors [B, P, H] and suffix
    vectors [B, S, H] of soft prompts [B, P+S, H]."""
    if kind == "prefix":
        return {"kv": prefix_to_kv(model, prompts)}
    P = prompts.shape[1] - S
    return {"front": prompts[:, :P], "suffix": prompts[:, P:] if S else None}


def full_label_scores(
    model,
    prompt: Tensor,
    seqs: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    kind: str = "prompt",
) -> Tensor:
    """Log-probability of each continuation after prompt + each input: [B, L], as the packed
    label scoring gives, by running every (input, continuation) pair after its own copy of the
    prompt, padded (no KV cache, L times the compute): for sharded (FSDP) models, where a cache
    cannot be kept, and models that cannot run packed rows. `prompt` is one prompt [P+S, H] or
    one per input [B, P+S, H]; with kind "prefix" deep prompts [(B,) P, layers*2*heads*d]."""
    pairs = [(list(s), list(c)) for s in seqs for c in continuations]
    prompts = prompt if prompt.dim() == 3 else prompt.expand(len(seqs), -1, -1)
    prompts = prompts.repeat_interleave(len(continuations), 0)
    S = 0
    if kind == "prompt":  # the rows' placeholders: -S .. -1
        S = -min((t for s in seqs for t in s), default=0)
        S = max(S, 0)
    batch = padded(
        [s + c for s, c in pairs], S, prompt.device,
        targets=[[-100] * len(s) + c for s, c in pairs],
    )  # fmt: skip
    hidden = run(model, batch, **padded_prompts(model, prompts, kind, S))
    tok = token_loss(model, hidden, batch, None, "none")
    keep = batch.target != -100  # the tokens scored, in row-major order
    row = torch.arange(len(pairs), device=tok.device)[:, None].expand_as(keep)[keep]
    logp = torch.zeros(len(pairs), device=tok.device).index_add_(0, row, -tok)
    return logp.view(len(seqs), len(continuations))

"""Generation, read off the one forward: the rows' inputs run after their prompts with a cache
(`prefill`, the padded layout, left-padded), each row's next-token logits; then one token at a
time for every row still going (`decode_next`), each token chosen greedily or by nucleus
sampling (`choose_tokens`). Rows join and leave a running batch between steps (`Decoding`,
`merge_decoding`): the server's continuous batching."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..forward.batch import padded
from ..forward.kv import KV, cache_kw, decode_cache, out_cache
from ..forward.run import run


@torch.no_grad()
def prefill(
    model, kv: KV, rows: Sequence[Sequence[int]], prompt_of: Sequence[int], suffix: Tensor | None
) -> tuple[Tensor, KV, Tensor]:
    """Row b's input (token list) after prompt prompt_of[b]'s keys/values (kv holds N prompts;
    `suffix` [N, S, H] their suffix vectors, right-aligned): (next-token logits [B, V] float32,
    per layer keys/values [B, heads, P+T, d] left-padded, which positions are valid [B, P+T])."""
    S = 0 if suffix is None else suffix.shape[1]
    device = kv[0][0].device
    batch = padded(rows, S, device, prompt_of=prompt_of, left=True)
    hidden = run(model, batch, kv=kv, suffix=suffix, use_cache=True)
    P = kv[0][0].shape[2]
    mask = torch.cat([batch.mask.new_ones(len(rows), P), batch.mask], 1)
    logits = model.get_output_embeddings()(hidden.final[:, -1]).float()
    return logits, tuple((layer.keys, layer.values) for layer in hidden.cache.layers), mask


@torch.no_grad()
def decode_next(model, kv: KV, mask: Tensor, tokens: Tensor) -> tuple[Tensor, KV, Tensor]:
    """One token more for each row: tokens [B] after keys/values kv [B, heads, L, d] whose
    valid positions are mask [B, L] (padding anywhere; each row's position is its count of
    valid ones). Returns (the next token's logits [B, V] float32, kv [B, heads, L+1, d], mask
    [B, L+1])."""
    decoder = model.get_decoder()
    pos = mask.sum(-1, keepdim=True)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    out = decoder(
        input_ids=tokens[:, None],
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **{cache_kw(decoder): decode_cache(kv)},
    )
    logits = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
    return logits, tuple((layer.keys, layer.values) for layer in out_cache(out).layers), mask


@dataclass(eq=False)
class Decoding:
    """Generate rows decoding together, each after its own prompt: per layer keys/values
    [B, heads, L, d] left-padded to one length L, which positions are valid [B, L], each row's
    next-token logits [B, V] and its new tokens so far. Rows join (`merge_decoding`) and leave
    (`keep`) between steps."""

    rows: list
    """The engine's GenerateRow of each row."""
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


def choose_tokens(logits: Tensor, temperature: float, top_p: float, generator=None) -> Tensor:
    """Next token per row from logits [B, V]: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def beam_search(
    model,
    start: Decoding,
    num_beams: int,
    max_new_tokens: int,
    eos: int | None,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Beam search from prefilled rows (`start`: what `Engine.begin` returns, each row's first
    token's logits computed): each row's best sequence of new tokens (without the end token).

    As transformers' beam search with early_stopping=False: each step keeps the num_beams best
    of the 2 x num_beams best continuations that do not end; one that ends (the end token, among
    the num_beams best) is a finished hypothesis scored by its summed log-probability over its
    length (new tokens, the end token included) ** length_penalty; a row is done when it has
    num_beams of them and no running beam can score better, or at max_new_tokens, where its
    running beams join the finished ones. The rows' keys/values are repeated per beam; the
    prompt's part of them is shared by every beam as it is by every row."""
    B, K = len(start.rows), num_beams
    device = start.logits.device
    kv = tuple((k.repeat_interleave(K, 0), v.repeat_interleave(K, 0)) for k, v in start.kv)
    mask = start.mask.repeat_interleave(K, 0)
    logits = start.logits.repeat_interleave(K, 0)
    scores = torch.full((B, K), -1e9, device=device)
    scores[:, 0] = 0.0  # the K copies of a row start as one beam
    beams: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    active = list(range(B))  # rows still searching, in the order of the batch's rows
    for step in range(max_new_tokens):
        A = len(active)
        logp = torch.log_softmax(logits.float(), -1)  # [A*K, V]
        V = logp.shape[-1]
        cand = (scores[active].reshape(-1, 1) + logp).view(A, K * V)
        top_s, top_i = cand.topk(2 * K, -1)
        top_s, top_b, top_t = top_s.tolist(), (top_i // V).tolist(), (top_i % V).tolist()
        keep_rows, sel, toks = [], [], []
        for a, b in enumerate(active):
            new = []
            for rank in range(2 * K):
                s, bi, t = top_s[a][rank], top_b[a][rank], top_t[a][rank]
                if eos is not None and t == eos:
                    if rank < K:
                        finished[b].append((s / (step + 1) ** length_penalty, beams[b][bi]))
                    continue
                new.append((s, bi, t))
                if len(new) == K:
                    break
            last = step == max_new_tokens - 1
            best_alive = new[0][0] / (step + 1) ** length_penalty if new else -float("inf")
            full = len(finished[b]) >= K
            if full:
                finished[b] = sorted(finished[b], key=lambda x: -x[0])[:K]
            if last or (full and finished[b][-1][0] >= best_alive):
                if last:
                    finished[b] += [(s / (step + 1) ** length_penalty, beams[b][bi] + [t]) for s, bi, t in new]  # fmt: skip
                continue
            scores[b] = torch.tensor([s for s, _, _ in new], device=device)
            beams[b] = [beams[b][bi] + [t] for _, bi, t in new]
            keep_rows.append(b)
            sel += [a * K + bi for _, bi, _ in new]
            toks += [t for _, _, t in new]
        active = keep_rows
        if not active:
            break
        at = torch.tensor(sel, device=device)
        kv = tuple((k[at], v[at]) for k, v in kv)
        mask = mask[at]
        logits, kv, mask = decode_next(model, kv, mask, torch.tensor(toks, device=device))
    out = []
    for b in range(B):
        hyps = finished[b] or [(0.0, beams[b][0])]
        out.append(max(hyps, key=lambda x: x[0])[1])
    return out

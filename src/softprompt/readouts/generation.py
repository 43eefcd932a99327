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
from ..forward.kv import KV, cache_from, cache_kw, out_cache
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
        **{cache_kw(decoder): cache_from(kv, mask.shape[0])},
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

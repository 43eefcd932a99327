"""Decoding after a prompt's KV: step by step with a cache (`decode_steps`, `decode_next`), the
whole loop (`generate`) and each token's choice (greedy or nucleus sampling, `choose_tokens`)."""

from __future__ import annotations

from collections.abc import Generator

import torch
from torch import Tensor

from .kv import KV, _cache_from, _cache_kw, _out_cache, run_after_prefix


def decode_steps(
    model,
    kv: KV,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    rows: Tensor | None = None,
    prompts: Tensor | None = None,
) -> Generator[Tensor, Tensor, None]:
    """Step-wise decoding after prompt + input (left-padded [B, T]), reusing the KV cache.

    Yields the next token's logits [B, V] (float32); send back the tokens chosen [B] to get the
    next step's. Stop by closing it. `rows` and `prompts` as in `run_after_prefix`.
    """
    B = input_ids.shape[0]
    P = kv[0][0].shape[2]
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    with torch.no_grad():
        hidden, cache = run_after_prefix(
            model, kv, input_ids, attention_mask, rows, use_cache=True, prompts=prompts
        )
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], 1)
    while True:
        with torch.no_grad():
            logits = head(hidden[:, -1]).float()
        nxt = yield logits
        with torch.no_grad():
            pos = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            out = decoder(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{_cache_kw(decoder): cache},
            )
        hidden, cache = out.last_hidden_state, _out_cache(out)


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
        **{_cache_kw(decoder): _cache_from(kv, mask.shape[0])},
    )
    logits = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
    return logits, tuple((layer.keys, layer.values) for layer in _out_cache(out).layers), mask


@torch.no_grad()
def generate(
    model,
    kv: KV,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    rows: Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    prompts: Tensor | None = None,
) -> list[list[int]]:
    """Decode after prompt + input (left-padded [B, T]), reusing the KV cache every step
    (`decode_steps`).

    temperature 0 is greedy. Returns each row's new tokens, up to and excluding eos.
    `prompts` fill the inputs' suffix placeholders (see `run_after_prefix`).
    """
    B = input_ids.shape[0]
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens < 1:
        return out_tokens
    steps = decode_steps(model, kv, input_ids, attention_mask, rows=rows, prompts=prompts)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = next(steps)
    for step in range(max_new_tokens):
        nxt = choose_tokens(logits, temperature, top_p, generator)
        for b in range(B):
            if not done[b]:
                if eos_token_id is not None and int(nxt[b]) == eos_token_id:
                    done[b] = True
                else:
                    out_tokens[b].append(int(nxt[b]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = steps.send(nxt)
    steps.close()
    return out_tokens


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

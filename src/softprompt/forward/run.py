"""ONE forward: the frozen decoder over a `PromptBatch` after its prompts (`run`).

Whatever the layout (`forward.batch`), the rows' inputs are embedded with their prompts'
suffix vectors in their slots (`embed`), the prompt comes first (in-lane vectors, or cached
keys/values gathered per lane), and the attention mask lets each token see its own prompt, its
own row's earlier tokens and, for a label-trie node, its row's input and its ancestors
(`forward.layout.packed_mask`; a 2D padding mask in the padded layout). `run` returns the final
states at the batch's positions and the outputs of any layers asked for, stopping after the
last of those when nothing later is needed (`capture`). Readouts (`readouts/`) turn this into
losses, label scores, head features, log-probabilities and the first token of a generation.

BLOOM computes its ALiBi bias from a 2D mask; its packed lanes run its blocks here with the bias
built from each token's position in its own row (`_bloom_packed`): exact, since a query sees
only its own row and prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .batch import PromptBatch
from .capture import run_capturing
from .kv import KV, cache_from, cache_kw, out_cache
from .layout import bloom_slopes, packed_mask, require_packed


@dataclass
class Hidden:
    """What `run` gives: per position of the batch [L, W, H]."""

    final: Tensor | None
    """The decoder's output (the last layer, normed); None when the pass stopped early."""
    layers: dict[int, Tensor] = field(default_factory=dict)
    """The outputs of the layers asked for, by hidden-state index (1 = the first layer's)."""
    cache: Any = None
    """With use_cache (padded layout): the cache after the batch, to decode from."""


def embed(model, batch: PromptBatch, suffix: Tensor | None) -> Tensor:
    """Input embeddings of the batch's positions [L, W, H]; a slot takes its prompt's suffix
    vector: suffix [S, H] (one prompt), or [N, S, H] indexed by each position's prompt."""
    out = model.get_input_embeddings()(batch.ids)
    if not batch.has_slots:
        return out
    s = batch.slot.clamp(min=0)
    vec = suffix[s] if suffix.dim() == 2 else suffix[batch.prompt, s]
    return torch.where((batch.slot >= 0)[..., None], vec.to(out.dtype), out)


def run(
    model,
    batch: PromptBatch,
    *,
    front: Tensor | None = None,
    kv: KV | None = None,
    suffix: Tensor | None = None,
    layers=(),
    stop: bool = False,
    use_cache: bool = False,
) -> Hidden:
    """The decoder over `batch` after its prompts: `front` [Q, H] vectors at the start of every
    lane (an `after_front` batch, or one per padded row [B, Q, H]), or cached keys/values `kv`
    (N prompts; an `after_kv` batch gathers them per lane, a padded one per row). `suffix` fills
    the slots (`embed`). `layers`: hidden-state indices to record; with `stop` the pass ends
    after the last of them (`final` is then None)."""
    if batch.padded:
        return _run_padded(model, batch, front, kv, suffix, layers, stop, use_cache)
    require_packed(model)
    dtype = model.get_input_embeddings().weight.dtype
    device = batch.ids.device
    L, W = batch.ids.shape
    cache, past_positions = None, None
    if front is not None:
        Q = front.shape[0]
        rows_mask = packed_mask(
            batch.row, batch.index, torch.ones((L, W, Q), dtype=torch.bool, device=device), dtype
        )
        head_mask = torch.full((Q, Q + W), torch.finfo(dtype).min, dtype=dtype, device=device)
        head_mask[:, :Q].triu_(1)
        mask = torch.cat([head_mask.expand(L, 1, -1, -1), rows_mask], 2)
        pos = torch.cat([torch.arange(Q, device=device).expand(L, -1), batch.pos], 1)
        inputs = {"inputs_embeds": torch.cat([front.expand(L, -1, -1), embed(model, batch, suffix)], 1)}  # fmt: skip
    else:
        Q = 0
        P = kv[0][0].shape[2]
        M = 1 if batch.lane_prompts is None else batch.lane_prompts.shape[1]
        past = (batch.past_slot[:, :, None] == torch.arange(M, device=device)).repeat_interleave(P, -1)  # fmt: skip
        mask = packed_mask(batch.row, batch.index, past, dtype, batch.node, batch.ancestors)
        cache = cache_from(kv, L if batch.lane_prompts is None else batch.lane_prompts)
        if batch.lane_prompts is not None:
            past_positions = torch.arange(P, device=device).repeat(M)
        pos = batch.pos
        inputs = {"inputs_embeds": embed(model, batch, suffix)} if batch.has_slots else {"input_ids": batch.ids}  # fmt: skip
    final, states = run_capturing(
        lambda: _run_packed(model, inputs, mask, pos, cache, past_positions),
        model,
        layers,
        stop=stop,
    )
    if Q:
        final = None if final is None else final[:, Q:]
        states = {i: x[:, Q:] for i, x in states.items()}
    return Hidden(final, states)


def positions_after(prefix_len: int | Tensor, attention_mask: Tensor) -> Tensor:
    """Position ids [B, T] for tokens after a prefix, skipping padding (left or right)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return (pos.clamp(min=0) + prefix_len).to(attention_mask.device)


def _run_padded(model, batch, front, kv, suffix, layers, stop, use_cache) -> Hidden:
    """One row per lane with a 2D mask: after its prompt's vectors `front` [P, H] (or one per row
    [B, P, H]) concatenated in front, as the reference runs them; or after cached keys/values."""
    B = batch.ids.shape[0]
    decoder = model.get_decoder()
    emb = embed(model, batch, suffix) if (batch.has_slots or front is not None) else None
    if front is not None:
        fronts = front.expand(B, -1, -1) if front.dim() == 2 else front
        P = fronts.shape[1]
        kw = {
            "inputs_embeds": torch.cat([fronts.to(emb.dtype), emb], dim=1),
            "attention_mask": torch.cat([batch.mask.new_ones(B, P), batch.mask], dim=1),
        }
    else:
        P = kv[0][0].shape[2]
        rows = B if kv[0][0].shape[0] == 1 else batch.prompt[:, 0]
        kw = {
            **({"inputs_embeds": emb} if emb is not None else {"input_ids": batch.ids}),
            "attention_mask": torch.cat([batch.mask.new_ones(B, P), batch.mask], dim=1),
            "position_ids": positions_after(P, batch.mask),
            cache_kw(decoder): cache_from(kv, rows),
        }

    def go():
        return decoder(**kw, use_cache=use_cache)

    out, states = run_capturing(go, model, layers, stop=stop)
    cut = P if front is not None else 0
    states = {i: x[:, cut:] for i, x in states.items()}
    if out is None:
        return Hidden(None, states)
    cache = out_cache(out) if use_cache else None
    return Hidden(out.last_hidden_state[:, cut:], states, cache)


def _run_packed(
    model,
    inputs: dict,
    attention_mask: Tensor,
    position_ids: Tensor,
    cache=None,
    past_positions: Tensor | None = None,
) -> Tensor:
    """The decoder over packed lanes: `inputs` {input_ids or inputs_embeds} [B, T(, H)],
    `attention_mask` additive [B, 1, T, past+T] (`packed_mask`), `position_ids` [B, T] (each
    token's place in its own sequence), `cache` the lanes' past [B, heads, past, d] whose keys
    sit at `past_positions` [past] (default 0..past-1). Returns the hidden states [B, T, H]."""
    decoder = model.get_decoder()
    slopes = bloom_slopes(model)
    if slopes is None:
        extra = {} if cache is None else {cache_kw(decoder): cache}
        out = decoder(
            **inputs,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        return out.last_hidden_state
    return _bloom_packed(
        decoder, slopes, inputs, attention_mask, position_ids, cache, past_positions
    )


def _bloom_packed(decoder, slopes, inputs, mask, pos, cache, past_positions) -> Tensor:
    """BLOOM's decoder over packed lanes. ALiBi adds slope x (key position) to every score; with
    a query seeing only its own row and prompt, each key's position in its own sequence gives
    the same softmax as BLOOM's bias over a 2D mask (a shift by the query's position cancels).
    So the bias is built from the packed positions and the blocks run with the 4D mask."""
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        embeds = decoder.word_embeddings(inputs["input_ids"])
    hidden = decoder.word_embeddings_layernorm(embeds)
    B = pos.shape[0]
    keys = pos
    if cache is not None:
        past = cache.get_seq_length()
        if past_positions is None:
            past_positions = torch.arange(past, device=pos.device)
        keys = torch.cat([past_positions.to(pos.device).expand(B, -1), pos], 1)
    heads = decoder.num_heads
    alibi = slopes(heads, pos.device)[None, :, None] * keys[:, None, :].to(torch.float32)
    alibi = alibi.reshape(B * heads, 1, -1).to(hidden.dtype)  # [B*heads, 1, keys]
    for block in decoder.h:
        hidden = block(hidden, alibi=alibi, attention_mask=mask, layer_past=cache)[0]
    return decoder.ln_f(hidden)

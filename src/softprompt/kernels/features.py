"""What a classification head reads of a training batch (`head_features`): each row's final
state at its last input token and its mean-pooled middle layers, after a soft prompt or a deep
prompt, packed (rows share lanes after the prompt, as `label_loss` runs them) or padded (each
row after its own copy of the prompt: gradient checkpointing, FSDP, models that cannot run
packed rows). Both equal a plain forward pass over prompt + row (`reference.concat_forward`)
up to float rounding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..readouts.head import ClassifierHead, RowFeatures, needs, pool_rows
from .capture import run_capturing
from .kv import common_prefix_length, prefix_to_kv, run_after_prefix
from .loss import prefix_packed_hidden, shared_prefix_hidden
from .packed import packed_fits
from .reference import _concat_inputs, prefix_length


def head_features(
    model,
    prompt: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    starts: Tensor,
    heads: Sequence[ClassifierHead | None],
    *,
    kind: str = "prompt",
    packed: bool = True,
) -> RowFeatures:
    """RowFeatures of right-padded input rows [B, T] (no label tokens) after `prompt` (kind
    "prompt": [P+S, H], or one per row [B, P+S, H] (padded only), its last S in the rows' suffix
    placeholders; "prefix": a deep prompt [(B,) P, layers*2*heads*d]). A row pools its positions
    from starts[b] (the end of the template's head in its ids) to its end. Only what `heads`
    read is computed: without a head that reads the final layer the pass ends after the last
    pooled layer."""
    layers, need_last = needs(heads)
    stop = not need_last
    lengths = attention_mask.sum(-1)
    B = input_ids.shape[0]
    if prompt.dim() == 3:
        packed = False  # one prompt per row: each row after its own
    kv = None
    if kind == "prefix":
        kv = prefix_to_kv(model, prompt)
        span = kv[0][0].shape[2] + input_ids.shape[1]
    else:
        span = prompt.shape[-2] + input_ids.shape[1]
    if packed and not packed_fits(model, span):
        packed = False
    if packed:
        h = 0
        if kind == "prompt":  # the leading tokens every row has, run once with the prompt
            h = _shared_length(input_ids, lengths, starts)
            hidden, states, _, row_of, index = shared_prefix_hidden(
                model, prompt, input_ids, attention_mask, None, h, keep_last=True,
                layers=layers, stop=stop,
            )  # fmt: skip
        else:
            hidden, states, _, row_of, index = prefix_packed_hidden(
                model, kv, input_ids, attention_mask, None, keep_last=True, layers=layers,
                stop=stop,
            )  # fmt: skip
        start = starts - h
        last_at = index == (lengths - 1 - h).to(index.device)[row_of.clamp(min=0)]
        last_at &= row_of >= 0
    else:
        P = 0 if kind == "prefix" else prefix_length(prompt, input_ids)
        hidden, states = run_capturing(
            lambda: _padded_hidden(model, prompt, kv, input_ids, attention_mask),
            model,
            layers,
            stop=stop,
        )
        states = {i: x[:, P:] for i, x in states.items()}
        hidden = None if hidden is None else hidden[:, P:]
        T = input_ids.shape[1]
        index = torch.arange(T, device=input_ids.device).expand(B, -1)
        valid = attention_mask.bool()
        row_of = torch.where(valid, torch.arange(B, device=input_ids.device)[:, None], -1)
        index = torch.where(valid, index, -1)
        start = starts
        last_at = valid & (index == (lengths - 1)[:, None])
    out = RowFeatures()
    if layers:
        out.pooled = pool_rows(states, row_of, index, start, B)
    if need_last:
        order = row_of[last_at]  # one position per row
        last = hidden[last_at].float()
        out.last = last.new_empty(B, last.shape[-1]).index_copy_(0, order, last)
    return out


def _padded_hidden(model, prompt, kv, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states of right-padded rows [B, T] each after its own copy of the prompt:
    [B, P+T, H] for a soft prompt (`_concat_inputs`), [B, T, H] after a deep prompt's `kv`."""
    if kv is not None:
        B = input_ids.shape[0]
        rows = torch.arange(B, device=input_ids.device) if kv[0][0].shape[0] > 1 else None
        return run_after_prefix(model, kv, input_ids, attention_mask, rows)[0]
    embeds, mask = _concat_inputs(model, prompt, input_ids, attention_mask)
    decoder = model.get_decoder()
    return decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state


def _shared_length(input_ids: Tensor, lengths: Tensor, starts: Tensor) -> int:
    """How many leading tokens every row has in common, at most each row's template head (its
    pooled part must stay in the rows) and leaving each row its last token."""
    limit = min(int(starts.min()), int(lengths.min()) - 1)
    if limit <= 0:
        return 0
    first = input_ids[0, :limit].tolist()
    return common_prefix_length([r[:limit] for r in input_ids.tolist()], first, keep=0)

"""The reference every fast path is checked against (what PEFT does): the prompt's vectors
concatenated in front of the rows' token embeddings, its suffix vectors in the rows' placeholders,
and the whole model run on [B, P+T] (`concat_forward`, `reference_loss`). Also how token ids with
suffix placeholders become embeddings (`embed_ids`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SoftpromptError


def concat_forward(model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Reference forward: prompt [P, H] (or [B, P, H]) before input_ids [B, T].

    Returns logits [B, P+T, V]. Position ids are 0..P+T-1 as in PEFT (right padding keeps
    every real token at the same position as in an unpadded run). With suffix placeholders in
    the rows (see `embed_ids`), the prompt's last vectors run there instead of in front, and
    P counts only the vectors in front (`prefix_length`).
    """
    embeds, mask = _concat_inputs(model, prompt, input_ids, attention_mask)
    return model(inputs_embeds=embeds, attention_mask=mask).logits


def reference_loss(
    model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> Tensor:
    """The same loss through `concat_forward` (full logits everywhere)."""
    P = prefix_length(prompt, input_ids)
    logits = concat_forward(model, prompt, input_ids, attention_mask)[:, P:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


def suffix_count(input_ids: Tensor) -> int:
    """How many suffix soft tokens the rows carry: their placeholders are -n .. -1
    (`data.suffix_placeholders`); 0 when there are none."""
    low = int(input_ids.min()) if input_ids.numel() else 0
    return -low if low < 0 else 0


def prefix_length(prompt: Tensor, input_ids: Tensor) -> int:
    """How many of the prompt's vectors run in front of the rows (the rest are suffix tokens)."""
    P = prompt.shape[-2] - suffix_count(input_ids)
    if P < 0:
        raise SoftpromptError(
            f"the rows hold {suffix_count(input_ids)} suffix placeholders but the prompt has only "
            f"{prompt.shape[-2]} vectors"
        )
    return P


def embed_ids(
    model, ids: Tensor, prompts: Tensor | None = None, which: Tensor | None = None
) -> Tensor:
    """Input embeddings of token ids [..., T]. A suffix placeholder -k takes the prompt's k-th
    vector from the end: from `prompts` [N, H], or with `prompts` [K, N, H] from prompt
    `which` [..., T] of that position. Gradients flow into those vectors."""
    emb = model.get_input_embeddings()
    out = emb(ids.clamp(min=0))
    neg = ids < 0
    if not bool(neg.any()):
        return out
    if prompts is None:
        raise SoftpromptError("the rows hold suffix placeholders, but no prompt was given for them")
    n = prompts.shape[-2]
    slot = (ids + n).clamp(0, n - 1)
    vec = prompts[slot] if prompts.dim() == 2 else prompts[which, slot]
    return torch.where(neg[..., None], vec.to(out.dtype), out)


def _concat_inputs(
    model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """(embeddings [B, P+T, H], attention mask [B, P+T]) of prompt [P, H] (or [B, P, H])
    placed before input_ids [B, T] (its last vectors in the rows' suffix placeholders, if any)."""
    B = input_ids.shape[0]
    P = prefix_length(prompt, input_ids)
    which = None
    if prompt.dim() == 3:
        which = torch.arange(B, device=input_ids.device)[:, None].expand_as(input_ids)
    emb = embed_ids(model, input_ids, prompt, which)
    prompts = prompt.expand(B, -1, -1) if prompt.dim() == 2 else prompt
    embeds = torch.cat([prompts[:, :P].to(emb.dtype), emb], dim=1)
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    return embeds, mask


def _ids_or_embeds(model, ids: Tensor, prompts: Tensor | None, which: Tensor | None) -> dict:
    """The decoder's input: the ids, or with suffix placeholders among them their embeddings
    (`which`: each position's prompt when `prompts` is [N, P+S, H]; a [B] tensor is per row)."""
    if not suffix_count(ids):
        return {"input_ids": ids}
    if prompts is not None and prompts.dim() == 3:
        if which is None:
            which = torch.zeros_like(ids)
        elif which.dim() == 1:
            which = which[:, None].expand_as(ids)
    return {"inputs_embeds": embed_ids(model, ids, prompts, which)}

"""The spec every fast path is checked against (what PEFT does): the prompt's vectors
concatenated in front of the rows' token embeddings, its suffix vectors in the rows'
placeholders, and the whole model run on [B, P+T] with a 2D padding mask, full logits
everywhere. Nothing here is used by the fast code, and nothing of the fast code is used here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_embeds(model, prompt: Tensor, input_ids: Tensor) -> Tensor:
    """Token embeddings of input_ids [B, T]; a suffix placeholder -k (`data.suffix_placeholders`)
    takes the prompt's k-th vector from the end (prompt [N, H], or one per row [B, N, H])."""
    emb = model.get_input_embeddings()
    out = emb(input_ids.clamp(min=0))
    if not bool((input_ids < 0).any()):
        return out
    n = prompt.shape[-2]
    slot = (input_ids + n).clamp(0, n - 1)
    vec = prompt[slot] if prompt.dim() == 2 else torch.stack([p[s] for p, s in zip(prompt, slot, strict=True)])  # fmt: skip
    return torch.where((input_ids < 0)[..., None], vec.to(out.dtype), out)


def reference_inputs(
    model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, Tensor, int]:
    """(embeddings [B, P+T, H], mask [B, P+T], P): the prompt's front vectors [P, H] (or
    [B, P, H]) before the rows; its last S vectors (S: the rows' placeholders) in the rows."""
    S = int(-input_ids.min()) if input_ids.numel() and int(input_ids.min()) < 0 else 0
    P = prompt.shape[-2] - S
    B = input_ids.shape[0]
    front = (prompt if prompt.dim() == 3 else prompt.expand(B, -1, -1))[:, :P]
    emb = reference_embeds(model, prompt, input_ids)
    embeds = torch.cat([front.to(emb.dtype), emb], 1)
    return embeds, torch.cat([attention_mask.new_ones(B, P), attention_mask], 1), P


def concat_forward(
    model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor, *, hidden_states: bool = False
):
    """Reference forward: prompt [P(+S), H] (or [B, P(+S), H]) before input_ids [B, T].

    Returns logits [B, P+T, V]; with `hidden_states`, the model's whole output (its
    `hidden_states`: the embeddings, then each layer's output, the last one normed). Position
    ids are 0..P+T-1 as in PEFT (right padding keeps every real token where an unpadded run has
    it)."""
    embeds, mask, _ = reference_inputs(model, prompt, input_ids, attention_mask)
    out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=hidden_states)
    return out if hidden_states else out.logits


def reference_loss(
    model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> Tensor:
    """Mean cross-entropy over the label tokens (labels [B, T], -100 elsewhere), through
    `concat_forward`."""
    _, _, P = reference_inputs(model, prompt, input_ids, attention_mask)
    logits = concat_forward(model, prompt, input_ids, attention_mask)[:, P:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


@torch.no_grad()
def reference_generate(
    model, prompt: Tensor, input_ids: list[int], max_new_tokens: int, eos_token_id: int | None
) -> list[int]:
    """Greedy decoding after prompt + one row, the whole sequence run again for every token (no
    cache: PEFT's `generate(use_cache=False)`). The new tokens, up to and excluding eos."""
    ids = list(input_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], device=prompt.device)
        logits = concat_forward(model, prompt, x, torch.ones_like(x))
        t = int(logits[0, -1].float().argmax())
        if eos_token_id is not None and t == eos_token_id:
            break
        new.append(t)
        ids.append(t)
    return new

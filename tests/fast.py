"""The fast paths put together the way the engine does, for tests that check one piece at a time
against the reference (`softprompt.forward.reference`) or PEFT."""

from __future__ import annotations

import torch

from softprompt.engine import Engine
from softprompt.forward.batch import after_kv
from softprompt.forward.run import run
from softprompt.predictors import predictor_for_prompt
from softprompt.readouts.generation import choose_tokens, decode_next, prefill
from softprompt.readouts.words import label_trie, trie_scores


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each row's real tokens (any padding dropped)."""
    return [[t for t, m in zip(r, k, strict=True) if m] for r, k in zip(ids.tolist(), mask.tolist(), strict=True)]  # fmt: skip


def score_continuations(model, kv, ids, mask, conts, rows=None, prompts=None) -> torch.Tensor:
    """Each continuation's log-probability after each row [B, L]: the rows packed after their
    prompts' keys/values with the label trie (`forward.batch.after_kv`), one `forward.run`,
    `readouts.words.trie_scores`. `rows` [B] picks each row's prompt out of kv's; `prompts`, the
    whole prompts ([P+S, H] or [N, P+S, H]), fill the rows' placeholders (-k: a prompt's k-th
    vector from the end)."""
    seqs = _rows(ids, mask)
    which = [0] * len(seqs) if rows is None else [int(r) for r in rows.tolist()]
    tokens, parents, depths, reads = label_trie(conts)
    if prompts is not None and prompts.dim() == 2:
        prompts = prompts[None]
    S = 0 if prompts is None else prompts.shape[1]
    batch = after_kv(seqs, which, kv[0][0].shape[2], S, ids.device, trie=(tokens, parents, depths))
    hidden = run(model, batch, kv=kv, suffix=prompts)
    return trie_scores(model, hidden, batch, reads, list(range(len(seqs))))


@torch.no_grad()
def generate(model, kv, ids, mask, *, max_new_tokens: int, eos_token_id=None, rows=None, prompts=None):  # fmt: skip
    """Greedy decoding after each row (`readouts.generation.prefill`, then `decode_next`): each
    row's new tokens, up to and excluding `eos_token_id`. `rows`, `prompts` as in
    `score_continuations`."""
    seqs = _rows(ids, mask)
    which = [0] * len(seqs) if rows is None else [int(r) for r in rows.tolist()]
    if prompts is not None and prompts.dim() == 2:
        prompts = prompts[None]
    logits, cache, m = prefill(model, kv, seqs, which, prompts)
    out: list[list[int]] = [[] for _ in seqs]
    done = [False] * len(seqs)
    for step in range(max_new_tokens):
        nxt = choose_tokens(logits, 0.0, 1.0)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if eos_token_id is not None and t == eos_token_id:
                done[b] = True
            else:
                out[b].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        logits, cache, m = decode_next(model, cache, m, nxt)
    return out


def label_probabilities(
    model, tok, prompt, task, texts, *, batch_size=32, share_head=True, bias=None, head=None,
    kind="prompt",
):  # fmt: skip
    """Each label's probability for each text [N, L], through the engine, for a prompt not saved
    as an adapter ([P+S, H], or an ensemble [K, P+S, H]; `head`: its classification head;
    `kind` "prefix": a deep prompt's keys and values)."""
    engine = Engine(model, tok, share_head=share_head)
    predictor = predictor_for_prompt(model, tok, prompt, task, bias=bias, head=head, kind=kind)
    return engine.classify(predictor, texts, batch_size=batch_size)


def generate_texts(model, tok, prompt, task, texts, *, max_new_tokens=6, batch_size=16, share_head=True):  # fmt: skip
    """Greedy generation after each templated text, through the engine."""
    engine = Engine(model, tok, share_head=share_head)
    predictor = predictor_for_prompt(model, tok, prompt, task)
    return engine.generate(predictor, texts, max_new_tokens=max_new_tokens, batch_size=batch_size)

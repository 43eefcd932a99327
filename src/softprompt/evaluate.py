"""Inference and metrics: rank classification (score every label after the input), free
generation, accuracy / macro-F1 / confusion."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .calibrate import apply_bias
from .data import (
    Encoded,
    Task,
    collate_left,
    collate_train,
    input_budget,
    input_token_ids,
    label_token_ids,
)
from .model import (
    KV,
    common_prefix_length,
    extend_kv,
    generate,
    label_loss,
    prefix_kv,
    score_continuations,
    slice_kv,
)


def front(prompt: Tensor, task: Task) -> Tensor:
    """The prompt's vectors that run in front of the input (all but the task's suffix tokens,
    which run after the text): what `prefix_kv` caches."""
    return prompt[..., : prompt.shape[-2] - task.suffix_tokens, :]


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


class _HeadCache:
    """The template's head (the tokens every row starts with, e.g. `Tweet text :`) run once
    after the prompt: each batch then starts its rows after the part of the head they all share
    (checked per row, so a BPE merge across the template boundary only shortens it)."""

    def __init__(self, model, tokenizer, task: Task, kv: KV, enabled: bool = True):
        self.kv = kv
        self.P = kv[0][0].shape[2]
        self.head = list(tokenizer(task.head())["input_ids"]) if enabled else []
        self.head_kv = extend_kv(model, kv, self.head) if self.head else kv

    def batch(self, seqs: Sequence[Sequence[int]]) -> tuple[KV, list[Sequence[int]]]:
        """(KV to run the batch after [N, heads, P+h, d], the rows without their first h tokens)."""
        h = common_prefix_length(seqs, self.head, keep=1)
        return slice_kv(self.head_kv, self.P + h), [s[h:] for s in seqs]


@torch.no_grad()
def label_probabilities(
    model,
    tokenizer,
    prompt: Tensor,
    task: Task,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
    kv: KV | None = None,
    bias: Sequence[float] | None = None,
    share_head: bool = True,
) -> Tensor:
    """Each label's probability for each text: [N, L] (rows sum to 1), by scoring every label's
    tokens (with its end token) after the input. The prompt's KV is computed once (or passed
    in as `kv`, from `prefix_kv`, to reuse it across calls).

    `prompt` is one prompt [P, H] or an ensemble [K, P, H]: each text then runs once per member
    (in the same batch, each row with its member's prompt) and the probabilities are the mean
    of the members'. `bias` [L] calibrates the (mean) probabilities (see calibrate.py).
    With `share_head` the template's head runs once with the prompt, not once per row (exact).
    """
    device = model.get_input_embeddings().weight.device
    budget = input_budget(tokenizer, task)
    seqs = [input_token_ids(tokenizer, task, t, budget) for t in texts]
    labels = [label_token_ids(tokenizer, n) for n in task.label_names]
    prompt = prompt.to(device)
    kv = prefix_kv(model, front(prompt, task)) if kv is None else kv
    K = kv[0][0].shape[0]
    heads = _HeadCache(model, tokenizer, task, kv, share_head)
    out = torch.empty(len(texts), len(labels))
    batches = _length_sorted_batches([len(s) for s in seqs], max(1, batch_size // K))
    for idx in tqdm(batches, desc="classify", disable=not progress, unit="batch"):
        batch_kv, rest = heads.batch([seqs[i] for i in idx])
        ids, mask = collate_left(rest, tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        if K == 1:
            scores = score_continuations(model, batch_kv, ids, mask, labels, prompts=prompt)
            out[idx] = torch.softmax(scores.float(), -1).cpu()
        else:  # member k's rows are rows k*B .. (k+1)*B-1
            rows = torch.arange(K, device=device).repeat_interleave(len(idx))
            scores = score_continuations(
                model, batch_kv, ids.repeat(K, 1), mask.repeat(K, 1), labels, rows, prompt
            )
            out[idx] = torch.softmax(scores.float(), -1).view(K, len(idx), -1).mean(0).cpu()
    return apply_bias(out, bias)


def full_label_scores(
    model,
    prompt: Tensor,
    seqs: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_id: int,
) -> Tensor:
    """Log-probability of each continuation after prompt + each input: [B, L], as
    `score_continuations` gives, by one plain forward over every (input, continuation) pair (no
    KV cache). L times the compute: for sharded (FSDP) models, where a cache cannot be kept."""
    pairs = [Encoded(list(s), list(c)) for s in seqs for c in continuations]
    batch = {k: v.to(prompt.device) for k, v in collate_train(pairs, pad_id).items()}
    tok = label_loss(model, prompt, **batch, reduction="none", shared_prefix=False)
    keep = batch["labels"][:, 1:] != -100  # the tokens label_loss scores, in its order
    row = torch.arange(len(pairs), device=tok.device)[:, None].expand_as(keep)[keep]
    logp = torch.zeros(len(pairs), device=tok.device).index_add_(0, row, -tok)
    return logp.view(len(seqs), len(continuations))


def classify(
    model, tokenizer, prompt: Tensor, task: Task, texts: Sequence[str], **kw
) -> tuple[list[str], Tensor]:
    """(predicted label names, probabilities [N, L])."""
    probs = label_probabilities(model, tokenizer, prompt, task, texts, **kw)
    return [task.label_names[i] for i in probs.argmax(-1).tolist()], probs


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompt: Tensor,
    task: Task,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 6,
    batch_size: int = 16,
    progress: bool = False,
    kv: KV | None = None,
    share_head: bool = True,
) -> list[str]:
    """Greedy free generation after the input, as in the guide (the output may be any text)."""
    device = model.get_input_embeddings().weight.device
    budget = task.max_length - 1 if not task.label_names else input_budget(tokenizer, task)
    seqs = [input_token_ids(tokenizer, task, t, budget) for t in texts]
    prompt = prompt.to(device)
    kv = prefix_kv(model, front(prompt, task)) if kv is None else kv
    heads = _HeadCache(model, tokenizer, task, kv, share_head)
    out: list[str] = [""] * len(texts)
    batches = _length_sorted_batches([len(s) for s in seqs], batch_size)
    for idx in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
        batch_kv, rest = heads.batch([seqs[i] for i in idx])
        ids, mask = collate_left(rest, tokenizer.pad_token_id)
        new = generate(
            model,
            batch_kv,
            ids.to(device),
            mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            prompts=prompt,
        )
        for i, toks in zip(idx, new, strict=True):
            out[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
    return out


def metrics(gold: Sequence[str], pred: Sequence[str], label_names: Sequence[str]) -> dict:
    """accuracy, macro_f1 (over label_names), per-class precision/recall/f1/support, and the
    confusion matrix (rows gold, columns predicted, in label_names order). A prediction that is
    not a label counts as wrong and is counted in `invalid`."""
    names = list(label_names)
    index = {n: i for i, n in enumerate(names)}
    L = len(names)
    confusion = [[0] * L for _ in range(L)]
    invalid = 0
    for g, p in zip(gold, pred, strict=True):
        if p in index:
            confusion[index[g]][index[p]] += 1
        else:
            invalid += 1
    per_class = {}
    f1s = []
    for i, n in enumerate(names):
        tp = confusion[i][i]
        predicted = sum(confusion[r][i] for r in range(L))
        support = sum(1 for g in gold if g == n)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[n] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        f1s.append(f1)
    n = len(gold)
    correct = sum(confusion[i][i] for i in range(L))
    return {
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(f1s) / L if L else 0.0,
        "per_class": per_class,
        "confusion_matrix": {"labels": names, "matrix": confusion},
        "invalid": invalid,
        "n": n,
    }

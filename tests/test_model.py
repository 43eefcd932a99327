"""Numbers against references: PEFT's prompt tuning, and the plain concatenated forward pass."""

from __future__ import annotations

import copy

import pytest
import torch

from fast import generate, score_continuations
from softprompt.config import GUIDE_INIT_TEXT
from softprompt.data import Task, collate_left, collate_train, encode_rows, label_token_ids
from softprompt.forward.kv import prompt_kv
from softprompt.forward.reference import concat_forward, reference_loss
from softprompt.prompt import init_prompt, text_token_ids
from softprompt.readouts.words import full_label_scores, label_loss

TEXTS = [
    "@ZephyrMobile no signal for three days and nobody answers",
    "thanks!",
    "@NorthRailUK the 8:05 was cancelled again, third time this week. Refund please",
    "ok",
]
LABELS = ["complaint", "no complaint", "complaint", "no complaint"]


def tweet_task(suffix: int = 0, max_length: int = 48) -> Task:
    """The tests' complaints task on the tiny models (the guide's template, two labels)."""
    return Task(
        text_column="Tweet text",
        label_names=["complaint", "no complaint"],
        max_length=max_length,
        suffix_tokens=suffix,
    )


def _batch(tokenizer, max_length=48):
    task = tweet_task(max_length=max_length)
    rows = encode_rows(tokenizer, task, TEXTS, LABELS)
    assert len({len(r) for r in rows}) > 1, "rows of different lengths in one batch"
    return task, collate_train(rows, tokenizer.pad_token_id)


def _close(a, b, rel=1e-5):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-8)
    return (a - b).abs().max().item() / scale <= rel


def _peft_model(model, tokenizer, tmp_path, n=6):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    tokenizer.save_pretrained(tmp_path / "tok")
    cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=n,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=GUIDE_INIT_TEXT,
        tokenizer_name_or_path=str(tmp_path / "tok"),
    )
    return get_peft_model(copy.deepcopy(model), cfg)


def test_text_init_equals_peft(tiny, tmp_path):
    model, tok = tiny
    pm = _peft_model(model, tok, tmp_path, n=20)  # longer than the text: PEFT repeats it
    ours = init_prompt(model, tok, 20, "text", text=GUIDE_INIT_TEXT)
    theirs = pm.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(ours, theirs.float())
    ids = text_token_ids(tok, GUIDE_INIT_TEXT, 3)
    assert ids == tok(GUIDE_INIT_TEXT)["input_ids"][:3]


def test_loss_logits_and_gradient_equal_peft(tiny, tmp_path):
    model, tok = tiny
    pm = _peft_model(model, tok, tmp_path)
    pm.eval()
    _, b = _batch(tok)
    peft_prompt = pm.prompt_encoder["default"].embedding.weight
    out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    out.loss.backward()

    prompt = peft_prompt.detach().clone().requires_grad_(True)
    loss = label_loss(model, prompt, **b)
    loss.backward()
    assert _close(loss.detach(), out.loss.detach())
    assert _close(prompt.grad, peft_prompt.grad)
    with torch.no_grad():
        logits = concat_forward(model, prompt, b["input_ids"], b["attention_mask"])
    real = torch.cat(
        [
            torch.ones(b["input_ids"].shape[0], prompt.shape[0], dtype=torch.bool),
            b["attention_mask"].bool(),
        ],
        1,
    )
    assert _close(logits[real], out.logits.detach()[real])


@torch.no_grad()
def test_generation_equals_peft_generate_without_cache(tiny, tmp_path):
    """Greedy generation after the guide's template, one tweet at a time (no padding): the same
    text as PEFT's `generate(use_cache=False)` (it recomputes the prompt at every step; PEFT's
    cached generate re-inserts the virtual tokens on transformers 5, so it is not the reference)."""
    from fast import generate_texts

    model, tok = tiny
    pm = _peft_model(model, tok, tmp_path)
    pm.eval()
    weight = pm.prompt_encoder["default"].embedding.weight
    prompt = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    weight.copy_(prompt)  # a prompt far from the text init: the tiny llama's output depends on it
    task = Task(text_column="Tweet text", label_names=["complaint", "no complaint"], max_length=128)
    ours = generate_texts(model, tok, prompt, task, TEXTS, max_new_tokens=6, batch_size=1)
    for text, got in zip(TEXTS, ours, strict=True):
        x = torch.tensor([tok(f"Tweet text : {text} Label : ")["input_ids"]])
        out = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                          do_sample=False, use_cache=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)  # fmt: skip
        want = tok.decode(out[0, x.shape[1] :], skip_special_tokens=True).strip()
        assert got == want


def _assert_loss_and_gradient_equal_reference(model, prompt, b):
    fast = label_loss(model, prompt, **b)
    (g_fast,) = torch.autograd.grad(fast, prompt)
    ref = reference_loss(model, prompt, **b)
    (g_ref,) = torch.autograd.grad(ref, prompt)
    assert _close(fast.detach(), ref.detach())
    assert _close(g_fast, g_ref)
    assert g_fast.abs().sum() > 0


def test_shared_prefix_loss_and_gradient_equal_reference(tiny):
    model, tok = tiny
    _, b = _batch(tok)
    prompt = init_prompt(model, tok, 5, "random", seed=3).requires_grad_(True)
    _assert_loss_and_gradient_equal_reference(model, prompt, b)


def _full_label_logprob(model, prompt, ids, label_ids):
    seq = torch.tensor([ids + label_ids])
    logits = concat_forward(model, prompt, seq, torch.ones_like(seq))[0, prompt.shape[0] :]
    logp = torch.log_softmax(logits.float(), -1)
    start = len(ids)
    return sum(logp[start - 1 + j, t].item() for j, t in enumerate(label_ids))


@torch.no_grad()
def test_label_scores_equal_full_forward_per_label(tiny):
    model, tok = tiny
    prompt = init_prompt(model, tok, 4, "vocab", seed=1)
    seqs = [tok(f"Tweet text : {t} Label : ")["input_ids"] for t in TEXTS]
    conts = [label_token_ids(tok, n) for n in ("complaint", "no complaint", "maybe not")]
    ids, mask = collate_left(seqs, tok.pad_token_id)
    scores = score_continuations(model, prompt_kv(model, prompt), ids, mask, conts)
    batched = full_label_scores(model, prompt, seqs, conts)  # the FSDP path
    assert batched.shape == scores.shape == (len(seqs), len(conts))
    for i, s in enumerate(seqs):
        for j, c in enumerate(conts):
            ref = _full_label_logprob(model, prompt, s, c)
            assert abs(scores[i, j].item() - ref) <= 1e-4 * max(1.0, abs(ref))
            assert abs(batched[i, j].item() - ref) <= 1e-4 * max(1.0, abs(ref))


@torch.no_grad()
def test_label_scores_with_shared_and_nested_label_prefixes(tiny):
    """score_continuations runs the labels as a trie in the input's pass: labels that share
    leading tokens, one label that is a prefix of another, one-token labels, rows of different
    lengths under different prompts. Each score equals a full forward over input + label."""
    from softprompt.readouts.words import label_trie as _continuation_trie

    model, tok = tiny
    a, b, c, d = (tok(w)["input_ids"][0] for w in (" no", " complaint", " late", " ok"))
    eos = tok.eos_token_id
    conts = [[a, b, eos], [a, c, eos], [a], [a, b], [d, b, eos], [eos]]
    tokens, parents, _, _ = _continuation_trie(conts)
    # nodes (a) (a b) (a c) (d) (d b): the shared prefix (a) runs once for four labels
    assert tokens == [a, b, c, d, b] and parents == [-1, 0, 0, -1, 3]
    prompts = torch.stack([init_prompt(model, tok, 3, "vocab", seed=s) for s in (4, 5)])
    seqs = [tok(f"Tweet text : {t} Label : ")["input_ids"] for t in TEXTS]
    ids, mask = collate_left(seqs, tok.pad_token_id)
    rows = torch.tensor([1, 0, 0, 1])
    scores = score_continuations(model, prompt_kv(model, prompts), ids, mask, conts, rows=rows)
    assert scores.shape == (len(seqs), len(conts))
    for i, s in enumerate(seqs):
        for j, cont in enumerate(conts):
            ref = _full_label_logprob(model, prompts[rows[i]], s, cont)
            assert abs(scores[i, j].item() - ref) <= 1e-4 * max(1.0, abs(ref)), (i, j)


@torch.no_grad()
def test_cached_generation_equals_uncached(tiny):
    model, tok = tiny
    prompt = init_prompt(model, tok, 4, "vocab", seed=2)
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    ids, mask = collate_left(seqs, tok.pad_token_id)
    got = generate(model, prompt_kv(model, prompt), ids, mask, max_new_tokens=8, eos_token_id=None)
    for s, g in zip(seqs, got, strict=True):
        cur = list(s)
        ref = []
        for _ in range(8):
            x = torch.tensor([cur])
            nxt = int(concat_forward(model, prompt, x, torch.ones_like(x))[0, -1].argmax())
            ref.append(nxt)
            cur.append(nxt)
        assert g == ref


@torch.no_grad()
def test_mixed_prompts_in_one_batch_equal_separate_runs(tiny):
    model, tok = tiny
    prompts = torch.stack([init_prompt(model, tok, 4, "vocab", seed=s) for s in (1, 2, 3)])
    seqs = [tok(f"Tweet text : {t} Label : ")["input_ids"] for t in TEXTS]
    conts = [label_token_ids(tok, n) for n in ("complaint", "no complaint")]
    ids, mask = collate_left(seqs, tok.pad_token_id)
    rows = torch.tensor([2, 0, 1, 2])
    mixed = score_continuations(model, prompt_kv(model, prompts), ids, mask, conts, rows=rows)
    for i, k in enumerate(rows.tolist()):
        one_ids, one_mask = collate_left([seqs[i]], tok.pad_token_id)
        alone = score_continuations(model, prompt_kv(model, prompts[k]), one_ids, one_mask, conts)
        assert torch.allclose(mixed[i], alone[0], rtol=1e-5, atol=1e-5)


def test_init_methods_shapes_and_errors(tiny):
    from softprompt.errors import SoftpromptError

    model, tok = tiny
    H = model.get_input_embeddings().weight.shape[1]
    for method in ("text", "labels", "vocab", "random"):
        p = init_prompt(model, tok, 7, method, label_names=["complaint", "no complaint"], seed=0)
        assert p.shape == (7, H) and p.dtype == torch.float32 and torch.isfinite(p).all()
    lab = init_prompt(model, tok, 3, "labels", label_names=["complaint", "no complaint"])
    emb = model.get_input_embeddings().weight
    first = emb[tok("complaint", add_special_tokens=False)["input_ids"]].float().mean(0)
    assert torch.allclose(lab[0], first)
    with pytest.raises(SoftpromptError, match="--init"):
        init_prompt(model, tok, 3, "nonsense")
    with pytest.raises(SoftpromptError, match="--num-virtual-tokens"):
        init_prompt(model, tok, 0, "text")


def test_base_model_weights_never_change(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, b = _batch(tok)
    prompt = init_prompt(model, tok, 4, "text").requires_grad_(True)
    opt = torch.optim.AdamW([prompt], lr=0.1)
    for _ in range(2):
        label_loss(model, prompt, **b).backward()
        opt.step()
        opt.zero_grad()
    assert all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@torch.no_grad()
def test_stacked_kv_of_separate_prompts_equals_each_alone(tiny):
    """KV computed once per prompt (as a server caches it), stacked, scored in one mixed batch;
    generation too."""
    from softprompt.forward.kv import stack_kv

    model, tok = tiny
    prompts = [init_prompt(model, tok, 4, "vocab", seed=s) for s in (1, 2, 3)]
    kvs = [prompt_kv(model, p) for p in prompts]
    seqs = [tok(f"Tweet text : {t} Label : ")["input_ids"] for t in TEXTS]
    conts = [label_token_ids(tok, n) for n in ("complaint", "no complaint", "maybe")]
    ids, mask = collate_left(seqs, tok.pad_token_id)
    rows = torch.tensor([1, 0, 2, 1])
    kv = stack_kv(kvs)
    mixed = score_continuations(model, kv, ids, mask, conts, rows=rows)
    gen = generate(model, kv, ids, mask, max_new_tokens=5, eos_token_id=None, rows=rows)
    for i, k in enumerate(rows.tolist()):
        one_ids, one_mask = collate_left([seqs[i]], tok.pad_token_id)
        alone = score_continuations(model, kvs[k], one_ids, one_mask, conts)
        assert torch.allclose(mixed[i], alone[0], rtol=1e-5, atol=1e-5)
        g1 = generate(model, kvs[k], one_ids, one_mask, max_new_tokens=5, eos_token_id=None)
        assert gen[i] == g1[0]


def test_packed_label_loss_equals_reference(tiny):
    """A batch whose rows differ a lot in length runs packed (several rows in one lane):
    loss, weighted loss, per-token losses (row-major) and the prompt gradient equal the plain
    concatenated forward."""
    from softprompt.forward.layout import pack_rows

    model, tok = tiny
    texts = TEXTS + ["a", "@ZephyrMobile " * 6, "hi there", "late " * 9]
    labels = LABELS + ["complaint", "no complaint", "no complaint", "complaint"]
    task = Task(text_column="Tweet text", label_names=["complaint", "no complaint"], max_length=64)
    b = collate_train(encode_rows(tok, task, texts, labels), tok.pad_token_id)
    lanes, _ = pack_rows([n - 1 for n in b["attention_mask"].sum(-1).tolist()])
    assert lanes < len(texts)  # really several rows in a lane
    prompt = init_prompt(model, tok, 5, "random", seed=6).requires_grad_(True)
    _assert_loss_and_gradient_equal_reference(model, prompt, b)
    with torch.no_grad():
        each = label_loss(model, prompt, **b, reduction="none")
        plain = label_loss(model, prompt, **b, reduction="none", shared_prefix=False)
        assert each.shape == plain.shape == ((b["labels"][:, 1:] != -100).sum(),)
        assert _close(each, plain)
        w = torch.linspace(0.5, 2.0, len(texts))
        assert _close(
            label_loss(model, prompt, **b, weights=w),
            label_loss(model, prompt, **b, weights=w, shared_prefix=False),
        )


def test_label_loss_over_several_lanes_each_with_the_prompt_equals_reference(tiny):
    """A batch too long for one lane runs in several, each starting with its own run of the
    prompt and head: the prompt's gradient sums over the lanes and still equals the reference."""
    from softprompt.forward.layout import lane_width, pack_rows

    model, tok = tiny
    texts = [(t + " ") * (1 + i % 4) for i, t in enumerate(TEXTS * 10)]
    labels = LABELS * 10
    task = Task(text_column="Tweet text", label_names=["complaint", "no complaint"], max_length=64)
    b = collate_train(encode_rows(tok, task, texts, labels), tok.pad_token_id)
    lengths = [n - 1 for n in b["attention_mask"].sum(-1).tolist()]
    assert pack_rows(lengths, lane_width(lengths, 5))[0] > 1  # really several lanes
    prompt = init_prompt(model, tok, 5, "random", seed=8).requires_grad_(True)
    _assert_loss_and_gradient_equal_reference(model, prompt, b)
    # one prompt per row runs each row after its own (padded): the same loss
    per_row = label_loss(model, prompt.detach()[None].expand(len(texts), -1, -1), **b)
    assert abs(float(per_row - label_loss(model, prompt.detach(), **b))) < 1e-5


def test_weighted_label_loss_is_the_weighted_mean_of_each_rows_tokens(tiny):
    """--balance: row i's tokens count w[i] times; checked against each row run alone."""
    from softprompt.training.setup import row_weights

    model, tok = tiny
    _, b = _batch(tok)
    prompt = init_prompt(model, tok, 5, "random", seed=4)
    w = torch.tensor(row_weights(LABELS[:3] + ["no complaint"] * 3, True)[:4])
    got = label_loss(model, prompt, **b, weights=w)
    sums, counts = [], []
    for i in range(len(TEXTS)):
        one = {k: v[i : i + 1] for k, v in b.items()}
        sums.append(label_loss(model, prompt, **one, reduction="sum"))
        counts.append((one["labels"][:, 1:] != -100).sum())
    want = sum(wi * s for wi, s in zip(w, sums, strict=True)) / sum(
        wi * c for wi, c in zip(w, counts, strict=True)
    )
    assert _close(got, want)
    assert _close(
        label_loss(model, prompt, **b, weights=torch.ones(4)), label_loss(model, prompt, **b)
    )
    # every class weighs the same in all: 2 complaints and 4 others -> 1.5 and 0.75 each
    assert row_weights(["a", "b", "b", "a", "b", "b"], True) == [1.5, 0.75, 0.75, 1.5, 0.75, 0.75]
    assert row_weights(["a", "b"], False) == [1.0, 1.0]


def test_shared_template_head_equals_plain_path(tiny):
    """The template's head run once with the prompt (and the last column skipped) gives the same
    loss and prompt gradient as running every row whole; so do label scores and generation."""
    from fast import generate_texts, label_probabilities

    model, tok = tiny
    task, b = _batch(tok)
    common = int((b["input_ids"] == b["input_ids"][:1]).all(0).long().cumprod(0).sum())
    assert common >= 2, "the rows share the template's first tokens"
    for P in (1, 5):
        prompt = init_prompt(model, tok, P, "random", seed=P).requires_grad_(True)
        fast = label_loss(model, prompt, **b)
        (g_fast,) = torch.autograd.grad(fast, prompt)
        plain = label_loss(model, prompt, **b, share_head=False)
        (g_plain,) = torch.autograd.grad(plain, prompt)
        ref = reference_loss(model, prompt, **b)
        (g_ref,) = torch.autograd.grad(ref, prompt)
        assert _close(fast.detach(), plain.detach()) and _close(fast.detach(), ref.detach())
        assert _close(g_fast, g_plain) and _close(g_fast, g_ref)
    # rows that share nothing (or a single row) fall back to the plain path
    one = {k: v[1:2] for k, v in b.items()}
    assert _close(
        label_loss(model, prompt, **one).detach(),
        reference_loss(model, prompt, **one).detach(),
    )
    texts = TEXTS + ["", "Label : x", " leading space", "Tweet"]
    with torch.no_grad():
        for K in (1, 3):
            p = torch.stack([init_prompt(model, tok, 4, "vocab", seed=s) for s in range(K)])
            p = p[0] if K == 1 else p
            for bs in (1, 3, 32):
                a = label_probabilities(model, tok, p, task, texts, batch_size=bs)
                c = label_probabilities(model, tok, p, task, texts, batch_size=bs, share_head=False)
                assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)
        p = init_prompt(model, tok, 4, "vocab", seed=0)
        g1 = generate_texts(model, tok, p, task, texts, max_new_tokens=4, batch_size=3)
        g2 = generate_texts(
            model, tok, p, task, texts, max_new_tokens=4, batch_size=3, share_head=False
        )
        assert g1 == g2


def test_common_prefix_length_checks_every_row():
    from softprompt.data import common_prefix_length

    head = [5, 6, 7, 8]
    assert common_prefix_length([[5, 6, 7, 9, 1], [5, 6, 7, 8, 2]], head) == 3
    assert common_prefix_length([[5, 6, 7, 8, 1], [5, 6]], head) == 1  # each row keeps a token
    assert common_prefix_length([[5, 6, 7, 8], [4, 6, 7, 8]], head) == 0
    assert common_prefix_length([[5, 6, 7, 8, 9]], []) == 0

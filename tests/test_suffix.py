"""Suffix soft tokens (--suffix-tokens): prompt vectors that run right after the text.

Every path is checked against a reference built here by hand: the rows' embeddings with the
suffix vectors put in place, run through the model's plain forward (no softprompt helper)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fast import generate_texts, label_probabilities, score_continuations
from softprompt.adapters import SUFFIX_NAME, load_adapter, save_adapter
from softprompt.cli import main
from softprompt.data import (
    Task,
    collate_left,
    collate_train,
    encode_rows,
    input_budget,
    input_token_ids,
    label_token_ids,
    suffix_placeholders,
)
from softprompt.errors import SoftpromptError
from softprompt.forward.kv import prompt_kv
from softprompt.pipeline import SoftPrompt
from softprompt.prompt import init_prompt
from softprompt.readouts.words import label_loss
from test_cli import train_args
from test_model import LABELS, TEXTS, _close, tweet_task

P, S = 3, 2


def _by_hand(model, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """[P + len(ids), H]: the prompt's first P vectors, then the row with placeholder -k
    replaced by the prompt's k-th vector from the end."""
    emb = model.get_input_embeddings()
    n = prompt.shape[0]
    rows = [prompt[n + i] if i < 0 else emb.weight[i] for i in ids]
    return torch.cat([prompt[: n - S], torch.stack(rows)])


def _logits(model, embeds: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=embeds[None]).logits[0]


def test_placeholders_sit_between_the_text_and_the_rest_of_the_template(tokenizer):
    task = tweet_task(S)
    ids = input_token_ids(tokenizer, task, "thanks!", 40)
    head = tokenizer("Tweet text : thanks!")["input_ids"]
    tail = tokenizer(" Label : ", add_special_tokens=False)["input_ids"]
    assert ids == head + suffix_placeholders(S) + tail
    assert suffix_placeholders(S) == [-2, -1]
    # a long text is cut, the placeholders and the template's tail never are; like the prompt
    # in front, the suffix tokens do not count against the budget (PEFT's max_length)
    cut = input_token_ids(tokenizer, task, TEXTS[2] * 5, 20)
    assert cut[-len(tail) - S :] == suffix_placeholders(S) + tail
    assert 20 - 2 <= len(cut) - S <= 20
    assert Task.from_dict(task.to_dict()).suffix_tokens == S


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["packed", "concatenated"])
def test_loss_and_gradient_equal_the_hand_built_forward(tiny, shared_prefix):
    model, tok = tiny
    rows = encode_rows(tok, tweet_task(S), TEXTS, LABELS)
    b = collate_train(rows, tok.pad_token_id)
    prompt = init_prompt(model, tok, P + S, "random", seed=4).requires_grad_(True)
    fast = label_loss(model, prompt, **b, shared_prefix=shared_prefix)
    (g_fast,) = torch.autograd.grad(fast, prompt)

    losses = []
    for r in rows:
        logits = _logits(model, _by_hand(model, prompt, r.input_ids + r.label_ids))[P:]
        start = len(r.input_ids)
        target = torch.tensor(r.label_ids)
        pred = logits[start - 1 : start - 1 + len(r.label_ids)]
        losses.append(F.cross_entropy(pred.float(), target, reduction="none"))
    ref = torch.cat(losses).mean()
    (g_ref,) = torch.autograd.grad(ref, prompt)
    assert _close(fast.detach(), ref.detach())
    assert _close(g_fast, g_ref)
    assert g_fast[:P].abs().sum() > 0 and g_fast[P:].abs().sum() > 0  # both parts train


@torch.no_grad()
def test_label_scores_equal_the_hand_built_forward(tiny):
    model, tok = tiny
    task = tweet_task(S)
    prompt = init_prompt(model, tok, P + S, "vocab", seed=1)
    budget = input_budget(tok, task)
    seqs = [input_token_ids(tok, task, t, budget) for t in TEXTS]
    conts = [label_token_ids(tok, n) for n in task.label_names]
    ids, mask = collate_left(seqs, tok.pad_token_id)
    scores = score_continuations(
        model, prompt_kv(model, prompt[:P]), ids, mask, conts, prompts=prompt
    )
    for i, s in enumerate(seqs):
        for j, c in enumerate(conts):
            logp = _logits(model, _by_hand(model, prompt, s + c))[P:].float().log_softmax(-1)
            want = sum(logp[len(s) - 1 + k, t].item() for k, t in enumerate(c))
            assert abs(scores[i, j].item() - want) < 1e-4
    # the library's classifier (template head run once, length-sorted batches) agrees
    probs = label_probabilities(model, tok, prompt, task, TEXTS, batch_size=3)
    assert torch.allclose(probs, torch.softmax(scores, -1), atol=1e-5)


@torch.no_grad()
def test_an_ensemble_of_suffix_prompts_is_the_mean_of_its_members(tiny):
    model, tok = tiny
    task = tweet_task(S)
    members = [init_prompt(model, tok, P + S, "vocab", seed=s) for s in (1, 2, 3)]
    mixed = label_probabilities(model, tok, torch.stack(members), task, TEXTS)
    alone = torch.stack([label_probabilities(model, tok, m, task, TEXTS) for m in members])
    assert torch.allclose(mixed, alone.mean(0), atol=1e-5)


@torch.no_grad()
def test_cached_generation_equals_greedy_on_the_hand_built_forward(tiny):
    model, tok = tiny
    task = tweet_task(S)
    prompt = init_prompt(model, tok, P + S, "vocab", seed=2)
    got = generate_texts(model, tok, prompt, task, TEXTS, max_new_tokens=5)
    budget = input_budget(tok, task)
    for text, g in zip(TEXTS, got, strict=True):
        cur = input_token_ids(tok, task, text, budget)
        new = []
        for _ in range(5):
            nxt = int(_logits(model, _by_hand(model, prompt, cur))[-1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            cur = cur + [nxt]
        assert g == tok.decode(new, skip_special_tokens=True).strip()


def test_adapter_keeps_the_front_in_peft_format_and_the_suffix_beside_it(tiny, tmp_path):
    model, tok = tiny
    prompt = init_prompt(model, tok, P + S, "random", seed=5)
    conf = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P + S}
    folder = save_adapter(tmp_path / "a", prompt, conf, tweet_task(S))
    peft_file = load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(peft_file, prompt[:P])
    assert json.loads((folder / "adapter_config.json").read_text())["num_virtual_tokens"] == P
    back = load_adapter(folder)
    assert torch.equal(back.prompt, prompt) and back.task.suffix_tokens == S
    # a plain save into the same folder removes the stale suffix file
    plain = {**conf, "num_virtual_tokens": P}
    save_adapter(folder, prompt[:P], plain, Task(text_column="t", label_names=["a", "b"]))
    assert not (folder / SUFFIX_NAME).exists() and load_adapter(folder).prompt.shape[0] == P
    # the suffix file missing while softprompt.json announces it: a clear error
    save_adapter(folder, prompt, conf, tweet_task(S))
    (folder / SUFFIX_NAME).unlink()
    with pytest.raises(SoftpromptError, match="softprompt_suffix.safetensors is missing"):
        load_adapter(folder)


def test_peft_refuses_a_suffix_adapter_instead_of_loading_half_of_it(tiny, tmp_path):
    """PEFT would place only the tokens in front and score with another model than ours: its
    peft_type makes PEFT refuse it, while softprompt loads it whole."""
    from peft import PeftModel

    from softprompt.adapters import SUFFIX_PEFT_TYPE
    from softprompt.peft_format import peft_config

    model, tok = tiny
    prompt = init_prompt(model, tok, P + S, "random", seed=5)
    conf = peft_config(model, prompt[:P], base_model=None, init="random", init_text=None, tokenizer_name=None)  # fmt: skip
    folder = save_adapter(tmp_path / "a", prompt, conf, tweet_task(S))
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == SUFFIX_PEFT_TYPE
    with pytest.raises(KeyError, match=SUFFIX_PEFT_TYPE):
        PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    assert torch.equal(load_adapter(folder).prompt, prompt)
    # saved again without suffix tokens, it is a plain PEFT adapter once more
    save_adapter(folder, prompt[:P], conf, Task(text_column="t", label_names=["a", "b"]))
    peft = PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    assert peft.peft_config["default"].num_virtual_tokens == P


def test_train_with_suffix_tokens_reloads_and_classifies(tmp_path, tiny_model_dir, demo_train):
    out = tmp_path / "run"
    argv = train_args(demo_train, tiny_model_dir, out, "--epochs", "1", "--suffix-tokens", "2")
    assert main(argv) == 0
    a = load_adapter(out)
    assert a.task.suffix_tokens == 2 and a.prompt.shape[0] == 8 + 2
    assert load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"].shape[0] == 8
    sp = SoftPrompt.load(str(out))
    got = sp.classify(TEXTS)
    assert [g["label"] for g in got] == [
        sp.task.label_names[i]
        for i in label_probabilities(sp.model, sp.tokenizer, a.prompt, a.task, TEXTS)
        .argmax(-1)
        .tolist()
    ]

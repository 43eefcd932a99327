"""Calibration maths, and ensembles of prompts scored in one batch."""

from __future__ import annotations

import random

import pytest
import torch

from fast import label_probabilities
from softprompt.calibrate import _macro_f1, apply_bias, content_free_bias, fit_bias
from softprompt.data import Task
from softprompt.metrics import metrics
from softprompt.prompt import init_prompt


def _probs(n: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, L, generator=g) * 2, -1)


def test_apply_bias_is_softmax_of_shifted_log_probs():
    p = _probs(20, 3, 0)
    assert torch.allclose(apply_bias(p, [0.0, 0.0, 0.0]), p, atol=1e-6)
    b = torch.tensor([0.5, -1.0, 2.0])
    want = torch.exp(p.log() + b) / torch.exp(p.log() + b).sum(-1, keepdim=True)
    assert torch.allclose(apply_bias(p, b), want, atol=1e-6)
    assert apply_bias(p, None) is p


def test_content_free_bias_makes_the_mean_content_free_input_uniform():
    cf = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    b = content_free_bias(cf)
    mean = cf.mean(0, keepdim=True)
    assert torch.allclose(apply_bias(mean, b), torch.full((1, 2), 0.5), atol=1e-6)
    assert sum(b) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fit_bias_binary_finds_the_best_threshold(seed):
    rng = random.Random(seed)
    gold = [0 if rng.random() < 0.35 else 1 for _ in range(80)]
    # a skewed model: right more often than not, but biased towards label 1
    logit = torch.tensor([(1.0 if y == 0 else -1.0) + rng.gauss(-1.2, 1.5) for y in gold])
    p = torch.stack([torch.sigmoid(logit), 1 - torch.sigmoid(logit)], -1)
    names = ["a", "b"]

    def f1_with(b):
        pred = apply_bias(p, b).argmax(-1).tolist()
        return metrics([names[y] for y in gold], [names[i] for i in pred], names)["macro_f1"]

    b = fit_bias(p, gold)
    assert b[0] == 0.0
    # brute force over every threshold on the log-odds
    lo = (p[:, 1].log() - p[:, 0].log()).tolist()
    best = max(f1_with([0.0, -t + d]) for t in lo for d in (-1e-4, 1e-4))
    assert f1_with(b) == pytest.approx(best)
    assert f1_with(b) >= f1_with([0.0, 0.0])


def test_fit_bias_multiclass_never_worse_than_no_bias():
    g = torch.Generator().manual_seed(5)
    gold = torch.randint(0, 3, (120,), generator=g).tolist()
    p = _probs(120, 3, 7) + torch.nn.functional.one_hot(torch.tensor(gold), 3) * 0.3
    p = p / p.sum(-1, keepdim=True) * torch.tensor([0.2, 1.0, 1.0])  # label 0 under-predicted
    p = p / p.sum(-1, keepdim=True)
    names = ["x", "y", "z"]

    def f1_with(b):
        pred = apply_bias(p, b).argmax(-1).tolist()
        return metrics([names[y] for y in gold], [names[i] for i in pred], names)["macro_f1"]

    assert f1_with(fit_bias(p, gold)) > f1_with([0.0, 0.0, 0.0])


@pytest.mark.parametrize("seed", range(6))
def test_fit_bias_macro_f1_equals_scikit_learn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    L = 2 + seed % 3
    gold = torch.randint(0, L, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g)
    pred = torch.randint(0, L, gold.shape, generator=g)
    if seed % 2:
        gold = gold.clamp_max(L - 2)  # label L-1 is never gold
    if seed % 3 == 0:
        pred = pred.clamp_min(1)  # label 0 is never predicted
    want = sk.f1_score(gold, pred, labels=list(range(L)), average="macro", zero_division=0)
    assert _macro_f1(gold, pred, L) == pytest.approx(want, abs=1e-12)


def test_ensemble_equals_the_mean_of_its_members(tiny):
    model, tok = tiny
    task = Task(text_column="Tweet text", label_names=["complaint", "no complaint", "other"])
    members = [init_prompt(model, tok, 4, "vocab", seed=s) for s in range(3)]
    texts = ["my parcel never arrived and nobody answers", "thanks", "ok then", ""]
    each = [label_probabilities(model, tok, m, task, texts, batch_size=3) for m in members]
    ens = label_probabilities(model, tok, torch.stack(members), task, texts, batch_size=3)
    assert torch.allclose(ens, torch.stack(each).mean(0), atol=1e-5)
    assert not torch.allclose(each[0], each[1], atol=1e-3)  # the members do differ


def _adapter(tmp_path, name, model, tok, P, seed, labels=("complaint", "no complaint")):
    from softprompt.adapters import save_adapter
    from softprompt.peft_format import peft_config

    prompt = init_prompt(model, tok, P, "vocab", seed=seed)
    conf = peft_config(
        model, prompt, base_model=None, init="vocab", init_text=None, tokenizer_name=None
    )
    save_adapter(tmp_path / name, prompt, conf, Task(text_column="text", label_names=list(labels)))
    return str(tmp_path / name)


def test_softprompt_ensemble_classifies_by_the_mean_and_refuses_mismatches(tiny, tmp_path):
    from softprompt.adapters import load_adapter
    from softprompt.errors import SoftpromptError
    from softprompt.pipeline import SoftPrompt

    model, tok = tiny
    paths = [_adapter(tmp_path, f"m{i}", model, tok, 4, seed=i) for i in range(3)]
    texts = ["the train is late again", "lovely day", ""]
    alone = [SoftPrompt(load_adapter(p), model, tok).classify(texts) for p in paths]
    first = load_adapter(paths[0])
    ens = SoftPrompt(first, model, tok, [load_adapter(p) for p in paths[1:]])
    assert ens.ensemble_size == 3
    for i, out in enumerate(ens.classify(texts)):
        for name, p in out["probabilities"].items():
            assert p == pytest.approx(sum(a[i]["probabilities"][name] for a in alone) / 3, abs=1e-5)
    with pytest.raises(SoftpromptError, match="ensemble"):
        ens.generate(texts)
    longer = _adapter(tmp_path, "long", model, tok, 5, seed=9)
    # members of other prompt lengths may join: each runs in its own packed pass
    mixed = SoftPrompt(first, model, tok, [load_adapter(longer)]).classify(texts)
    solo = SoftPrompt(load_adapter(longer), model, tok).classify(texts)
    for i, out in enumerate(mixed):
        for name, p in out["probabilities"].items():
            want = (alone[0][i]["probabilities"][name] + solo[i]["probabilities"][name]) / 2
            assert p == pytest.approx(want, abs=1e-5)
    other = _adapter(tmp_path, "other", model, tok, 4, seed=9, labels=("a", "b"))
    with pytest.raises(SoftpromptError, match="labels"):
        SoftPrompt(first, model, tok, [load_adapter(other)])

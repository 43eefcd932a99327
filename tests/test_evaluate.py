"""Metrics against scikit-learn, and the public SoftPrompt API on a tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from softprompt.adapters import load_adapter, peft_config, save_adapter
from softprompt.data import Task
from softprompt.evaluate import metrics
from softprompt.pipeline import SoftPrompt
from softprompt.prompt import init_prompt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(seed)
    names = ["complaint", "no complaint", "maybe"]
    gold = [rng.choice(names) for _ in range(200)]
    pred = [g if rng.random() < 0.6 else rng.choice(names) for g in gold]
    m = metrics(gold, pred, names)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(gold, pred, labels=names, average="macro"))
    assert m["confusion_matrix"]["matrix"] == sk.confusion_matrix(gold, pred, labels=names).tolist()
    p, r, f, s = sk.precision_recall_fscore_support(gold, pred, labels=names, zero_division=0)
    for i, n in enumerate(names):
        assert m["per_class"][n]["precision"] == pytest.approx(p[i])
        assert m["per_class"][n]["recall"] == pytest.approx(r[i])
        assert m["per_class"][n]["f1"] == pytest.approx(f[i])
        assert m["per_class"][n]["support"] == s[i]


def test_invalid_generations_count_as_wrong():
    m = metrics(["a", "b", "a"], ["a", "b?", "zzz"], ["a", "b"])
    assert m["invalid"] == 2 and m["accuracy"] == pytest.approx(1 / 3)


def test_softprompt_api_classify_generate_evaluate(tiny, tmp_path):
    model, tok = tiny
    prompt = init_prompt(model, tok, 4, "vocab", seed=0)
    task = Task(text_column="Tweet text", label_names=["complaint", "no complaint"])
    conf = peft_config(
        model, prompt, base_model=None, init="vocab", init_text=None, tokenizer_name=None
    )
    save_adapter(tmp_path / "a", prompt, conf, task)
    sp = SoftPrompt(load_adapter(tmp_path / "a"), model, tok)
    texts = ["my parcel never arrived", "thanks a lot", "ok"]
    out = sp.classify(texts)
    assert [set(o["probabilities"]) for o in out] == [set(task.label_names)] * 3
    for o in out:
        assert sum(o["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert o["label"] == max(o["probabilities"], key=o["probabilities"].get)
    # batching and the cached prompt KV do not change the answer
    one_by_one = [sp.classify([t])[0]["probabilities"] for t in texts]
    for a, b in zip(out, one_by_one, strict=True):
        assert a["probabilities"] == pytest.approx(b, abs=1e-5)
    gen = sp.generate(texts, max_new_tokens=3)
    assert len(gen) == 3 and all(isinstance(g, str) for g in gen)
    m = sp.evaluate(texts, ["complaint", "no complaint", "no complaint"])
    assert m["method"] == "label_scoring" and sum(map(sum, m["confusion_matrix"]["matrix"])) == 3
    assert torch.equal(sp.prompt, prompt)

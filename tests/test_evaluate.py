"""Metrics against scikit-learn, and the public SoftPrompt API on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from softprompt.adapters import load_adapter, save_adapter
from softprompt.data import Task
from softprompt.metrics import metrics
from softprompt.peft_format import peft_config
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


def test_metrics_by_hand_with_labels_never_predicted_never_gold_and_invalid():
    # c is gold once and never predicted, d is predicted once and never gold, e appears nowhere,
    # and "x" is not a label (wrong, and counted as invalid)
    names = ["a", "b", "c", "d", "e"]
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "d", "b", "b", "x", "a"]
    m = metrics(gold, pred, names)
    assert m["confusion_matrix"] == {
        "labels": names,
        "matrix": [[1, 1, 0, 1, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5, [0] * 5],
    }
    want = {  # precision, recall, f1, support
        "a": (1 / 2, 1 / 3, 2 / 5, 3),  # 1 right of 2 predicted a, of 3 gold a
        "b": (1 / 2, 1 / 2, 1 / 2, 2),
        "c": (0.0, 0.0, 0.0, 1),
        "d": (0.0, 0.0, 0.0, 0),
        "e": (0.0, 0.0, 0.0, 0),
    }
    for name, (p, r, f, s) in want.items():
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
        assert got["support"] == s and type(got["support"]) is int
    assert m["macro_f1"] == pytest.approx((2 / 5 + 1 / 2) / 5)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert (m["invalid"], m["n"]) == (1, 6)
    json.dumps(m)  # plain Python numbers, not numpy's


def test_metrics_of_no_rows_are_zero_and_unknown_gold_labels_are_refused():
    m = metrics([], [], ["a", "b"])
    assert (m["accuracy"], m["macro_f1"], m["n"], m["invalid"]) == (0.0, 0.0, 0, 0)
    assert m["confusion_matrix"]["matrix"] == [[0, 0], [0, 0]]
    assert m["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    with pytest.raises(ValueError, match="'c'"):
        metrics(["a", "c"], ["a", "a"], ["a", "b"])
    with pytest.raises(ValueError, match="2 gold labels but 1 prediction"):
        metrics(["a", "b"], ["a"], ["a", "b"])


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

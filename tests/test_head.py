"""Classification heads (`--head linear|pooled`): what they read equals a plain forward pass in
every layout and door, PEFT's SEQ_CLS format both ways, training and its files, refusals."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch

from softprompt.adapters import load_adapter, save_adapter
from softprompt.cli import main
from softprompt.data import Task, encode_rows
from softprompt.engine import Engine
from softprompt.errors import SoftpromptError
from softprompt.forward.kv import prefix_to_kv
from softprompt.forward.reference import reference_inputs
from softprompt.peft_format import peft_config, prefix_config
from softprompt.predictors import ClassifyRow, predictor_for_prompt
from softprompt.prompt import init_prefix, init_prompt
from softprompt.readouts.head import (
    ClassifierHead,
    RowFeatures,
    fit_pooled_head,
    head_starts,
    label_word_head,
    pooled_layers,
    rows_features,
)
from test_cli import train_args
from test_model import tweet_task

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "where is my parcel, ordered two weeks ago",
    "thanks!",
    "@Foo the app crashed again and again",
    "lovely day at the beach",
]
LABELS = ["complaint", "no complaint", "complaint", "no complaint"]
LAYER = 1  # the tiny models have 2 layers; a pooled head never reads the last (normed) one


def _heads(H: int, seed: int = 0) -> tuple[ClassifierHead, ClassifierHead]:
    g = torch.Generator().manual_seed(seed)
    pooled = ClassifierHead(
        "pooled",
        torch.randn(2, H, generator=g),
        torch.randn(2, generator=g),
        torch.randn(1, H, generator=g),
        torch.rand(1, H, generator=g) + 0.5,
        (LAYER,),
    )
    return pooled, ClassifierHead("linear", torch.randn(2, H, generator=g))


def _reference(model, prompt, task, tok, kind="prompt") -> RowFeatures:
    """The spec: each row alone, one plain forward over prompt + row with transformers'
    hidden states; the last row token's final state, the text positions' mean at LAYER."""
    rows = encode_rows(tok, task, TEXTS, LABELS)
    starts = head_starts([r.input_ids for r in rows], tok(task.head())["input_ids"]).tolist()
    last, pooled = [], []
    for r, st in zip(rows, starts, strict=True):
        ids = torch.tensor([r.input_ids])
        with torch.no_grad():
            if kind == "prefix":
                from transformers import DynamicCache

                kv = prefix_to_kv(model, prompt)
                P = kv[0][0].shape[2]
                out = model.get_decoder()(
                    input_ids=ids,
                    attention_mask=torch.ones(1, P + ids.shape[1], dtype=torch.long),
                    position_ids=torch.arange(P, P + ids.shape[1])[None],
                    past_key_values=DynamicCache(ddp_cache_data=list(kv)),
                    output_hidden_states=True,
                )
                P = 0
            else:
                e, m, P = reference_inputs(model, prompt, ids, torch.ones_like(ids))
                out = model.get_decoder()(
                    inputs_embeds=e, attention_mask=m, output_hidden_states=True
                )
        last.append(out.last_hidden_state[0, -1])
        pooled.append(out.hidden_states[LAYER][0, P + st :].mean(0))
    return RowFeatures(torch.stack(last), {LAYER: torch.stack(pooled)})


def _prompt(model, tok, kind: str, suffix: int = 0):
    if kind == "prefix":
        return init_prefix(model, tok, 4, "random", seed=1)
    return init_prompt(model, tok, 4 + suffix, "random", seed=1)


CASES = [("prompt", 0), ("prompt", 3), ("prefix", 0)]


@pytest.mark.parametrize("kind,suffix", CASES)
def test_training_features_equal_a_plain_forward_packed_and_padded(tiny, kind, suffix):
    model, tok = tiny
    task = tweet_task(suffix)
    prompt = _prompt(model, tok, kind, suffix)
    rows = encode_rows(tok, task, TEXTS, LABELS)
    head_ids = tok(task.head())["input_ids"]
    ref = _reference(model, prompt, task, tok, kind)
    heads = _heads(model.get_input_embeddings().weight.shape[1])
    for packed in (True, False):
        f = rows_features(model, prompt, rows, heads, head_ids, kind, packed)
        assert torch.allclose(f.last, ref.last, atol=1e-5), packed
        assert torch.allclose(f.pooled[LAYER], ref.pooled[LAYER], atol=1e-5), packed


@pytest.mark.parametrize("kind,suffix", CASES)
def test_engine_answers_as_the_reference_and_mixed_batches_as_alone(tiny, kind, suffix):
    model, tok = tiny
    task = tweet_task(suffix)
    prompt = _prompt(model, tok, kind, suffix)
    ref = _reference(model, prompt, task, tok, kind)
    engine = Engine(model, tok)
    pooled, linear = _heads(model.get_input_embeddings().weight.shape[1])
    label = predictor_for_prompt(model, tok, prompt, task, kind=kind)
    preds = [
        predictor_for_prompt(model, tok, prompt, task, kind=kind, head=h) for h in (pooled, linear)
    ]
    alone = {}
    for p, h in zip(preds, (pooled, linear), strict=True):
        alone[p.name + h.kind] = got = engine.classify(p, TEXTS)
        want = torch.softmax(h(ref), -1)
        assert torch.allclose(got, want, atol=1e-5), h.kind
    alone["label"] = engine.classify(label, TEXTS)
    rows = [ClassifyRow(p, engine.encode(p, t)[0]) for t in TEXTS for p in (label, *preds)]
    mixed = torch.stack(engine.label_probabilities(rows)).view(len(TEXTS), 3, 2)
    assert torch.allclose(mixed[:, 0], alone["label"], atol=1e-6)
    assert torch.allclose(mixed[:, 1], alone[preds[0].name + "pooled"], atol=1e-6)
    assert torch.allclose(mixed[:, 2], alone[preds[1].name + "linear"], atol=1e-6)


def test_a_pooled_only_batch_stops_after_its_layer(tiny):
    """A pooled head reads middle layers only: the rows' pass ends there (the prompt's keys and
    values, cached once, still come from every layer), with the same answer."""
    from softprompt.modeling.load import decoder_layers

    model, tok = tiny
    task = tweet_task()
    prompt = _prompt(model, tok, "prompt")
    pooled, _ = _heads(model.get_input_embeddings().weight.shape[1])
    engine = Engine(model, tok)
    predictor = predictor_for_prompt(model, tok, prompt, task, head=pooled)
    engine.classify(predictor, TEXTS[:1])  # caches the prompt's KV
    calls = []
    handle = decoder_layers(model)[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = engine.classify(predictor, TEXTS)
    finally:
        handle.remove()
    assert not calls  # the last layer never ran
    ref = _reference(model, prompt, task, tok)
    assert torch.allclose(got, torch.softmax(pooled(ref), -1), atol=1e-5)


def test_the_linear_head_starts_from_the_label_words_rows(tiny):
    model, tok = tiny
    head = label_word_head(model, tok, ["complaint", "no complaint"])
    first = [tok("complaint", add_special_tokens=False)["input_ids"][0],
             tok("no complaint", add_special_tokens=False)["input_ids"][0]]  # fmt: skip
    W = model.get_output_embeddings().weight
    assert first[0] != first[1]
    assert torch.equal(head.weight.detach(), W[first].float())
    x = torch.randn(3, W.shape[1])  # its logits are the LM head's logits of those tokens
    assert torch.allclose(
        head(RowFeatures(x)), model.get_output_embeddings()(x)[:, first], atol=1e-6
    )


def test_the_pooled_head_starts_as_a_logistic_regression_probe():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g) * torch.tensor([1, 10, 100, 1, 1, 1.0]) + 3
    y = (x[:, 0] + x[:, 1] / 10 > 3).long().tolist()
    x2 = 50 * x.flip(-1) + 7  # a second layer, on another scale
    feats = {1: x, 2: x2}
    head = fit_pooled_head(feats, y, 2, (1, 2))
    # each layer standardised on its own, then averaged: what the probe reads
    z = ((x - x.mean(0)) / x.std(0, unbiased=False) + (x2 - x2.mean(0)) / x2.std(0, unbiased=False)) / 2  # fmt: skip
    z = z.numpy()
    clf = LogisticRegression(C=0.1, max_iter=5000).fit(z, y)
    ours = head(RowFeatures(None, feats)).argmax(-1)
    assert ours.tolist() == clf.predict(z).tolist()
    logits = head(RowFeatures(None, feats))
    odds = torch.tensor(clf.decision_function(z), dtype=torch.float32)
    assert torch.allclose(logits[:, 1] - logits[:, 0], odds, atol=1e-3)


def test_pooled_layers_are_a_middle_band_never_the_last():
    from unittest import mock

    for n, want in ((30, (12, 21)), (18, (7, 13)), (2, (1, 1))):
        with mock.patch("softprompt.modeling.load.decoder_layers", lambda m, n=n: [0] * n):
            got = pooled_layers(object())
        assert (got[0], got[-1]) == want and n not in got


# --------------------------------------------------------------------------- files and PEFT


def _save(tmp_path, model, tok, kind, head, suffix=0, name="a"):
    prompt = _prompt(model, tok, kind, suffix)
    if kind == "prefix":
        conf = prefix_config(model, prompt, base_model=None, projection=False)
    else:
        conf = peft_config(model, prompt[: prompt.shape[0] - suffix], base_model=None,
                           init="random", init_text=None, tokenizer_name=None)  # fmt: skip
    return prompt, save_adapter(tmp_path / name, prompt, conf, tweet_task(suffix), head=head)


@pytest.mark.parametrize("kind", ["pooled", "linear"])
def test_head_adapters_reload_exactly(tiny, tmp_path, kind):
    model, tok = tiny
    pooled, linear = _heads(model.get_input_embeddings().weight.shape[1])
    head = pooled if kind == "pooled" else linear
    prompt, folder = _save(tmp_path, model, tok, "prompt", head, suffix=3)
    a = load_adapter(folder)
    assert torch.equal(a.prompt, prompt)
    assert a.head.kind == kind and a.head.layers == head.layers
    for k, v in head.tensors().items():
        assert torch.equal(a.head.tensors()[k], v)
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["task_type"] == ("SEQ_CLS" if kind == "linear" else "SOFTPROMPT_POOLED_CLS")


def test_peft_loads_our_seq_cls_prompt_adapter_with_equal_probabilities(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model, tok = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    _, linear = _heads(model.get_input_embeddings().weight.shape[1])
    _, folder = _save(tmp_path, model, tok, "prompt", linear)
    engine = Engine(model, tok)
    ours = engine.classify(engine.predictor([load_adapter(folder)]), TEXTS)
    seq = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    pm = PeftModel.from_pretrained(seq, str(folder)).eval()
    theirs = []
    for t in TEXTS:  # one text at a time: PEFT reads the last position
        with torch.no_grad():
            theirs.append(torch.softmax(pm(**tok(tweet_task().render(t), return_tensors="pt")).logits[0], -1))  # fmt: skip
    assert torch.allclose(ours, torch.stack(theirs), atol=1e-5)


def test_peft_loads_our_seq_cls_prefix_adapter_with_its_head(tiny, tmp_path):
    """PEFT reads our prefix + score adapter (its weights land where PEFT puts them); PEFT 0.21
    itself cannot run SEQ_CLS prefix tuning on transformers 5 (it looks for `past_key_values`
    in the model's signature), so the probabilities are checked in softprompt's tests only."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model, tok = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    _, linear = _heads(model.get_input_embeddings().weight.shape[1])
    prompt, folder = _save(tmp_path, model, tok, "prefix", linear)
    seq = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    pm = PeftModel.from_pretrained(seq, str(folder))
    score = dict(pm.named_parameters())["base_model.score.modules_to_save.default.weight"]
    assert torch.equal(score.detach(), linear.weight.detach())
    assert torch.equal(pm.get_prompt_embedding_to_save("default"), prompt)


def test_we_load_a_peft_trained_seq_cls_adapter_as_peft_scores(tiny, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model, tok = tiny
    base = tmp_path / "base"
    model.save_pretrained(base)
    seq = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    pm = get_peft_model(seq, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=5))
    with torch.no_grad():  # as if trained: nothing at its init
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    theirs = []
    for t in TEXTS:
        with torch.no_grad():
            theirs.append(torch.softmax(pm(**tok(tweet_task().render(t), return_tensors="pt")).logits[0], -1))  # fmt: skip
    adapter = load_adapter(tmp_path / "peft")
    assert adapter.task is None and adapter.head.kind == "linear"
    adapter.task = tweet_task()  # PEFT saves no label names: --labels gives them
    engine = Engine(model, tok)
    ours = engine.classify(engine.predictor([adapter]), TEXTS)
    assert torch.allclose(ours, torch.stack(theirs), atol=1e-5)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])  # prefix: the default's form
def test_peft_refuses_a_pooled_head_adapter(tiny, tmp_path, kind):
    from peft import PeftModel

    model, tok = tiny
    pooled, _ = _heads(model.get_input_embeddings().weight.shape[1])
    _, folder = _save(tmp_path, model, tok, kind, pooled)
    with pytest.raises(ValueError, match="SOFTPROMPT_POOLED_CLS"):
        PeftModel.from_pretrained(copy.deepcopy(model), str(folder))


def test_a_head_for_another_width_or_label_count_is_refused_in_one_line(tiny, tmp_path):
    model, tok = tiny
    H = model.get_input_embeddings().weight.shape[1]
    pooled, _ = _heads(H + 8)
    prompt = _prompt(model, tok, "prompt")
    conf = peft_config(model, prompt, base_model=None, init="random", init_text=None, tokenizer_name=None)  # fmt: skip
    save_adapter(tmp_path / "wide", prompt, conf, tweet_task(), head=pooled)
    engine = Engine(model, tok)
    with pytest.raises(SoftpromptError) as e:
        engine.predictor([load_adapter(tmp_path / "wide")])
    assert f"width {H + 8}" in str(e.value) and f"hidden size is {H}" in str(e.value)
    assert "\n" not in str(e.value)
    three = Task(text_column="Tweet text", label_names=["a", "b", "c"])
    _, linear = _heads(H)
    save_adapter(tmp_path / "two", prompt, conf, three, head=linear)
    with pytest.raises(SoftpromptError) as e:
        engine.predictor([load_adapter(tmp_path / "two")])
    assert "scores 2 labels" in str(e.value) and "3 are given" in str(e.value)


# --------------------------------------------------------------------------- training, doors


def _cli(*argv: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(list(argv)) == 0
    return buf.getvalue()


@pytest.mark.parametrize("head", ["pooled", "linear"])
def test_train_with_a_head_then_eval_predict_and_refuse_generation(
    head, tmp_path, tiny_model_dir, demo_train, demo_test, capsys
):
    out = tmp_path / "run"
    log = _cli(*train_args(demo_train, tiny_model_dir, out, "--head", head, "--suffix-tokens", "2"))
    assert "eval_macro_f1" in log
    a = load_adapter(out)
    assert a.head.kind == head
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record[-1]["train_loss"] < record[0]["train_loss"] * 1.5
    m = json.loads(_cli("eval", str(out), "--data", str(demo_test), "--no-progress"))
    assert m["n"] == 80 and m["invalid"] == 0 and m["method"] == "head" and m["head"] == head
    rows = [json.loads(x) for x in _cli("predict", str(out), "my parcel is late", "--no-progress").splitlines()]  # fmt: skip
    assert abs(sum(v for k, v in rows[0].items() if k.startswith("p(")) - 1) < 1e-4
    capsys.readouterr()
    assert main(["predict", str(out), "hi", "--generate", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "classification head" in err and len(err.splitlines()) == 1


def test_a_resumed_head_run_trains_the_same_prompt_and_head(tmp_path, tiny_model_dir, demo_train):
    from softprompt.training import Callback

    full = tmp_path / "full"
    _cli(*train_args(demo_train, tiny_model_dir, full, "--head", "pooled", "--epochs", "3"))
    cut = tmp_path / "cut"

    class Kill(Callback):
        def on_epoch(self, run, state, record):
            if state.epoch == 2:
                raise KeyboardInterrupt

    from softprompt.cli import parse_train_args
    from softprompt.config import preset_config
    from softprompt.training import train

    args = parse_train_args("train", train_args(demo_train, tiny_model_dir, cut, "--head", "pooled", "--epochs", "3")[1:])  # fmt: skip
    cfg = preset_config(args.preset, **args.given)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[Kill()])
    _cli("train", "--resume", str(cut), "--no-progress")
    a, b = load_adapter(full / "last"), load_adapter(cut / "last")
    assert torch.equal(a.prompt, b.prompt)
    for k, v in a.head.tensors().items():
        assert torch.equal(b.head.tensors()[k], v), k


def test_cv_and_seed_ensembles_run_head_adapters(tmp_path, tiny_model_dir, demo_train, demo_test):
    """cv scores each fold's head, fits a bias and calibrates the final head run; --seeds 2
    makes an ensemble of head adapters whose answer is the mean of its members'."""
    from softprompt.pipeline import SoftPrompt

    cv = tmp_path / "cv"
    _cli("cv", "--data", str(demo_train), "--text-column", "Tweet text", "--label-column",
         "Label", "--model", str(tiny_model_dir), "--epochs", "2", "--folds", "2",
         "--head", "pooled", "--no-progress", "--out", str(cv))  # fmt: skip
    report = json.loads((cv / "cv.json").read_text())
    assert report["status"] == "done" and len(report["bias"]) == 2
    final = SoftPrompt.load(str(cv / "final"))
    assert final.predictor.members[0].head.kind == "pooled" and final.bias == report["bias"]
    ens = tmp_path / "ens"
    _cli(*train_args(demo_train, tiny_model_dir, ens, "--head", "linear", "--seeds", "2"))
    both = SoftPrompt.load(str(ens), dtype="float32")  # 1e-5: float32's bound
    texts = TEXTS
    each = [SoftPrompt.load(str(ens / f"seed-{s}"), both.model, both.tokenizer) for s in (42, 43)]
    mean = torch.stack([torch.tensor([list(r["probabilities"].values()) for r in sp.classify(texts)]) for sp in each]).mean(0)  # fmt: skip
    got = torch.tensor([list(r["probabilities"].values()) for r in both.classify(texts)])
    assert torch.allclose(got, mean, atol=1e-5)


@pytest.mark.server
def test_the_server_classifies_head_adapters_mixed_with_label_words_and_refuses_text(
    tiny, tmp_path
):
    """/v1/classify answers each head adapter as the Python door does, in batches shared with a
    label-word adapter; completions and chat refuse a head adapter in one line (400)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from softprompt.pipeline import SoftPrompt
    from softprompt.serve.app import ServeConfig, create_app

    model, tok = tiny
    model = model.float()
    pooled, linear = _heads(model.get_input_embeddings().weight.shape[1])
    for name, head in (("words", None), ("pooled", pooled), ("linear", linear)):
        _save(tmp_path / "adapters", model, tok, "prompt", head, suffix=2, name=name)
    app = create_app(model, tok, ServeConfig(adapters=tmp_path / "adapters", max_wait_ms=50), model_name="tiny")  # fmt: skip
    with TestClient(app) as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        about = {k: v["softprompt"] for k, v in models.items()}
        assert about["pooled"]["head"] == "pooled" and about["words"]["head"] == "none"
        assert not about["linear"]["can_generate"] and about["words"]["can_generate"]
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(3) as pool:  # concurrent requests: batched together
            answers = dict(zip(("words", "pooled", "linear"), pool.map(
                lambda n: client.post("/v1/classify", json={"adapter": n, "inputs": TEXTS}),
                ("words", "pooled", "linear"),
            ), strict=True))  # fmt: skip
        for name, r in answers.items():
            assert r.status_code == 200, r.text
            alone = SoftPrompt.load(str(tmp_path / "adapters" / name), model, tok).classify(TEXTS)
            for got, want in zip(r.json()["results"], alone, strict=True):
                assert got["label"] == want["label"]
                for k, p in want["probabilities"].items():
                    assert abs(got["probabilities"][k] - p) < 1e-5
        r = client.post(
            "/v1/completions", json={"model": "pooled", "prompt": "hi", "max_tokens": 2}
        )
        assert r.status_code == 400 and "classification head" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"model": "linear", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert r.status_code == 400 and "classification head" in r.json()["error"]["message"]

"""Every door gives the same answer: a table of adapter kinds x doors, each cell checked.

Kinds: a plain prompt, one with suffix tokens, a calibrated one (the bias `softprompt cv`
saves), and an ensemble folder (ensemble.json) of suffix-token members with a bias of its own.
Doors: the Python API (`SoftPrompt`, the reference), `softprompt predict`, `softprompt eval`,
`/v1/classify` alone, the server's engine with every kind mixed in one batch, and `/v1/classify`
under concurrent requests. Every door runs the model in the type `--dtype auto` resolves to
(`auto_dtype`: bfloat16 on a CPU with bfloat16 hardware or under `--auto-dtype bfloat16`).
Labels must equal and probabilities agree within `bounds.door_tolerance` of that type: 1e-5 in
float32; in bfloat16 a batch of another make-up rounds differently (tests/bounds.py).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import threading
from pathlib import Path

import pytest
import torch

from bounds import door_tolerance
from softprompt.adapters import save_adapter
from softprompt.cli import main
from softprompt.cv import set_calibration
from softprompt.data import Task
from softprompt.ensembles import write_ensemble
from softprompt.errors import SoftpromptError
from softprompt.metrics import metrics
from softprompt.peft_format import peft_config
from softprompt.pipeline import SoftPrompt
from softprompt.prompt import init_prompt

LABELS = ["complaint", "no complaint"]
TEXTS = [
    "@ZephyrMobile no signal for three days and nobody answers",
    "thanks, lovely service today",
    "@NorthRailUK the 8:05 was cancelled again, third time this week. Refund please",
    "ok",
    "my parcel never arrived " * 12,  # cut to fit, as in training
]
GOLD = ["complaint", "no complaint", "complaint", "no complaint", "complaint"]
KINDS = ("plain", "suffix", "calibrated", "ensemble")

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapter(folder: Path, model, tok, *, seed: int, suffix: int = 0, labels=LABELS) -> Path:
    P = 4
    prompt = init_prompt(model, tok, P + suffix, "vocab", seed=seed)
    task = Task(
        text_column="Tweet text", label_names=list(labels), max_length=40, suffix_tokens=suffix
    )
    conf = peft_config(model, prompt[:P], base_model=None, init="vocab", init_text=None, tokenizer_name=None)  # fmt: skip
    return save_adapter(folder, prompt, conf, task)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """(model, tokenizer, adapters folder, the model folder, a labeled CSV). The model is loaded
    as the CLI doors load it (`--dtype auto`), so every door runs the same type."""
    from softprompt.modeling.load import load_base

    model, tok, _ = load_base(str(tiny_model_dir), dtype="auto")
    root = tmp_path_factory.mktemp("doors")
    _adapter(root / "plain", model, tok, seed=1)
    _adapter(root / "suffix", model, tok, seed=2, suffix=3)
    _adapter(root / "calibrated", model, tok, seed=3)
    set_calibration(root / "calibrated", [1.5, 0.0], "test")
    ens = root / "ensemble"
    for i, s in enumerate((4, 5, 6)):
        _adapter(ens / f"m{i}", model, tok, seed=s, suffix=3)
    set_calibration(ens / "m0", [9.0, 0.0], "test")  # a member's own bias: not the ensemble's
    write_ensemble(ens, ["m0", "m1", "m2"], bias=[-0.8, 0.0])
    data = root / "labeled.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Tweet text", "Label"])
        w.writerows(zip(TEXTS, GOLD, strict=True))
    return model, tok, root, Path(tiny_model_dir), data


def _api(world, kind: str) -> list[dict]:
    model, tok, root, _, _ = world
    return SoftPrompt.load(str(root / kind), model, tok).classify(TEXTS)


def _tol(world) -> float:
    return door_tolerance(world[0].get_input_embeddings().weight.dtype)


def _same(got: list[dict], want: list[dict], where: str, tol: float) -> None:
    assert len(got) == len(want), where
    for g, w in zip(got, want, strict=True):
        assert g["label"] == w["label"], (where, g, w)
        for name, p in w["probabilities"].items():
            assert abs(g["probabilities"][name] - p) < tol, (where, name, g, w)


def _cli(*argv: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(list(argv)) == 0
    return buf.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_api_applies_the_kind_as_saved(world, kind):
    model, tok, root, _, _ = world
    sp = SoftPrompt.load(str(root / kind), model, tok)
    if kind == "ensemble":
        assert sp.ensemble_size == 3 and sp.bias == [-0.8, 0.0]
        alone = [SoftPrompt.load(str(root / kind / f"m{i}"), model, tok) for i in range(3)]
        raw = torch.stack([torch.tensor([list(o["probabilities"].values()) for o in a.classify(TEXTS, calibrated=False)]) for a in alone]).mean(0)  # fmt: skip
        want = torch.softmax(raw.log() + torch.tensor([-0.8, 0.0]), -1)
        got = torch.tensor([list(o["probabilities"].values()) for o in sp.classify(TEXTS)])
        assert torch.allclose(got, want, atol=1e-5)
    elif kind == "calibrated":
        raw = torch.tensor([list(o["probabilities"].values()) for o in sp.classify(TEXTS, calibrated=False)])  # fmt: skip
        got = torch.tensor([list(o["probabilities"].values()) for o in sp.classify(TEXTS)])
        assert torch.allclose(got, torch.softmax(raw.log() + torch.tensor([1.5, 0.0]), -1), atol=1e-5)  # fmt: skip
    else:
        assert sp.bias is None


@pytest.mark.parametrize("kind", KINDS)
def test_cli_predict_equals_the_api(world, kind):
    _, _, root, model_dir, _ = world
    out = _cli("predict", str(root / kind), *TEXTS, "--model", str(model_dir), "--no-progress")
    rows = [json.loads(line) for line in out.splitlines()]
    got = [{"label": r["label"], "probabilities": {n: r[f"p({n})"] for n in LABELS}} for r in rows]
    _same(got, _api(world, kind), f"predict/{kind}", _tol(world))


@pytest.mark.parametrize("kind", KINDS)
def test_cli_eval_equals_the_api(world, kind):
    _, _, root, model_dir, data = world
    m = json.loads(_cli("eval", str(root / kind), "--data", str(data), "--label-column", "Label", "--model", str(model_dir), "--no-progress"))  # fmt: skip
    want = metrics(GOLD, [r["label"] for r in _api(world, kind)], LABELS)
    assert m["confusion_matrix"] == want["confusion_matrix"]
    assert m["macro_f1"] == pytest.approx(want["macro_f1"])
    assert m["calibrated"] == (kind in ("calibrated", "ensemble"))


@pytest.fixture(scope="module")
def client(world):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from softprompt.serve.app import ServeConfig, create_app

    model, tok, root, _, _ = world
    app = create_app(model, tok, ServeConfig(adapters=root, max_wait_ms=50), model_name="tiny")
    with TestClient(app) as c:
        yield c


def _served(body: dict) -> list[dict]:
    return [{"label": r["label"], "probabilities": r["probabilities"]} for r in body["results"]]


@pytest.mark.parametrize("kind", KINDS)
def test_server_classify_equals_the_api(world, client, kind):
    r = client.post("/v1/classify", json={"adapter": kind, "inputs": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["calibrated"] == (kind in ("calibrated", "ensemble"))
    assert body["results"][-1]["truncated"] is True
    _same(_served(body), _api(world, kind), f"serve/{kind}", _tol(world))


def test_every_kind_mixed_in_one_server_batch_equals_the_api(world, client):
    from softprompt.predictors import ClassifyRow

    state = client.app.state.softprompt
    order = [KINDS[i % len(KINDS)] for i in range(3 * len(KINDS))]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(order))]
    rows = [
        ClassifyRow(state.entries[k], state.engine.encode(state.entries[k], t)[0])
        for k, t in zip(order, texts, strict=True)
    ]
    got = state.engine.run(rows)
    want = {k: dict(zip(TEXTS, _api(world, k), strict=True)) for k in KINDS}
    for k, t, p in zip(order, texts, got, strict=True):
        w = want[k][t]
        assert LABELS[max(range(2), key=p.__getitem__)] == w["label"], (k, t)
        assert torch.allclose(torch.tensor(p), torch.tensor(list(w["probabilities"].values())), atol=_tol(world), rtol=0)  # fmt: skip
    # and over HTTP, all kinds at once from concurrent clients (they share batches)
    results: dict[str, dict] = {}

    def ask(kind: str) -> None:
        results[kind] = client.post("/v1/classify", json={"adapter": kind, "inputs": TEXTS}).json()

    threads = [threading.Thread(target=ask, args=(k,)) for k in KINDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in KINDS:
        _same(_served(results[k]), _api(world, k), f"concurrent/{k}", _tol(world))


def test_models_list_says_what_each_kind_is(client):
    cards = {m["id"]: m["softprompt"] for m in client.get("/v1/models").json()["data"]}
    assert set(cards) == {"tiny", *KINDS}  # the base model, then every adapter
    assert cards["tiny"]["base"] is True and not any(cards[k]["base"] for k in KINDS)
    assert cards["suffix"]["suffix_tokens"] == 3
    assert cards["calibrated"]["calibration_bias"] == [1.5, 0.0]
    assert len(cards["ensemble"]["ensemble"]) == 3 and cards["ensemble"]["calibration_bias"] == [-0.8, 0.0]  # fmt: skip
    assert cards["plain"]["calibration_bias"] is None and cards["plain"]["ensemble"] is None


def test_served_ensemble_refuses_completions_as_predict_refuses_generation(world, client):
    r = client.post("/v1/completions", json={"model": "ensemble", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and "ensemble" in r.json()["error"]["message"]
    model, tok, root, _, _ = world
    with pytest.raises(SoftpromptError, match="ensemble"):
        SoftPrompt.load(str(root / "ensemble"), model, tok).generate(["hi"])


def test_suffix_adapter_completions_equal_predict_generate(world, client):
    model, tok, root, _, _ = world
    from softprompt.predictors import GenerateRow, raw_task

    state = client.app.state.softprompt
    entry = state.entries["suffix"]
    r = client.post("/v1/completions", json={"model": "suffix", "prompt": TEXTS[0], "max_tokens": 4, "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    raw = state.encode(raw_task(entry.task), TEXTS[0], 200, False, "p")[0]
    assert raw[-3:] == [-3, -2, -1]  # the suffix tokens follow the raw text
    ((toks, _),) = state.engine.complete([GenerateRow(entry, raw, 4)])
    assert r.json()["choices"][0]["text"] == tok.decode(toks, skip_special_tokens=True)


# --------------------------------------------------------------------------- bad input


def test_server_refuses_an_ensemble_whose_members_disagree_in_one_line(world, tmp_path):
    pytest.importorskip("fastapi")
    from softprompt.serve.app import ServeConfig, create_app

    model, tok, _, _, _ = world
    ens = tmp_path / "mixed"
    _adapter(ens / "a", model, tok, seed=1)
    _adapter(ens / "b", model, tok, seed=2, labels=["yes", "no"])
    write_ensemble(ens, ["a", "b"])
    state = create_app(
        model, tok, ServeConfig(adapters=tmp_path), model_name="tiny"
    ).state.softprompt
    why = state.refused["mixed"]
    assert "\n" not in why and str(ens / "b") in why and "labels ['yes', 'no']" in why


def test_a_bias_of_the_wrong_length_is_refused_with_a_message(world, tmp_path):
    model, tok, _, _, _ = world
    folder = _adapter(tmp_path / "bad", model, tok, seed=1)
    set_calibration(folder, [0.1, 0.2, 0.3], "test")
    with pytest.raises(SoftpromptError, match="calibration bias has 3 entries for 2 labels"):
        SoftPrompt.load(str(folder), model, tok)


def test_an_ensemble_manifest_pointing_outside_its_folder_is_refused(world, tmp_path):
    model, tok, root, _, _ = world
    ens = tmp_path / "escape"
    ens.mkdir()
    write_ensemble(ens, [str(root / "plain")])
    with pytest.raises(SoftpromptError, match="outside the ensemble folder"):
        SoftPrompt.load(str(ens), model, tok)


@pytest.mark.parametrize("suffix", ["0", "3"])
def test_train_evaluation_equals_eval_of_the_saved_prompt(tmp_path, tiny_model_dir, demo_train, demo_test, suffix):  # fmt: skip
    """Train's per-epoch evaluation is the engine too: its metrics equal `softprompt eval` of the
    prompt it saved, plain and with suffix tokens."""
    out = tmp_path / "run"
    _cli("train", "--data", str(demo_train), "--eval-data", str(demo_test), "--text-column",
         "Tweet text", "--label-column", "Label", "--model", str(tiny_model_dir), "--epochs", "1",
         "--suffix-tokens", suffix, "--max-length", "40", "--out", str(out), "--no-progress")  # fmt: skip
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    m = json.loads(_cli("eval", str(out), "--data", str(demo_test), "--model", str(tiny_model_dir), "--no-progress"))  # fmt: skip
    assert record["eval_accuracy"] == pytest.approx(m["accuracy"])
    assert record["eval_macro_f1"] == pytest.approx(m["macro_f1"])


def test_a_plain_peft_adapter_needs_labels_at_every_classifying_door(world, tmp_path):
    model, tok, _, _, _ = world
    prompt = init_prompt(model, tok, 4, "vocab", seed=7)
    conf = peft_config(model, prompt, base_model=None, init="vocab", init_text=None, tokenizer_name=None)  # fmt: skip
    folder = save_adapter(tmp_path / "bare", prompt, conf, None)  # no softprompt.json: no labels
    with pytest.raises(SoftpromptError, match="no label names.*--labels"):
        SoftPrompt.load(str(folder), model, tok).classify(TEXTS)
    with_labels = SoftPrompt.load(str(folder), model, tok, labels=LABELS).classify(TEXTS)
    assert [set(r["probabilities"]) for r in with_labels] == [set(LABELS)] * len(TEXTS)

"""`softprompt serve` with a generation adapter (`--task generation`): completions and chat write
on the text rendered with the adapter's template, as `SoftPrompt.generate` does, streamed or not;
next to classification adapters in one server; `/v1/models` and `/v1/classify` say what it is.

The model is the tiny float32 Llama in-process (the server and `SoftPrompt.load` share it), so
greedy decoding through either door gives the same tokens."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import make_model  # noqa: E402
from softprompt import TrainConfig, train  # noqa: E402
from softprompt.pipeline import SoftPrompt  # noqa: E402
from test_serve import TEXTS, _alone, _app, _err, _write_adapters, running  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("one_thread")]

INPUTS = [
    "name[Place 3], food[Thai]",
    "name[The Blue Door], food[French]",
    "name[Corner Cafe], food[Italian], area[riverside]",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    """The weights of `tiny_model_dir` (the base the adapter is trained on), float32."""
    return make_model("llama", len(tokenizer))


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory, model, tokenizer, tiny_model_dir) -> Path:
    """test_serve's classification adapters (alpha, ...), `gen`, a generation adapter, and
    `short`, the same with a max_length of 24 tokens."""
    folder = _write_adapters(tmp_path_factory.mktemp("gen-adapters"), model, tokenizer)
    rows = [
        {"mr": f"name[Place {i}], food[{f}]", "ref": f"Place {i} serves {f} food."}
        for i in range(12)
        for f in ("Thai", "French")
    ]
    cfg = TrainConfig(
        data=None, task="generation", text_column="mr", label_column="ref",
        out=str(folder / "gen"), epochs=1, progress=False, model=str(tiny_model_dir),
    )  # fmt: skip
    train(cfg, data=rows)
    shutil.copytree(folder / "gen", folder / "short", ignore=shutil.ignore_patterns("checkpoint", "last"))  # fmt: skip
    about = json.loads((folder / "short" / "softprompt.json").read_text())
    (folder / "short" / "softprompt.json").write_text(json.dumps({**about, "max_length": 24}))
    return folder


@pytest.fixture(scope="module")
def reference(model, tokenizer, gen_dir) -> SoftPrompt:
    return SoftPrompt.load(str(gen_dir / "gen"), model, tokenizer)


@pytest.fixture(scope="module")
def wanted(reference) -> list[str]:
    """What `SoftPrompt.generate` writes for INPUTS (greedy, the adapter's max_new_tokens)."""
    out = reference.generate(INPUTS)
    assert all(out), out  # something to compare
    return out


@pytest.fixture
def client(model, tokenizer, gen_dir):
    with TestClient(_app(model, tokenizer, gen_dir, max_wait_ms=0)) as c:
        yield c


def _events(r) -> list[dict]:
    """The JSON events of a server-sent event stream (TestClient's whole body), [DONE] last."""
    lines = [x for x in r.text.splitlines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]", r.text
    return [json.loads(x[6:]) for x in lines[:-1]]


def test_completions_equal_softprompt_generate(client, tokenizer, reference, wanted):
    """The prompt is rendered with the adapter's template (`Engine.encode_generation`), and
    max_tokens defaults to the adapter's max_new_tokens; the server does not strip the text."""
    body = {"model": "gen", "prompt": INPUTS, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["text"].strip() for c in out["choices"]] == wanted
    engine, task = reference.engine, reference.task
    ids = [engine.encode_generation(reference.predictor, t) for t in INPUTS]
    assert out["usage"]["prompt_tokens"] == sum(len(x) for x in ids)
    assert tokenizer.decode(ids[0]) == task.render(INPUTS[0])
    assert "warnings" not in out
    max_new = task.max_new_tokens
    for text in INPUTS:  # one prompt each: its new tokens, up to the adapter's default
        one = client.post("/v1/completions", json={**body, "prompt": text}).json()
        n, why = one["usage"]["completion_tokens"], one["choices"][0]["finish_reason"]
        assert n == max_new if why == "length" else n < max_new
    r = client.post("/v1/completions", json={**body, "prompt": INPUTS[0], "max_tokens": 2})
    assert r.json()["usage"]["completion_tokens"] <= 2
    # a classification adapter's prompt is still the raw text, no template
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": INPUTS[0], "max_tokens": 3})  # fmt: skip
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer(INPUTS[0])["input_ids"])


def test_streamed_completion_is_the_same_text(client, wanted):
    for text, want in zip(INPUTS, wanted, strict=True):
        body = {"model": "gen", "prompt": text, "temperature": 0, "stream": True}
        events = _events(client.post("/v1/completions", json=body))
        pieces = [e["choices"][0]["text"] for e in events]
        assert len([p for p in pieces if p]) > 1, pieces  # token by token
        assert "".join(pieces).strip() == want
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_writes_on_the_last_user_message(client, wanted):
    """No chat template is needed (the tokenizer has none): the last user message is the
    input, in the adapter's template; streamed chat is the same text."""
    for text, want in zip(INPUTS, wanted, strict=True):
        messages = [
            {"role": "system", "content": "Describe the restaurant."},
            {"role": "user", "content": "an earlier message, not read"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": text}]},
        ]
        body = {"model": "gen", "messages": messages, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].strip() == want
        events = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
        streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert streamed.strip() == want
    r = client.post("/v1/chat/completions", json={"model": "gen", "messages": [{"role": "system", "content": "x"}]})  # fmt: skip
    assert r.status_code == 400 and _err(r)["param"] == "messages"
    assert "user message" in _err(r)["message"]


def test_a_long_prompt_is_cut_as_predict_cuts_it_or_413_when_strict(
    client, model, tokenizer, gen_dir
):
    """Cut to the adapter's max_length as predict cuts it (the same text written), or further
    to fit the model's context less max_tokens; a warning says so, or 413 with strict."""
    text = "name[Place 1], food[Thai], " * 8
    body = {"model": "short", "prompt": text, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    short = SoftPrompt.load(str(gen_dir / "short"), model, tokenizer)
    assert r.json()["choices"][0]["text"].strip() == short.generate([text])[0]
    assert r.json()["usage"]["prompt_tokens"] == 23  # max_length - 1, as encode_generation
    assert "max_length 24" in r.json()["warnings"][0]
    assert client.post("/v1/completions", json={**body, "strict": True}).status_code == 413
    body = {"model": "gen", "prompt": text * 8, "temperature": 0, "max_tokens": 2}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] <= client.app.state.softprompt.context - 2
    assert "cut at the end to fit" in r.json()["warnings"][0]
    assert client.post("/v1/completions", json={**body, "strict": True}).status_code == 413


def test_generation_and_classification_requests_served_together(model, tokenizer, gen_dir, wanted):
    """Sent concurrently to one server (batches wait 300 ms to fill): each answers as alone."""
    app = _app(model, tokenizer, gen_dir, max_wait_ms=300)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(
                c.post(
                    "/v1/completions", json={"model": "gen", "prompt": INPUTS, "temperature": 0}
                ),  # fmt: skip
                c.post("/v1/classify", json={"adapter": "alpha", "inputs": TEXTS}),
                c.post("/v1/classify", json={"adapter": "gamma", "inputs": TEXTS[:2]}),
            )

    with running(app) as url:
        gen, alpha, gamma = asyncio.run(go(url))
    assert gen.status_code == 200, gen.text
    assert [c["text"].strip() for c in gen.json()["choices"]] == wanted
    for r, name, texts in ((alpha, "alpha", TEXTS), (gamma, "gamma", TEXTS[:2])):
        assert r.status_code == 200, r.text
        alone = _alone(model, tokenizer, gen_dir, name, texts)
        for got, want in zip(r.json()["results"], alone, strict=True):
            assert got["label"] == want["label"]
            for k, p in want["probabilities"].items():
                assert abs(got["probabilities"][k] - p) < 1e-5


def test_models_report_the_task(client, reference):
    cards = {m["id"]: m["softprompt"] for m in client.get("/v1/models").json()["data"]}
    gen = cards["gen"]
    assert gen["task"] == "generation" and gen["labels"] == [] and gen["can_generate"]
    assert gen["max_new_tokens"] == reference.task.max_new_tokens > 0
    assert gen["template"] == reference.task.template
    assert cards["alpha"]["task"] == "classification" and cards["alpha"]["max_new_tokens"] is None
    assert client.get("/v1/models/gen").json()["softprompt"]["task"] == "generation"


def test_classify_refuses_a_generation_adapter_in_one_line(client):
    r = client.post("/v1/classify", json={"adapter": "gen", "inputs": [INPUTS[0]]})
    assert r.status_code == 400
    err = _err(r)
    assert "generation adapter" in err["message"] and "/v1/completions" in err["message"]
    assert "\n" not in err["message"] and err["param"] == "adapter"


def test_playground_has_a_generate_mode(client):
    page = client.get("/").text
    assert 'id="mode-generate"' in page and "generation" in page

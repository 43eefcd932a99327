"""`softprompt serve`: the batcher against single runs, the HTTP API (TestClient and a real
uvicorn server), the openai client, faults, graceful shutdown, and the playground in a browser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import make_model  # noqa: E402
from fast import generate  # noqa: E402
from softprompt.adapters import save_adapter  # noqa: E402
from softprompt.data import Task, common_prefix_length, input_token_ids  # noqa: E402
from softprompt.engine import Engine  # noqa: E402
from softprompt.forward.kv import prompt_kv, slice_kv  # noqa: E402
from softprompt.forward.layout import lane_width, pack_rows  # noqa: E402
from softprompt.kvcache import KVCache  # noqa: E402
from softprompt.pipeline import SoftPrompt  # noqa: E402
from softprompt.predictors import ClassifyRow, GenerateRow  # noqa: E402
from softprompt.prompt import init_prompt  # noqa: E402
from softprompt.serve.app import ServeConfig, create_app  # noqa: E402
from softprompt.serve.registry import load_predictor  # noqa: E402

TEXTS = [
    "@ZephyrMobile no signal for three days and nobody answers",
    "thanks!",
    "@NorthRailUK the 8:05 was cancelled again, third time this week. Refund please",
    "ok",
]
LONG = "my parcel never arrived and nobody answers the phone " * 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model("llama", len(tokenizer))


def _write_adapters(folder: Path, model, tok) -> Path:
    binary = ["complaint", "no complaint"]
    specs = {  # name: (P, seed, labels)
        "alpha": (4, 1, binary),
        "beta": (4, 2, binary),
        "gamma": (4, 3, ["yes", "no", "maybe so"]),
        "delta": (6, 4, binary),  # another prompt length: a batch of its own
    }
    for name, (P, seed, labels) in specs.items():
        prompt = init_prompt(model, tok, P, "vocab", seed=seed)
        task = Task(text_column="Tweet text", label_names=labels, max_length=64)
        save_adapter(
            folder / name, prompt, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": P}, task
        )
    # refused at start: another model's width
    save_adapter(folder / "wide", torch.zeros(4, 48), {"peft_type": "PROMPT_TUNING"}, None)
    (folder / "notes").mkdir()  # not an adapter: skipped
    # loadable later through POST /v1/adapters
    extra = folder / "more" / "eps"
    save_adapter(extra, init_prompt(model, tok, 4, "vocab", seed=5), {"peft_type": "PROMPT_TUNING"},
                 Task(text_column="Tweet text", label_names=binary, max_length=64))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, model, tokenizer) -> Path:
    return _write_adapters(tmp_path_factory.mktemp("adapters"), model, tokenizer)


def _app(model, tok, folder, **kw):
    return create_app(model, tok, ServeConfig(adapters=folder, **kw), model_name="tiny")


@pytest.fixture
def client(model, tokenizer, adapters_dir):
    app = _app(model, tokenizer, adapters_dir, max_body_bytes=20_000, allow_adapter_admin=True)
    with TestClient(app) as c:
        yield c


def _alone(model, tok, folder, name, texts):
    return SoftPrompt.load(str(folder / name), model, tok).classify(texts)


def _err(r) -> dict:
    return r.json()["error"]


# --------------------------------------------------------------------------- batching


@torch.no_grad()
def test_mixed_batch_equals_each_request_alone(model, tokenizer, adapters_dir):
    engine = Engine(model, tokenizer)
    entries = {n: load_predictor(adapters_dir / n, n, engine) for n in ("alpha", "beta", "gamma", "delta")}  # fmt: skip
    order = ["alpha", "gamma", "beta", "delta", "gamma", "alpha", "beta", "delta"]
    texts = [TEXTS[i % 4] for i in range(len(order))]
    rows = [
        ClassifyRow(entries[n], input_token_ids(tokenizer, entries[n].task, t, entries[n].budget))
        for n, t in zip(order, texts, strict=True)
    ]
    assert pack_rows([len(r.ids) for r in rows])[0] < len(rows)  # rows share lanes
    for e in entries.values():  # the cached KV covers the prompt and the template's head
        assert min(common_prefix_length([r.ids], e.template_head) for r in rows) > 0
        assert engine.kv_cache.get(e.members[0], e.template_head)[0][0].shape[2] == e.num_virtual_tokens + len(e.template_head)  # fmt: skip
    mixed = engine.run(rows)
    for row, text, got in zip(rows, texts, mixed, strict=True):
        (alone,) = engine.run([row])
        assert len(got) == len(row.predictor.task.label_names)
        assert torch.allclose(torch.tensor(got), torch.tensor(alone), atol=1e-5)
        ref = _alone(model, tokenizer, adapters_dir, row.predictor.name, [text])[0]
        assert torch.allclose(torch.tensor(got), torch.tensor(list(ref["probabilities"].values())), atol=1e-5)  # fmt: skip
    # greedy completions, mixed adapters and lengths, each row its own max_tokens
    ids = [tokenizer(t)["input_ids"] for t in texts]
    comp = [GenerateRow(entries[n], ids[i], 3 + i % 3, 0.0, 1.0) for i, n in enumerate(order)]
    outs = engine.run(comp)
    for row, (toks, _) in zip(comp, outs, strict=True):
        x = torch.tensor([row.ids])
        ref = generate(model, prompt_kv(model, row.predictor.members[0].prompt), x, torch.ones_like(x),
                       max_new_tokens=row.max_tokens, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        assert toks == ref[0]
        assert engine.run([row])[0][0] == toks


@torch.no_grad()
def test_rows_joining_and_leaving_a_running_decode_equal_each_alone(model, chat_tok, chat_dir):
    """Continuous batching: rows of other prompt lengths (base model P=0, alpha P=4, delta P=6,
    a suffix-token adapter) join a running decode between steps and leave when they end; each
    row's tokens equal its run alone."""
    from softprompt.readouts.generation import merge_decoding

    engine = Engine(model, chat_tok)
    e = {n: load_predictor(chat_dir / n, n, engine) for n in ("alpha", "delta", "suf")}
    e["tiny"] = engine.base_predictor("tiny")
    ids = [chat_tok(t)["input_ids"] for t in TEXTS]
    rows = [
        GenerateRow(e["alpha"], ids[0], 12),
        GenerateRow(e["delta"], ids[1], 3),
        GenerateRow(e["tiny"], ids[2], 9),
        GenerateRow(e["suf"], ids[3] + [-2, -1], 7),
        GenerateRow(e["alpha"], ids[1], 5),
    ]
    alone = [engine.complete([r])[0] for r in rows]
    got: dict[int, tuple] = {}
    batch = engine.begin(rows[:2])
    joins = {2: rows[2:4], 4: rows[4:]}  # rows that join after that many steps
    step = 0
    while batch.rows or any(k >= step for k in joins):
        if step in joins:
            batch = merge_decoding(batch, engine.begin(joins[step]))
        for r, result in engine.step(batch):
            got[id(r)] = result
        step += 1
    for r, want in zip(rows, alone, strict=True):
        assert got[id(r)] == want, r.predictor.name
    assert engine.complete(rows) == alone  # and all at once


def test_pack_rows_places_every_row_once_without_overlap():
    import random

    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 80) for _ in range(rng.randint(1, 40))]
        width = lane_width(lengths)
        assert max(lengths) <= width <= max(3 * max(lengths), sum(lengths))
        lanes, places = pack_rows(lengths, width)
        assert len(places) == len(lengths) and lanes <= len(lengths)
        used: dict[int, list[tuple[int, int]]] = {}
        for n, (lane, off) in zip(lengths, places, strict=True):
            assert 0 <= lane < lanes and 0 <= off and off + n <= width
            used.setdefault(lane, []).append((off, off + n))
        assert len(used) == lanes  # no empty lane
        for spans in used.values():
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert lanes * width >= sum(lengths)
    assert pack_rows([5, 50, 5, 50], 50) == (3, [(2, 0), (0, 0), (2, 5), (1, 0)])
    assert pack_rows([]) == (1, [])


def test_kv_cache_is_bounded_lru(model, tokenizer, adapters_dir):
    engine = Engine(model, tokenizer)
    entries = [
        load_predictor(adapters_dir / n, n, engine).members[0] for n in ("alpha", "beta", "gamma")
    ]
    one = KVCache(model, 10**9)
    size = (one.get(entries[0]), one.bytes)[1]
    cache = KVCache(model, 2 * size)
    for e in entries:
        cache.get(e)
    assert len(cache) == 2 and cache.bytes == 2 * size and cache.misses == 3
    cache.get(entries[2])
    assert cache.hits == 1
    cache.get(entries[0])  # evicted earlier: recomputed
    assert cache.misses == 4
    tiny_budget = KVCache(model, 0)  # keeps only the adapter in use
    for e in entries:
        tiny_budget.get(e)
    assert len(tiny_budget) == 1


# --------------------------------------------------------------------------- HTTP, TestClient


def test_models_health_and_refused(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny", "alpha", "beta", "delta", "gamma"]
    assert models["data"][0]["softprompt"]["base"] is True
    assert models["data"][0]["softprompt"]["num_virtual_tokens"] == 0
    assert models["data"][3]["softprompt"]["num_virtual_tokens"] == 6
    health = client.get("/health").json()
    assert health["status"] == "ok" and "wide" in health["refused"]
    assert "hidden size" in health["refused"]["wide"]
    assert client.get("/v1/models/gamma").json()["softprompt"]["labels"][2] == "maybe so"


def test_classify_equals_softprompt_classify(client, model, tokenizer, adapters_dir):
    for name in ("alpha", "gamma", "delta"):
        r = client.post("/v1/classify", json={"adapter": name, "inputs": TEXTS})
        assert r.status_code == 200, r.text
        body = r.json()
        ref = _alone(model, tokenizer, adapters_dir, name, TEXTS)
        for got, want in zip(body["results"], ref, strict=True):
            assert got["label"] == want["label"] and got["truncated"] is False
            for k, p in want["probabilities"].items():
                assert abs(got["probabilities"][k] - p) < 1e-5
        assert "warnings" not in body


def test_bad_requests_get_clear_json_errors(client):
    r = client.post(
        "/v1/classify", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in _err(r)["message"]
    r = client.post("/v1/classify", json={"adapter": "alpha"})
    assert r.status_code == 400 and "inputs" in _err(r)["message"]
    r = client.post("/v1/classify", json={"adapter": "alpha", "inputs": []})
    assert r.status_code == 400 and "empty" in _err(r)["message"]
    r = client.post("/v1/classify", json={"adapter": "alpha", "inputs": "one string"})
    assert r.status_code == 400
    r = client.post("/v1/classify", json={"adapter": "nope", "inputs": ["x"]})
    assert r.status_code == 404
    assert _err(r)["known_adapters"] == ["alpha", "beta", "delta", "gamma"]
    assert "alpha" in _err(r)["message"]
    r = client.post("/v1/classify", json={"adapter": "alpha", "inputs": ["x" * 30_000]})
    assert r.status_code == 413 and "limit" in _err(r)["message"]
    r = client.get("/no/such/route")
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "n": 2})
    assert r.status_code == 400 and "n must be 1" in _err(r)["message"]
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "stop": [""]})
    assert r.status_code == 400 and _err(r)["param"] == "stop"
    r = client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 10**6})
    assert r.status_code == 400 and "max_tokens" in _err(r)["message"]
    assert client.get("/health").json()["status"] == "ok"  # still serving


def test_base_model_is_served_without_a_prompt(client, model, tokenizer):
    r = client.post(
        "/v1/completions",
        json={"model": "tiny", "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    x = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id)[0, x.shape[1]:].tolist()  # fmt: skip
    if tokenizer.eos_token_id in want:
        want = want[: want.index(tokenizer.eos_token_id)]
    body = r.json()
    assert body["model"] == "tiny" and body["usage"]["completion_tokens"] == len(want)
    assert body["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert client.get("/v1/models/tiny").json()["softprompt"]["base"] is True
    r = client.post("/v1/classify", json={"adapter": "tiny", "inputs": ["x"]})
    assert r.status_code == 400 and "base model" in _err(r)["message"]
    assert "labels" in _err(r)["message"] and _err(r)["param"] == "adapter"
    assert client.delete("/v1/adapters/tiny").status_code == 400
    r = client.post("/v1/adapters", json={"path": "more/eps", "name": "tiny"})
    assert r.status_code == 409 and "base model" in _err(r)["message"]


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


@pytest.fixture(scope="module")
def chat_tok(tokenizer):
    """The tiny tokenizer with a small chat template (a copy: the shared one has none)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, model, tokenizer) -> Path:
    """alpha, and `suf`: an adapter with 2 suffix tokens after the text."""
    folder = _write_adapters(tmp_path_factory.mktemp("chat"), model, tokenizer)
    task = Task(text_column="Tweet text", label_names=["yes", "no"], max_length=64, suffix_tokens=2)
    prompt = init_prompt(model, tokenizer, 4 + 2, "vocab", seed=9)
    save_adapter(folder / "suf", prompt, {"peft_type": "PROMPT_TUNING"}, task)
    return folder


@pytest.fixture
def chat_client(model, chat_tok, chat_dir):
    with TestClient(_app(model, chat_tok, chat_dir)) as c:
        yield c


def _reference(model, tok, prompt, ids, max_tokens):
    """Greedy tokens after prompt [P+S, H] (its last S vectors in the ids' placeholders)."""
    from softprompt.data import suffix_placeholders

    S = sum(1 for i in ids if i < 0)
    x = torch.tensor([ids])
    front = prompt[: prompt.shape[0] - S]
    assert not S or ids[-S:] == suffix_placeholders(S)
    kv = prompt_kv(model, front) if len(front) else slice_kv(prompt_kv(model, prompt.new_zeros(1, 32)), 0)  # fmt: skip
    return generate(model, kv, x, torch.ones_like(x), max_new_tokens=max_tokens,
                    eos_token_id=tok.eos_token_id, prompts=prompt if S else None)[0]  # fmt: skip


def test_chat_completions_render_the_template_after_the_prompt(
    chat_client, model, chat_tok, chat_dir
):
    messages = [
        {"role": "system", "content": "You sort tweets."},
        {"role": "user", "content": [{"type": "text", "text": TEXTS[0]}]},
    ]
    plain = [messages[0], {"role": "user", "content": TEXTS[0]}]
    text = chat_tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<assistant> ")
    ids = chat_tok(text, add_special_tokens=False)["input_ids"]
    for name, S in (("alpha", 0), ("suf", 2), ("tiny", 0)):
        body = {"model": name, "messages": messages, "max_tokens": 5, "temperature": 0}
        r = chat_client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        prompt = (
            torch.zeros(0, 32)
            if name == "tiny"
            else SoftPrompt.load(str(chat_dir / name), model, chat_tok).prompt
        )
        want = _reference(model, chat_tok, prompt, ids + list(range(-S, 0)), 5)
        assert out["object"] == "chat.completion" and out["model"] == name
        (choice,) = out["choices"]
        assert choice["message"] == {
            "role": "assistant",
            "content": chat_tok.decode(want, skip_special_tokens=True),
        }
        assert choice["finish_reason"] == ("length" if len(want) == 5 else "stop")
        assert out["usage"]["prompt_tokens"] == len(ids) + S
        assert out["usage"]["completion_tokens"] == len(want)


def test_chat_errors_name_the_field(chat_client, client):
    r = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 400 and "chat template" in _err(r)["message"]
    assert _err(r)["param"] == "messages"
    for body, field in (
        ({"model": "alpha", "messages": []}, "messages"),
        ({"model": "alpha", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "alpha"}, "messages"),
        ({"model": "alpha", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"model": "alpha", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ):  # fmt: skip
        r = chat_client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and field in _err(r)["message"] + _err(r).get("param", ""), (
            body,
            r.text,
        )
    r = chat_client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    assert r.status_code == 404


def test_openai_client_chat(model, chat_tok, chat_dir):
    openai = pytest.importorskip("openai")
    with running(_app(model, chat_tok, chat_dir)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)
        out = c.chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            temperature=0,
        )
        assert out.choices[0].message.role == "assistant"
        text = chat_tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)  # fmt: skip
        prompt = SoftPrompt.load(str(chat_dir / "alpha"), model, chat_tok).prompt
        want = _reference(model, chat_tok, prompt, chat_tok(text, add_special_tokens=False)["input_ids"], 4)  # fmt: skip
        assert out.choices[0].message.content == chat_tok.decode(want, skip_special_tokens=True)
        assert out.usage.completion_tokens == len(want)


@pytest.fixture(scope="module")
def chat_server(model, chat_tok, chat_dir):
    """A real server for the chat-template tokenizer; answers at once (no batch wait)."""
    with running(_app(model, chat_tok, chat_dir, max_wait_ms=0)) as url:
        yield url


def test_openai_client_streams_completions_and_chat(chat_server, model, chat_tok, chat_dir):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=f"{chat_server}/v1", api_key="unused", timeout=30, max_retries=0)
    for name in ("alpha", "suf", "tiny"):
        kw = dict(model=name, prompt=TEXTS[2], max_tokens=12, temperature=0)
        whole = c.completions.create(**kw)
        chunks = list(c.completions.create(**kw, stream=True))
        pieces = [ch.choices[0].text for ch in chunks if ch.choices]
        assert len([p for p in pieces if p]) > 1, pieces  # token by token, not all at once
        assert "".join(pieces) == whole.choices[0].text
        reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
        text = whole.choices[0].text
        if len(text) > 3:  # a stop string ends the stream right before it
            stop = text[2:4]
            cut = list(c.completions.create(**kw, stop=[stop], stream=True))
            streamed = "".join(ch.choices[0].text for ch in cut if ch.choices)
            assert streamed == text[: text.find(stop)] and stop not in streamed
            assert cut[-1].choices[0].finish_reason == "stop"
        msgs = [{"role": "user", "content": TEXTS[0]}]
        whole = c.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
        chunks = list(
            c.chat.completions.create(
                model=name, messages=msgs, max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed == whole.choices[0].message.content
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason  # fmt: skip
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_is_plain_sse_ending_in_done(chat_server):
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{chat_server}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
    r = httpx.post(f"{chat_server}/v1/completions", json={**body, "model": "nope"}, timeout=30)
    assert r.status_code == 404  # refused before the stream starts: a plain JSON error
    whole = httpx.post(f"{chat_server}/v1/completions", json={**body, "stream": False, "logprobs": 1}, timeout=30)  # fmt: skip
    with httpx.stream("POST", f"{chat_server}/v1/completions", json={**body, "logprobs": 1}, timeout=30) as r:  # fmt: skip
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    want = whole.json()["choices"][0]["logprobs"]
    assert sum((x["token_logprobs"] for x in streamed), []) == pytest.approx(want["token_logprobs"])
    assert sum((x["text_offset"] for x in streamed), []) == want["text_offset"]


class StepGate:
    """Holds rows of the engine's decoding: while `hold(batch)` is true and `release` is not set,
    a decoding step makes no token, and the worker goes on with everything else (new rows,
    classify rows); `held` is set once it has held. The tests wait on these events: no sleep
    or clock decides what they check."""

    def __init__(self, state, hold):
        self.real = state.engine.step
        self.hold = hold
        self.held = threading.Event()
        self.release = threading.Event()
        state.engine.step = self.step

    def step(self, batch):
        if not self.release.is_set() and self.hold(batch):
            self.held.set()
            time.sleep(0.001)  # the worker loops here until released
            return []
        return self.real(batch)


def _waited(event: threading.Event) -> None:
    assert event.wait(60), "the server never got there"


def _until(condition, what: str) -> None:
    """Wait (60 s at most) for a condition of the server to hold."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_short_requests_pass_a_long_generation(model, chat_tok, chat_dir):
    """A classify request and a short completion sent while a long generation decodes are
    answered before it ends: they join between decoding steps. The long one is held after its
    first token until they are answered."""
    app = _app(model, chat_tok, chat_dir, max_wait_ms=0)
    alone = lambda b: [r.predictor.name for r in b.rows] == ["tiny"] and len(b.toks[0]) >= 1  # noqa: E731
    gate = StepGate(app.state.softprompt, alone)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            long = asyncio.ensure_future(c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 150, "temperature": 0}))  # fmt: skip
            await asyncio.to_thread(_waited, gate.held)  # decoding, held after its first token
            short = await c.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2, "temperature": 0})  # fmt: skip
            cls = await c.post("/v1/classify", json={"adapter": "alpha", "inputs": TEXTS})
            assert not long.done()  # the short ones passed it
            gate.release.set()
            return await long, short, cls

    with running(app) as url:
        long, short, cls = asyncio.run(go(url))
    assert long.status_code == short.status_code == cls.status_code == 200
    assert long.json()["usage"]["completion_tokens"] == 150  # greedy: no end token before
    assert short.json()["usage"]["completion_tokens"] == 2
    ref = _alone(model, chat_tok, chat_dir, "alpha", TEXTS)
    for got, want in zip(cls.json()["results"], ref, strict=True):
        assert got["label"] == want["label"]


def test_client_leaving_a_stream_ends_its_row_only(model, chat_tok, chat_dir):
    """The stream's row is held at 5 tokens; its client leaves; once the server has seen it
    leave, the row is let go: it ends without another token, and other requests are served."""
    app = _app(model, chat_tok, chat_dir, max_wait_ms=0)
    state = app.state.softprompt
    made: dict[str, int] = {}  # adapter -> most tokens a row of it reached

    def hold(batch):
        for r, toks in zip(batch.rows, batch.toks, strict=True):
            made[r.predictor.name] = max(made.get(r.predictor.name, 0), len(toks))
        return made.get("tiny", 0) >= 5

    gate = StepGate(state, hold)
    long = {"model": "tiny", "prompt": "a", "max_tokens": 200, "temperature": 0, "stream": True}
    with running(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=30) as r:
            lines = r.iter_lines()  # (an iterator dropped early would close the stream)
            assert next(lines).startswith("data: ")
            _waited(gate.held)
        # left mid-stream
        metrics = lambda: httpx.get(f"{url}/metrics").text  # noqa: E731
        _until(lambda: _metric(metrics(), "softprompt_client_disconnects_total") == 1, "the disconnect")  # fmt: skip
        gate.release.set()
        other = httpx.post(
            f"{url}/v1/completions",
            json={"model": "alpha", "prompt": TEXTS[1], "max_tokens": 4, "temperature": 0},
            timeout=30,
        )
        assert other.status_code == 200
        prompt = SoftPrompt.load(str(chat_dir / "alpha"), model, chat_tok).prompt
        want = _reference(model, chat_tok, prompt, chat_tok(TEXTS[1])["input_ids"], 4)
        assert other.json()["choices"][0]["text"] == chat_tok.decode(want, skip_special_tokens=True)
        assert made["tiny"] == 5, made  # the left stream's row took no step after it was let go
        assert _metric(metrics(), "softprompt_client_disconnects_total") == 1


def test_text_stream_holds_back_what_could_start_a_stop_string(tokenizer):
    from softprompt.serve.text import TextStream

    ids = tokenizer("thanks for nothing, again")["input_ids"]
    pieces = []
    st = TextStream(tokenizer, ["nothing"], on_piece=lambda p, _: pieces.append(p))
    ended = [st.on_token(t, torch.zeros(len(tokenizer))) for t in ids]
    assert st.stopped and ended[-1] is True and ended.index(True) < len(ids)
    assert "".join(pieces) == st.text == "thanks for "
    st = TextStream(tokenizer, ["zzz"], on_piece=lambda p, _: pieces.append(p))
    pieces.clear()
    for t in ids:
        assert st.on_token(t, torch.zeros(len(tokenizer))) is False
    assert "".join(pieces) + st.finish()[0] == "thanks for nothing, again"


def _forward_logprobs(model, prompt, ids):
    """log_softmax of the plain concatenated forward pass: [T, V] for positions after each
    token of ids (the prompt's front vectors, P, first)."""
    from softprompt.forward.reference import concat_forward

    x = torch.tensor([ids])
    with torch.no_grad():
        logits = concat_forward(model, prompt, x, torch.ones_like(x))
    return torch.log_softmax(logits[0, prompt.shape[0] :].float(), -1)


def test_echo_logprobs_score_the_prompt_as_a_forward_pass(chat_client, model, chat_tok, chat_dir):
    """lm-eval-harness's loglikelihood request: echo, max_tokens 0, logprobs."""
    from softprompt.serve.text import token_text

    ids = chat_tok(TEXTS[2])["input_ids"]
    for name in ("alpha", "suf", "tiny"):
        body = {"model": name, "prompt": TEXTS[2], "max_tokens": 0, "echo": True, "logprobs": 2}
        r = chat_client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == TEXTS[2] and r.json()["usage"]["completion_tokens"] == 0
        lp = choice["logprobs"]
        assert lp["tokens"] == [token_text(chat_tok, t) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        if name == "tiny":
            front = torch.zeros(0, 32)
        else:
            sp = SoftPrompt.load(str(chat_dir / name), model, chat_tok).prompt
            front = sp[
                : sp.shape[0] - (2 if name == "suf" else 0)
            ]  # the text comes before suffix tokens
        ref = _forward_logprobs(model, front, ids)
        want = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4)
        for t, top in enumerate(lp["top_logprobs"][1:]):
            assert len(top) == 2
            best = ref[t].topk(2)
            assert sorted(top.values(), reverse=True) == pytest.approx(
                best.values.tolist(), abs=1e-4
            )
        offsets = lp["text_offset"]
        assert offsets[0] == 0 and offsets[1] == len(lp["tokens"][0])


def test_logprobs_of_new_tokens_and_echo(chat_client, model, chat_tok, chat_dir):
    ids = chat_tok(TEXTS[1])["input_ids"]
    body = {"model": "alpha", "prompt": TEXTS[1], "max_tokens": 4, "temperature": 0, "logprobs": 3}
    out = chat_client.post("/v1/completions", json=body).json()["choices"][0]
    new = out["logprobs"]
    assert len(new["tokens"]) == len(new["token_logprobs"]) == len(new["text_offset"]) >= 1
    echoed = chat_client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert echoed["text"] == TEXTS[1] + out["text"]
    lp = echoed["logprobs"]
    assert lp["tokens"][len(ids) :] == new["tokens"]
    assert lp["token_logprobs"][len(ids) :] == pytest.approx(new["token_logprobs"], abs=1e-5)
    sp = SoftPrompt.load(str(chat_dir / "alpha"), model, chat_tok).prompt
    toks = _reference(model, chat_tok, sp, ids, 4)
    ref = _forward_logprobs(model, sp, ids + toks)
    want = ref[:-1].gather(1, torch.tensor((ids + toks)[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4)
    for got, top in zip(new["token_logprobs"], new["top_logprobs"], strict=True):
        assert got == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the most likely
    r = chat_client.post("/v1/completions", json={**body, "logprobs": 99})
    assert r.status_code == 400 and "logprobs" in _err(r)["message"]


def test_long_input_is_cut_as_in_training_or_413_when_strict(
    client, model, tokenizer, adapters_dir
):
    r = client.post("/v1/classify", json={"adapter": "alpha", "inputs": ["ok", LONG]})
    assert r.status_code == 200
    body = r.json()
    assert [x["truncated"] for x in body["results"]] == [False, True]
    assert "input 1 was cut" in body["warnings"][0]
    ref = _alone(model, tokenizer, adapters_dir, "alpha", [LONG])[
        0
    ]  # classify cuts it the same way
    for k, p in ref["probabilities"].items():
        assert abs(body["results"][1]["probabilities"][k] - p) < 1e-5
    r = client.post(
        "/v1/classify", json={"adapter": "alpha", "inputs": ["ok", LONG], "strict": True}
    )
    assert r.status_code == 413 and "input 1" in _err(r)["message"]


def test_long_prompt_is_cut_for_completions_and_413_for_chat(chat_client):
    """Completions cut a prompt that does not fit the context as training cuts inputs (and
    say so, in the stream too); strict gets 413. Chat messages are never cut: 413 naming
    messages. The next request is served as usual."""
    context = chat_client.app.state.softprompt.context  # 256 for the tiny model
    huge = LONG * 3
    body = {"model": "alpha", "prompt": huge, "max_tokens": 4, "temperature": 0}
    r = chat_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    budget = context - 4 - 4  # the prompt's 4 vectors and max_tokens
    assert r.json()["usage"]["prompt_tokens"] == budget
    assert r.json()["warnings"] == [f"prompt 0 was cut at the end to fit {budget} tokens"]
    with chat_client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert events[0]["warnings"] == r.json()["warnings"]
    assert all("warnings" not in e for e in events[1:])
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == r.json()["choices"][0]["text"]  # fmt: skip
    r = chat_client.post("/v1/completions", json={**body, "strict": True})
    assert r.status_code == 413 and "prompt 0" in _err(r)["message"]
    assert _err(r)["type"] == "input_too_long"
    chat = {"model": "alpha", "messages": [{"role": "user", "content": huge}], "max_tokens": 4}
    for extra in ({}, {"stream": True}):
        r = chat_client.post("/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 413 and _err(r)["param"] == "messages", r.text
        assert f"context of {context}" in _err(r)["message"]
    r = chat_client.post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": "hi"}], "max_tokens": context})  # fmt: skip
    assert r.status_code == 413 and "max_tokens" in _err(r)["message"]
    r = chat_client.post("/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_openai_endpoints_refuse_bad_keys_unknown_adapters_and_big_bodies(
    model, chat_tok, chat_dir
):
    app = _app(model, chat_tok, chat_dir, api_key="s3cret", max_body_bytes=5_000)
    good = {"Authorization": "Bearer s3cret"}
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with TestClient(app) as c:
        for path, body in (
            ("/v1/chat/completions", chat),
            ("/v1/chat/completions", {**chat, "stream": True}),
            ("/v1/completions", {"model": "alpha", "prompt": "hi", "stream": True}),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = c.post(path, json=body, headers=headers)
                assert r.status_code == 401 and _err(r)["code"] == "invalid_api_key"
        r = c.post("/v1/chat/completions", json={**chat, "model": "nope"}, headers=good)
        assert r.status_code == 404 and _err(r)["known_adapters"] == ["alpha", "beta", "delta", "gamma", "suf"]  # fmt: skip
        assert "'tiny'" in _err(r)["message"]  # the base model is named too
        big = {**chat, "messages": [{"role": "user", "content": "x" * 6_000}]}
        r = c.post("/v1/chat/completions", json=big, headers=good)
        assert r.status_code == 413 and "5000 bytes" in _err(r)["message"]
        r = c.post("/v1/chat/completions", json={**chat, "n": 2}, headers=good)
        assert r.status_code == 400 and _err(r)["param"] == "n" and "n must be 1" in _err(r)["message"]  # fmt: skip
        r = c.post("/v1/chat/completions", json=chat, headers=good)  # everyone else: served
        assert r.status_code == 200


def _asgi_request(app, path: str, body: dict, sent: list, stall: asyncio.Event):
    """Call the app as a server would for a client that never reads: every body message it
    sends waits on `stall` (a full socket). Returns the app's coroutine."""
    data = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
        "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80), "state": {},
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
    }  # fmt: skip
    messages = [{"type": "http.request", "body": data, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body":
            await stall.wait()

    return app(scope, receive, send)


def test_a_stream_whose_client_does_not_read_ends_and_blocks_nobody(model, chat_tok, chat_dir):
    """A streaming client that never reads: its events fill the stream's buffer and its row
    ends (stops taking decoding steps) while other requests are answered; once the client has
    taken nothing for --stream-timeout-s, its response ends."""
    app = _app(model, chat_tok, chat_dir, max_wait_ms=0, stream_buffer=4, stream_timeout_s=60)
    state = app.state.softprompt
    made: dict[str, int] = {}
    real = state.engine.step

    def step(batch):
        for r, toks in zip(batch.rows, batch.toks, strict=True):
            made[r.predictor.name] = max(made.get(r.predictor.name, 0), len(toks))
        return real(batch)

    state.engine.step = step
    long = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 200,
            "temperature": 0, "stream": True}  # fmt: skip

    async def go():
        sent: list = []
        stall = asyncio.Event()  # never set: the client reads nothing
        stuck = asyncio.ensure_future(_asgi_request(app, "/v1/chat/completions", long, sent, stall))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            metrics = lambda: c.get("/metrics")  # noqa: E731
            while _metric((await metrics()).text, "softprompt_stalled_streams_total", why="buffer") < 1:  # fmt: skip
                await asyncio.sleep(0.01)  # the buffer fills
            others = await asyncio.gather(
                c.post("/v1/classify", json={"adapter": "alpha", "inputs": TEXTS}),
                c.post("/v1/chat/completions", json={**long, "model": "alpha", "max_tokens": 5, "stream": False}),
                c.post("/v1/completions", json={"model": "beta", "prompt": "hi", "max_tokens": 30, "temperature": 0}),
            )  # fmt: skip
            assert not stuck.done() and sent[0]["status"] == 200  # still open, 60 s to go
            # a client that takes nothing for the timeout: its response ends there
            state.config.stream_timeout_s = 0.2
            stuck_too = asyncio.ensure_future(_asgi_request(app, "/v1/chat/completions", long, [], stall))  # fmt: skip
            await asyncio.wait_for(stuck_too, 30)
            text = (await metrics()).text
            stuck.cancel()
        return others, sent, text

    others, sent, metrics = asyncio.run(go())
    assert [r.status_code for r in others] == [200, 200, 200]
    assert others[2].json()["usage"]["completion_tokens"] == 30
    # the buffer (4 events) filled: the rows ended a few tokens in, long before 200
    assert made["tiny"] < 20, made
    assert sent[-1]["type"] == "http.response.body" and sent[-1].get("more_body")  # cut short
    assert _metric(metrics, "softprompt_stalled_streams_total", why="buffer") == 2
    assert _metric(metrics, "softprompt_stalled_streams_total", why="timeout") == 1
    assert state.batcher.queue_depth == 0


def test_unload_while_its_generation_runs(model, chat_tok, chat_dir):
    """A streamed chat and a completion of an adapter unloaded mid-generation (both held at
    their third token until the unload is done) finish with the answer they would have had;
    other adapters are served meanwhile; new requests for it 404."""
    app = _app(model, chat_tok, chat_dir, max_wait_ms=0, allow_adapter_admin=True)
    state = app.state.softprompt
    chat = {"model": "eps", "messages": [{"role": "user", "content": TEXTS[0]}], "max_tokens": 40, "temperature": 0}  # fmt: skip
    done = {"model": "eps", "prompt": TEXTS[1], "max_tokens": 40, "temperature": 0}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.post("/v1/adapters", json={"path": "more/eps"}).status_code == 201
        want_chat = c.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]  # fmt: skip
        want_done = c.post("/v1/completions", json=done).json()["choices"][0]["text"]

        both_in = threading.Event()

        def both(b) -> bool:
            """Held once both rows of eps decode, 3 tokens in; the first to get there waits
            for the other (on a loaded machine one could otherwise finish before the other
            joins the batch)."""
            eps = [len(t) for r, t in zip(b.rows, b.toks, strict=True) if r.predictor.name == "eps"]  # fmt: skip
            if len(b.rows) == 2 and len(eps) == 2 and min(eps) >= 3:
                both_in.set()
                return True
            return len(b.rows) == 1 and len(eps) == 1 and eps[0] >= 3

        gate = StepGate(state, both)
        box: dict = {}

        def stream():
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}, timeout=30) as s:  # fmt: skip
                box["pieces"] = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]  # fmt: skip

        threads = [
            threading.Thread(target=stream),
            threading.Thread(
                target=lambda: box.setdefault(
                    "r", httpx.post(f"{url}/v1/completions", json=done, timeout=30)
                )
            ),  # fmt: skip
        ]
        for t in threads:
            t.start()
        _waited(both_in)  # both generating, held
        assert c.delete("/v1/adapters/eps").json() == {"deleted": "eps"}
        r = c.post("/v1/completions", json=done)
        assert r.status_code == 404 and "eps" not in _err(r)["known_adapters"]
        r = c.post("/v1/classify", json={"adapter": "alpha", "inputs": TEXTS})
        assert r.status_code == 200
        gate.release.set()
        for t in threads:
            t.join(30)
    pieces = box["pieces"]
    assert not any("error" in p for p in pieces)
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"]) == want_chat  # fmt: skip
    assert box["r"].status_code == 200 and box["r"].json()["choices"][0]["text"] == want_done


def test_load_and_unload_adapters(client, adapters_dir):
    r = client.post("/v1/adapters", json={"path": "../../etc"})
    assert r.status_code == 403 and "outside" in _err(r)["message"]
    r = client.post("/v1/adapters", json={"path": "/etc"})
    assert r.status_code == 403
    r = client.post("/v1/adapters", json={"path": "more/missing"})
    assert r.status_code == 404
    r = client.post("/v1/adapters", json={"path": "wide"})
    assert r.status_code == 400 and "hidden size" in _err(r)["message"]
    r = client.post("/v1/adapters", json={"path": "more/eps"})
    assert r.status_code == 201 and r.json()["loaded"] == "eps"
    r = client.post("/v1/adapters", json={"path": str(adapters_dir / "more" / "eps")})
    assert r.status_code == 409
    r = client.post("/v1/adapters", json={"path": "more/eps", "name": "../bad"})
    assert r.status_code == 400 and "name" in _err(r)["message"]
    r = client.post("/v1/classify", json={"adapter": "eps", "inputs": ["hello"]})
    assert r.status_code == 200
    assert client.delete("/v1/adapters/eps").json() == {"deleted": "eps"}
    assert client.delete("/v1/adapters/eps").status_code == 404
    r = client.post("/v1/classify", json={"adapter": "eps", "inputs": ["hello"]})
    assert r.status_code == 404


def test_api_key_is_required_everywhere_but_health_and_the_page(model, tokenizer, adapters_dir):
    app = _app(model, tokenizer, adapters_dir, api_key="s3cret")
    with TestClient(app) as c:
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
            ("POST", "/v1/classify", {"adapter": "alpha", "inputs": ["hi"]}),
            ("POST", "/v1/completions", {"model": "alpha", "prompt": "hi"}),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert _err(r)["code"] == "invalid_api_key" and "--api-key" in _err(r)["message"]
            r = c.request(method, path, json=body, headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, (path, r.text)
        assert c.get("/health").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and 'id="api-key"' in page.text


def test_adapter_admin_is_off_unless_the_flag_turns_it_on(model, tokenizer, adapters_dir):
    with TestClient(_app(model, tokenizer, adapters_dir)) as c:
        r = c.post("/v1/adapters", json={"path": "more/eps"})
        assert r.status_code == 403 and "--allow-adapter-admin" in _err(r)["message"]
        r = c.delete("/v1/adapters/alpha")
        assert r.status_code == 403 and "--allow-adapter-admin" in _err(r)["message"]
        assert "alpha" in [m["id"] for m in c.get("/v1/models").json()["data"]]


def test_openai_client_sends_the_api_key(model, tokenizer, adapters_dir):
    openai = pytest.importorskip("openai")
    with running(_app(model, tokenizer, adapters_dir, api_key="s3cret")) as url:
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", timeout=30, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", timeout=30, max_retries=0)
        assert "alpha" in {m.id for m in good.models.list()}


def test_metrics_are_prometheus_text(client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> str:
        return client.get("/metrics").text

    before = scrape()
    client.post("/v1/classify", json={"adapter": "alpha", "inputs": TEXTS})
    r = client.post("/v1/completions", json={"model": "beta", "prompt": "hi", "max_tokens": 3})
    client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    after = scrape()
    kinds = {f.name: f.type for f in text_string_to_metric_families(after)}
    for name, kind in (
        ("softprompt_requests", "counter"),
        ("softprompt_prompt_tokens", "counter"),
        ("softprompt_generation_tokens", "counter"),
        ("softprompt_kv_cache_hits", "counter"),
        ("softprompt_kv_cache_misses", "counter"),
        ("softprompt_request_seconds", "histogram"),
        ("softprompt_queue_seconds", "histogram"),
        ("softprompt_batch_rows", "histogram"),
        ("softprompt_queue_depth", "gauge"),
        ("softprompt_kv_cache_bytes", "gauge"),
        ("softprompt_prompt_bytes", "gauge"),
    ):
        assert kinds.get(name) == kind, (name, kinds.get(name))

    def grew(name: str, **labels) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("softprompt_requests_total", adapter="alpha", endpoint="/v1/classify", status="200") == 1  # fmt: skip
    assert grew("softprompt_requests_total", adapter="beta", endpoint="/v1/completions", status="200") == 1  # fmt: skip
    assert grew("softprompt_requests_total", adapter="", endpoint="/v1/completions", status="404") == 1  # fmt: skip
    tok = client.app.state.softprompt.tokenizer
    alpha = client.app.state.softprompt.entries["alpha"]
    want = sum(len(input_token_ids(tok, alpha.task, t, alpha.budget)) for t in TEXTS)
    assert grew("softprompt_prompt_tokens_total", adapter="alpha") == want
    usage = r.json()["usage"]
    assert grew("softprompt_prompt_tokens_total", adapter="beta") == usage["prompt_tokens"]
    assert grew("softprompt_generation_tokens_total", adapter="beta") == usage["completion_tokens"]
    assert grew("softprompt_queue_seconds_count") == 2  # one per answered request
    assert grew("softprompt_batch_rows_sum") == len(TEXTS) + 1
    assert grew("softprompt_kv_cache_hits_total") + grew("softprompt_kv_cache_misses_total") >= 2
    kv = client.app.state.softprompt.kv
    assert _metric(after, "softprompt_kv_cache_misses_total") == kv.misses


def test_playground_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "softprompt playground" in r.text


# --------------------------------------------------------------------------- real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """A real uvicorn server in a thread on a free port; stopped (gracefully) on exit."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture(scope="module")
def slow_server(model, tokenizer, adapters_dir):
    """Batches wait 300 ms to fill: requests sent together share a batch."""
    app = _app(
        model, tokenizer, adapters_dir, max_wait_ms=300, max_batch_size=64, allow_adapter_admin=True
    )
    with running(app) as url:
        yield SimpleNamespace(url=url, state=app.state.softprompt)


def test_concurrent_requests_share_a_batch_and_match_alone(model, tokenizer, adapters_dir):
    """Requests sent together share one batch: it holds exactly their 6 rows (--max-batch-size
    6), and waits for them as long as it takes (--max-wait-ms of a minute)."""
    jobs = [("alpha", TEXTS[:2]), ("gamma", TEXTS[2:]), ("beta", [TEXTS[1]]), ("alpha", [LONG])]
    app = _app(model, tokenizer, adapters_dir, max_wait_ms=60_000, max_batch_size=6)

    async def go(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/classify", json={"adapter": a, "inputs": x}) for a, x in jobs)
            )

    with running(app) as url:
        replies = asyncio.run(go(url))
        metrics = httpx.get(f"{url}/metrics").text
    for (name, texts), r in zip(jobs, replies, strict=True):
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["results"], _alone(model, tokenizer, adapters_dir, name, texts), strict=True):  # fmt: skip
            assert got["label"] == want["label"]
            for k, p in want["probabilities"].items():
                assert abs(got["probabilities"][k] - p) < 1e-5
    assert _metric(metrics, "softprompt_batch_adapters_count") == 1
    assert _metric(metrics, "softprompt_batch_adapters_sum") == 3
    assert _metric(metrics, "softprompt_batch_rows_sum") == 6


def _metric(text: str, name: str, **labels) -> float:
    """The sum of the samples called `name` with these labels, parsed with prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_openai_client_completions(slow_server, model, tokenizer, adapters_dir):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=f"{slow_server.url}/v1", api_key="unused", timeout=30, max_retries=0)
    assert {m.id for m in c.models.list()} == {"tiny", "alpha", "beta", "gamma", "delta"}
    out = c.completions.create(model="gamma", prompt=TEXTS[0], max_tokens=5, temperature=0)
    prompt = SoftPrompt.load(str(adapters_dir / "gamma"), model, tokenizer).prompt
    x = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    ref = generate(model, prompt_kv(model, prompt), x, torch.ones_like(x), max_new_tokens=5,
                   eos_token_id=tokenizer.eos_token_id)[0]  # fmt: skip
    assert out.choices[0].text == tokenizer.decode(ref, skip_special_tokens=True)
    assert out.usage.completion_tokens == len(ref) and out.model == "gamma"
    if len(out.choices[0].text) > 1:
        stop = out.choices[0].text[1:3]
        cut = c.completions.create(
            model="gamma", prompt=TEXTS[0], max_tokens=5, temperature=0, stop=[stop]
        )
        assert cut.choices[0].text == out.choices[0].text[: out.choices[0].text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
    sampled = c.completions.create(
        model="alpha", prompt=["a", "b"], max_tokens=3, temperature=0.8, top_p=0.9
    )
    assert [ch.index for ch in sampled.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="alpha", prompt="hi", n=2)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="hi")


def _on_submit(state, adapter: str) -> threading.Event:
    """An event set once a request for `adapter` is queued in the batcher."""
    queued, real = threading.Event(), state.batcher.submit

    def submit(rows):
        job = real(rows)
        if rows[0].predictor.name == adapter:
            queued.set()
        return job

    state.batcher.submit = submit
    return queued


def test_unload_while_requests_are_queued(slow_server):
    queued = _on_submit(slow_server.state, "eps")
    with httpx.Client(base_url=slow_server.url, timeout=30) as c:
        assert c.post("/v1/adapters", json={"path": "more/eps"}).status_code == 201
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("r", c.post("/v1/classify", json={"adapter": "eps", "inputs": TEXTS})))  # fmt: skip
        t.start()
        _waited(queued)
        assert c.delete("/v1/adapters/eps").status_code == 200
        t.join(30)
        assert box["r"].status_code == 200  # queued before the unload: it finishes
        assert c.post("/v1/classify", json={"adapter": "eps", "inputs": ["x"]}).status_code == 404
        assert c.get("/health").json()["kv_cache"]["entries"] <= 4
    del slow_server.state.batcher.submit


def test_client_disconnect_does_not_hurt_others(slow_server):
    """A client leaves while its rows are in the model (held there until the server has seen it
    leave): its request is counted as 499 and a disconnect; the next request is answered."""
    url, state = slow_server.url, slow_server.state
    entered, release, real = threading.Event(), threading.Event(), state.engine.run

    def run(rows):
        if rows[0].predictor.name == "beta" and not release.is_set():
            entered.set()
            release.wait(60)
        return real(rows)

    state.engine.run = run
    metrics = lambda: httpx.get(f"{url}/metrics").text  # noqa: E731
    before = _metric(metrics(), "softprompt_client_disconnects_total")

    async def leave():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = asyncio.ensure_future(c.post("/v1/classify", json={"adapter": "beta", "inputs": TEXTS}))  # fmt: skip
            await asyncio.to_thread(_waited, entered)
            r.cancel()  # the client goes away

    try:
        asyncio.run(leave())
        _until(lambda: _metric(metrics(), "softprompt_client_disconnects_total") == before + 1, "the disconnect")  # fmt: skip
    finally:
        release.set()
        del state.engine.run
    r = httpx.post(f"{url}/v1/classify", json={"adapter": "beta", "inputs": TEXTS}, timeout=30)
    assert r.status_code == 200
    assert _metric(metrics(), "softprompt_requests_total", adapter="beta", status="499") >= 1


def _wait_ready(proc, url: str, log: Path) -> None:
    """Wait (60 s at most) until a `softprompt serve` subprocess answers /health with 200."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        assert time.monotonic() < deadline, "server did not start: " + log.read_text()
        time.sleep(0.1)


def _half_sent(port: int, path: str, body: dict, headers: dict) -> tuple[socket.socket, bytes]:
    """A request sent but for the last byte of its body: in flight until the rest is sent."""
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data[:-1])
    return sock, data[-1:]


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.parametrize("sig, key", [(signal.SIGINT, None), (signal.SIGTERM, "k3y")])
def test_cli_serve_drains_on_a_signal_then_exits(sig, key, tiny_model_dir, adapters_dir, tmp_path):
    """SIGINT or SIGTERM: uvicorn's graceful shutdown stops taking connections, the request in
    flight still gets its answer, then the process exits 0. (With SIGTERM the key comes from
    SOFTPROMPT_API_KEY.) The request is held in flight by the last byte of its body."""
    import http.client

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("SOFTPROMPT_API_KEY", None)
    auth = {}
    if key:
        env["SOFTPROMPT_API_KEY"] = key
        auth = {"Authorization": f"Bearer {key}"}
    cmd = [sys.executable, "-m", "softprompt.cli", "serve", "--model", str(tiny_model_dir),
           "--adapters", str(adapters_dir), "--port", str(port), "--log-level", "warning"]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        if key:
            assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401
        body = {"adapter": "alpha", "inputs": TEXTS}
        sock, rest = _half_sent(port, "/v1/classify", body, auth)
        _until(lambda: httpx.get(f"{url}/health", timeout=5).json()["in_flight"] == 1, "the request")  # fmt: skip
        proc.send_signal(sig)
        _until(lambda: _refused(url), "the server to stop taking connections")
        assert proc.poll() is None  # draining: the request is in flight
        sock.sendall(rest)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        assert reply.status == 200
        assert len(json.loads(reply.read())["results"]) == 4
        sock.close()
        assert proc.wait(30) == 0, log.read_text()
        assert "refused adapter wide" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_is_503_while_loading(model, tokenizer, adapters_dir):
    app = _app(model, tokenizer, adapters_dir)
    r = TestClient(app).get("/health")  # no `with`: the startup has not run
    assert r.status_code == 503 and r.json()["status"] == "loading"
    with TestClient(app) as c:
        r = c.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_cli_serve_without_extra_names_the_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    from softprompt.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "fastapi" else real(n, *a)
    )
    assert main(["serve", "--adapters", str(tmp_path)]) == 2
    assert "pip install 'softprompt[serve]'" in capsys.readouterr().err


# --------------------------------------------------------------------------- browser


def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium and chromedriver are not installed (scripts/setup.sh installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


def _shown(browser) -> dict[str, tuple[float, float]]:
    """The page's classification: label -> (the probability it prints, its bar's width as a
    share of the bar's track)."""
    from selenium.webdriver.common.by import By

    shown = {}
    for row in browser.find_elements(By.CSS_SELECTOR, "#probabilities tr[data-label]"):
        bar, track = (row.find_element(By.CSS_SELECTOR, c) for c in (".bar", ".track"))
        assert track.is_displayed() and track.size["height"] > 0
        share = bar.size["width"] / track.size["width"]
        shown[row.get_attribute("data-label")] = (float(row.find_element(By.CSS_SELECTOR, ".prob").text), share)  # fmt: skip
    return shown


@pytest.mark.browser
def test_playground_in_a_headless_browser(model, tokenizer, adapters_dir):
    """The page opens on the first adapter that can classify (not the base model, listed first)
    in classify mode, and shows each label's probability as a number and as a bar."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _chrome()
    try:
        with running(_app(model, tokenizer, adapters_dir)) as url:
            browser.set_page_load_timeout(30)
            browser.get(url + "/")
            wait = WebDriverWait(browser, 30)
            wait.until(
                lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
            )
            picker = Select(browser.find_element(By.ID, "adapter"))
            assert picker.options[0].get_attribute("value") == "tiny"  # the base model: no labels
            assert picker.first_selected_option.get_attribute("value") == "alpha"
            assert browser.find_element(By.ID, "mode-classify").is_selected()
            browser.find_element(By.ID, "text").send_keys(TEXTS[0])
            for name, labels in (("alpha", {"complaint", "no complaint"}), ("gamma", {"yes", "no", "maybe so"})):  # fmt: skip
                picker.select_by_value(name)
                browser.find_element(By.ID, "run").click()
                n = len(labels)
                wait.until(lambda b, n=n: len(b.find_elements(By.CSS_SELECTOR, "#probabilities td.prob")) == n)  # fmt: skip
                shown = _shown(browser)
                want = _alone(model, tokenizer, adapters_dir, name, [TEXTS[0]])[0]
                assert set(shown) == labels
                for k, p in want["probabilities"].items():
                    assert abs(shown[k][0] - p) < 1e-4
                    assert abs(shown[k][1] - p) < 0.02, (k, shown[k], p)  # the bar's length
                assert browser.find_element(By.ID, "label").text == want["label"]
            # the base model cannot classify: picking it switches to completion mode
            picker.select_by_value("tiny")
            assert browser.find_element(By.ID, "mode-complete").is_selected()
            browser.find_element(By.ID, "run").click()
            wait.until(lambda b: b.find_elements(By.ID, "completion"))
    finally:
        browser.quit()


def _png(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.browser
def test_playground_chat_streams_the_answer(model, chat_tok, chat_dir, tmp_path):
    """Chat mode: the answer arrives piece by piece from a streamed /v1/chat/completions and
    ends equal to the non-streamed answer; the page (with an API key) shows it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    pytest.importorskip("PIL")
    app = _app(model, chat_tok, chat_dir, max_wait_ms=0, api_key="s3cret")

    def some_text(batch) -> bool:  # hold the answer once some of it was sent to the page
        return any(r.on_token.__self__.sent > 0 for r in batch.rows)  # (its TextStream)

    gate = StepGate(app.state.softprompt, some_text)
    gate.release.set()  # not for the reference answer
    message = TEXTS[2]
    browser = _chrome()
    try:
        with running(app) as url:
            want = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "alpha", "messages": [{"role": "user", "content": message}],
                      "max_tokens": 24, "temperature": 0},
                headers={"Authorization": "Bearer s3cret"},
                timeout=30,
            ).json()["choices"][0]["message"]["content"]  # fmt: skip
            assert len(want) > 3, want
            browser.set_window_size(1000, 1000)
            browser.set_page_load_timeout(30)
            browser.get(url + "/")
            wait = WebDriverWait(browser, 30)
            ready = lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"  # noqa: E731
            wait.until(ready)
            assert browser.find_element(By.ID, "key-box").is_displayed()  # 401: the page asks
            browser.find_element(By.ID, "api-key").send_keys("s3cret")
            browser.find_element(By.ID, "save-key").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#adapter option[value=alpha]"))
            Select(browser.find_element(By.ID, "adapter")).select_by_value("alpha")
            browser.find_element(By.ID, "mode-chat").click()
            box = browser.find_element(By.ID, "max-tokens")
            box.clear()
            box.send_keys("24")
            conversation = browser.find_element(By.ID, "conversation")
            assert conversation.is_displayed()
            before = conversation.screenshot_as_png
            (tmp_path / "chat-before.png").write_bytes(before)
            browser.find_element(By.ID, "text").send_keys(message)
            gate.release.clear()
            browser.find_element(By.ID, "run").click()
            js = "const a = document.getElementById('answer'); return a ? a.textContent : null;"
            text = lambda b: b.execute_script(js)  # noqa: E731
            _waited(gate.held)
            wait.until(lambda b: text(b))  # the answer so far, while the model is held
            partial = text(browser)
            assert partial != want and want.startswith(partial), partial
            assert not browser.find_elements(By.CSS_SELECTOR, "#answer[data-answer-done]")
            gate.release.set()
            WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#answer[data-answer-done]"))  # fmt: skip
            assert not browser.find_elements(By.ID, "error")
            assert text(browser) == want
            answer = browser.find_element(By.ID, "answer")
            assert int(answer.get_attribute("data-pieces")) > 1  # token by token, not at once
            assert browser.find_element(By.CSS_SELECTOR, ".msg.user .content").text == message
            shot = answer.screenshot_as_png
            (tmp_path / "chat-answer.png").write_bytes(shot)
            after = conversation.screenshot_as_png
            (tmp_path / "chat-after.png").write_bytes(after)
            img = _png(shot)
            background = img.getpixel((1, 1))
            differ = sum(1 for p in img.getdata() if p != background)
            assert differ > 50, "the answer's screenshot is blank"
            assert _png(before).size != _png(after).size or _png(before).tobytes() != _png(after).tobytes()  # fmt: skip
            assert "finish:" in browser.find_element(By.ID, "result").text
    finally:
        browser.quit()


def test_json_error_shape_matches_openai(client):
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    err = _err(r)
    assert set(err) >= {"message", "type"} and json.dumps(err)


def test_bad_settings_are_reported_together(model, tokenizer, tmp_path):
    from softprompt.errors import SoftpromptError

    with pytest.raises(SoftpromptError, match="--max-batch-size.*--kv-cache-mb"):
        _app(model, tokenizer, tmp_path, max_batch_size=0, kv_cache_mb=-1)
    with pytest.raises(SoftpromptError, match="no such folder"):
        _app(model, tokenizer, tmp_path / "missing")


def test_a_request_the_engine_refuses_is_a_400_with_its_message(model, chat_tok, chat_dir):
    """When the engine raises SoftpromptError for a request (here: beta, as an adapter that
    cannot generate text would), that request gets 400 with the one-line message, streamed or
    not; a request batched with it is answered as usual."""
    from softprompt.errors import SoftpromptError

    app = _app(model, chat_tok, chat_dir, max_wait_ms=0)
    engine = app.state.softprompt.engine
    why = "beta cannot generate text: it is a classification head; use /v1/classify"
    real_begin, real_run = engine.begin, engine.run

    def begin(rows):
        if any(r.predictor.name == "beta" for r in rows):
            raise SoftpromptError(why)
        return real_begin(rows)

    def run(rows):
        if any(r.predictor.name == "gamma" for r in rows):
            raise SoftpromptError("gamma: " + why)
        return real_run(rows)

    engine.begin, engine.run = begin, run
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with TestClient(app) as c:
        for path, body in (
            ("/v1/completions", {"model": "beta", "prompt": "hi", "max_tokens": 3}),
            ("/v1/completions", {"model": "beta", "prompt": "hi", "max_tokens": 3, "stream": True}),
            ("/v1/chat/completions", {"model": "beta", **chat}),
            ("/v1/chat/completions", {"model": "beta", **chat, "stream": True}),
            ("/v1/classify", {"adapter": "gamma", "inputs": TEXTS}),
        ):
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            assert why in _err(r)["message"] and "\n" not in _err(r)["message"]
            assert _err(r)["type"] == "invalid_request_error"
        assert c.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3}).status_code == 200  # fmt: skip
        assert c.post("/v1/classify", json={"adapter": "alpha", "inputs": TEXTS}).status_code == 200  # fmt: skip

    # in one batch with a request the engine takes, only the refused one fails
    from softprompt.serve.batcher import Batcher

    batcher = Batcher(engine, max_wait_ms=0)
    state = app.state.softprompt
    rows = {n: state.engine.encode(state.entries[n], TEXTS[0])[0] for n in ("alpha", "gamma")}
    from softprompt.predictors import ClassifyRow

    async def both():
        jobs = [batcher.submit([ClassifyRow(state.entries[n], ids)]) for n, ids in rows.items()]
        batcher.start()
        return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)

    ok, refused = asyncio.run(both())
    batcher.close()
    assert isinstance(refused, SoftpromptError) and why in str(refused)
    assert len(ok[0]) == 2


def test_docs_describe_every_request_response_and_stream_chunk(client):
    schema = client.get("/openapi.json").json()
    names = set(schema["components"]["schemas"])
    for model in ("ClassifyRequest", "ClassifyResponse", "CompletionRequest", "CompletionResponse",
                  "CompletionStreamResponse", "ChatRequest", "ChatCompletionResponse",
                  "ChatCompletionStreamResponse", "ModelList", "ModelCard", "LoadRequest",
                  "LoadResponse", "DeleteResponse", "Health", "ErrorResponse"):  # fmt: skip
        assert model in names, model
    ok = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert ok["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionStreamResponse")
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200


def test_settings_come_from_flags_then_environment_variables(monkeypatch, tmp_path):
    from softprompt.cli import parse_command
    from softprompt.errors import SoftpromptError
    from softprompt.serve.settings import ServeConfig

    monkeypatch.setenv("SOFTPROMPT_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("SOFTPROMPT_API_KEY", "from-env")
    monkeypatch.setenv("SOFTPROMPT_PORT", "")  # empty: unset
    cfg = parse_command("serve", ["--adapters", str(tmp_path), "--api-key", "from-flag"])
    assert isinstance(cfg, ServeConfig)
    assert (cfg.max_batch_size, cfg.api_key, cfg.port) == (7, "from-flag", 8000)
    assert parse_command("serve", ["--adapters", str(tmp_path)]).api_key == "from-env"
    monkeypatch.setenv("SOFTPROMPT_MAX_WAIT_MS", "soon")
    with pytest.raises(SoftpromptError) as e:
        parse_command("serve", ["--adapters", str(tmp_path), "--max-batch-size", "0"])
    assert "--max-batch-size (or SOFTPROMPT_MAX_BATCH_SIZE) must be at least 1 (got 0)" in str(e.value)  # fmt: skip
    assert "--max-wait-ms (or SOFTPROMPT_MAX_WAIT_MS): expected a number, got soon" in str(e.value)
    with pytest.raises(SoftpromptError, match="invalid choice: 'loud'"):
        parse_command("serve", ["--adapters", str(tmp_path), "--log-level", "loud"])

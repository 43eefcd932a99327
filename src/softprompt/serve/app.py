"""The HTTP server: one frozen model, many soft prompts, each request with its own.

Endpoints (every error is JSON: {"error": {"message", "type", ...}}):
    POST   /v1/classify          {adapter, inputs: [...], strict?}: label and probabilities
    POST   /v1/completions       OpenAI-compatible (model = adapter name or the base model);
                                 stream (server-sent events), stop, logprobs, echo
    POST   /v1/chat/completions  OpenAI-compatible chat: the base tokenizer's chat template
    GET    /v1/models            OpenAI-compatible list: the base model, then the adapters
    POST   /v1/adapters          {path, name?}: load an adapter from under the adapters folder
    DELETE /v1/adapters/{name}   unload (its queued requests still finish); both only with
                                 --allow-adapter-admin
    GET    /health, /metrics     status (503 while starting or draining); Prometheus text
    GET    /                     the playground page

With --api-key every request but /health and / needs `Authorization: Bearer <key>`.
A streaming client that does not read is cut off (--stream-buffer, --stream-timeout-s) so that it
never holds a decoding row or the server for long.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import Task, encode_input, suffix_placeholders
from ..engine import ClassifyRow, Engine, GenerateRow, Predictor, PromptLogprobRow, raw_task
from ..errors import SoftpromptError
from .batcher import Batcher, Closed
from .registry import load_predictor, scan_folder
from .settings import ServeConfig
from .text import TextStream, token_text

log = logging.getLogger("softprompt.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.extra = extra


def error_body(message: str, type_: str, **extra) -> dict:
    return {"error": {"message": message, "type": type_, **extra}}


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    inputs: list[str]
    strict: bool = False
    """True: an input longer than the adapter allows gets 413 instead of being cut."""


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    """0 (with echo and logprobs): only score the prompt, as lm-eval-harness does."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    echo: bool = False
    """The prompt in front of the text (and with logprobs, its tokens' log-probabilities)."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """Each new token's log-probability and the `logprobs` most likely tokens at its place."""
    best_of: int | None = None
    suffix: str | None = None
    strict: bool = False
    stream_options: dict | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    """None: what fits in the context after the messages, at most 256."""
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    name: str | None = None


class Metrics:
    """Prometheus metrics in a registry of their own (one per app)."""

    def __init__(self, state: ServerState):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "softprompt_requests",
            "HTTP requests by adapter (the model named; empty for none), endpoint and status "
            "(499: client went away)",
            ["adapter", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "softprompt_request_seconds",
            "HTTP request latency by endpoint (streams: until the last event)",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.queue_seconds = Histogram(
            "softprompt_queue_seconds",
            "Time a request's rows waited before the model took the first of them",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "softprompt_prompt_tokens",
            "Input tokens by adapter (classify inputs, completion prompts, chat messages)",
            ["adapter"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "softprompt_generation_tokens", "New tokens made by adapter", ["adapter"], registry=r
        )
        self.batch_rows = Histogram(
            "softprompt_batch_rows",
            "Rows (inputs) per forward batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_adapters = Histogram(
            "softprompt_batch_adapters",
            "Distinct adapters per forward batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "softprompt_batch_seconds",
            "Model time per batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.truncated = Counter(
            "softprompt_truncated_inputs", "Inputs cut to fit the adapter", registry=r
        )
        self.disconnects = Counter(
            "softprompt_client_disconnects",
            "Requests whose client went away before the answer",
            registry=r,
        )
        self.stalled = Counter(
            "softprompt_stalled_streams",
            "Streams ended because their client did not read them, by why (buffer: its "
            "events filled --stream-buffer; timeout: it took no data for --stream-timeout-s)",
            ["why"],
            registry=r,
        )
        gauges = {
            "softprompt_queue_depth": ("Rows waiting for the model", lambda: state.queue_depth),
            "softprompt_adapters_loaded": ("Adapters loaded", lambda: len(state.entries)),
            "softprompt_prompt_bytes": (
                "Bytes of the loaded prompts",
                lambda: sum(e.prompt_bytes for e in state.entries.values()),
            ),
            "softprompt_kv_cache_bytes": ("Bytes of cached prompt KV", lambda: state.kv.bytes),
            "softprompt_kv_cache_entries": ("Adapters with cached KV", lambda: len(state.kv)),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)
        r.register(_CacheCounters(state))

    def on_tokens(self, adapter: str, prompt: int, generated: int = 0) -> None:
        self.prompt_tokens.labels(adapter).inc(prompt)
        if generated:
            self.generation_tokens.labels(adapter).inc(generated)

    def on_batch(self, rows: int, adapters: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_adapters.observe(adapters)
        self.batch_seconds.observe(seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _CacheCounters:
    """The prompt KV cache's hits and misses (counted by the engine) as Prometheus counters."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        kv = self.state.kv
        yield CounterMetricFamily(
            "softprompt_kv_cache_hits", "Prompt KV cache hits (per batch and prompt)", kv.hits
        )
        yield CounterMetricFamily("softprompt_kv_cache_misses", "Prompt KV cache misses", kv.misses)


class ServerState:
    """Everything the endpoints share. Mutated only on the event loop (the worker thread reads
    entries through the rows it is given)."""

    def __init__(self, model, tokenizer, config: ServeConfig, model_name: str):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_name = model_name
        self.root = Path(config.adapters).expanduser().resolve()
        if not self.root.is_dir():
            raise SoftpromptError(
                f"--adapters {config.adapters}: no such folder (give a folder whose sub-folders are adapters)"
            )
        self.engine = Engine(model, tokenizer, kv_cache_bytes=int(config.kv_cache_mb * 1e6))
        self.kv = self.engine.kv_cache
        self.entries, self.refused = scan_folder(self.root, self.engine)
        self.base = self.engine.base_predictor(model_name)
        """The base model itself (no soft prompt), served under `model_name`."""
        if model_name in self.entries:
            del self.entries[model_name]
            self.refused[model_name] = (
                f"the name {model_name!r} is the base model's; rename the adapter's folder"
            )
            log.warning("refused adapter %s: %s", model_name, self.refused[model_name])
        self.created = {name: int(time.time()) for name in self.entries}
        self.metrics = Metrics(self)
        self.batcher = Batcher(
            self.engine,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            on_batch=self.metrics.on_batch,
            on_queue=self.metrics.queue_seconds.observe,
        )
        self.started = False
        self.ready = False
        """True once the app's startup (lifespan) finished; /health says 503 before."""
        self.draining = False
        """True once shutdown began: /health says 503, new requests get 503, in-flight ones finish."""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0
        """HTTP requests being answered (not counting /health), streams included."""
        cfg = model.config
        self.context = (
            getattr(cfg, "max_position_embeddings", None)
            or getattr(cfg, "n_positions", None)
            or 2048
        )

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.batcher.start()

    def get(self, name: str) -> Predictor:
        """The adapter named `name`, or the base model under its own name (404 otherwise)."""
        if name == self.model_name:
            return self.base
        entry = self.entries.get(name)
        if entry is None:
            known = sorted(self.entries)
            raise ApiError(
                404,
                f"unknown adapter {name!r}; known adapters: {', '.join(known) or '(none)'} "
                f"(and the base model, {self.model_name!r})",
                "not_found_error",
                known_adapters=known,
            )
        return entry

    def encode(self, task: Task, text: str, budget: int, strict: bool, what: str):
        """(token ids, truncated?) cut as in training (`data.encode_input`), or 413 if strict."""
        try:
            ids, truncated = encode_input(self.tokenizer, task, text, budget)
        except SoftpromptError as e:
            raise ApiError(400, str(e)) from None
        if truncated and strict:
            raise ApiError(
                413,
                f"{what} has more than the {budget} tokens allowed; shorten it, or leave strict "
                "off to have it cut as in training",
                "input_too_long",
            )
        return ids, truncated

    async def drain(self, timeout: float) -> None:
        """Refuse new requests (503, /health too) and wait for the in-flight ones, at most
        `timeout` seconds."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def submit(self, rows):
        self.start()
        try:
            return self.batcher.submit(rows)
        except Closed as e:
            raise ApiError(503, str(e), "unavailable") from None

    async def run(self, rows, request: Request, on_cancel=None) -> list:
        """Queue rows and wait for them; a client that goes away cancels its queued rows (and
        `on_cancel()` ends its rows in flight)."""
        job = self.submit(rows)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({job.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not job.future.done():
            job.future.cancel()
            if on_cancel is not None:
                on_cancel()
            self.metrics.disconnects.inc()
            raise ApiError(499, "client closed the request", "client_closed")
        try:
            return job.future.result()
        except Exception as e:  # noqa: BLE001
            log.error("request failed: %s", e)
            raise ApiError(500, f"the model failed on this request: {e}", "server_error") from None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


ADAPTER_KEY = "softprompt.adapter"
"""Where an endpoint notes (in the ASGI scope) the adapter a request named, for the metrics."""

OPEN_PATHS = ("/health", "/")
"""Paths that need no API key (the playground page asks for the key itself)."""


def _authorized(scope, key: str) -> bool:
    headers = dict(scope.get("headers") or [])
    got = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = got.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), key)


class Guard:
    """ASGI middleware: refuse requests without the API key (401) and bodies over the limit
    (413) before anything parses them, and count every request in the metrics."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = scope["path"] != "/health"
        if counted:
            self.state.in_flight += 1
        try:
            if counted and self.state.draining:
                await JSONResponse(
                    error_body("the server is shutting down; retry on another one", "unavailable"),
                    503,
                    headers={"Retry-After": "1", "Connection": "close"},
                )(scope, receive, send_status)
                return
            key = self.state.config.api_key
            if key and scope["path"] not in OPEN_PATHS and not _authorized(scope, key):
                await JSONResponse(
                    error_body(
                        "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                        "with the key the server was started with (--api-key)",
                        "invalid_request_error",
                        code="invalid_api_key",
                    ),
                    401,
                    headers={"WWW-Authenticate": "Bearer"},
                )(scope, receive, send_status)
                return
            body = await self._read_body(scope, receive)
            if isinstance(body, JSONResponse):
                await body(scope, receive, send_status)
                return
            if body is None:  # client left while sending
                status[0] = 499
                return
            sent = [False]

            async def replay():
                if not sent[0]:
                    sent[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_status)
        finally:
            if counted:
                self.state.in_flight -= 1
            route = getattr(scope.get("route"), "path", "unmatched")
            m = self.state.metrics
            adapter = scope.get(ADAPTER_KEY, "")
            m.requests.labels(adapter, route, str(status[0])).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)

    async def _read_body(self, scope, receive):
        limit = self.state.config.max_body_bytes
        too_big = JSONResponse(
            error_body(
                f"request body is over the limit of {limit} bytes; send fewer or shorter inputs "
                "per request",
                "request_too_large",
            ),
            status_code=413,
        )
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    return too_big
            except ValueError:
                return JSONResponse(
                    error_body("bad Content-Length header", "invalid_request_error"), 400
                )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_big
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


class _StreamResponse(StreamingResponse):
    """Server-sent events with a write timeout: when the client takes no data for `timeout`
    seconds (its socket buffers are full), `on_stall()` is called and the response ends there
    (the server closes the connection) instead of waiting on that client forever."""

    def __init__(self, content, timeout: float, on_stall, **kw):
        super().__init__(content, **kw)
        self.timeout = timeout
        self.on_stall = on_stall

    async def stream_response(self, send) -> None:
        async def timed_send(message) -> None:
            await asyncio.wait_for(send(message), self.timeout)

        try:
            await super().stream_response(timed_send)
        except TimeoutError:
            self.on_stall()
            await self.body_iterator.aclose()


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"{loc or 'body'}: {err['msg']}")
    return "; ".join(parts) or "invalid request"


def create_app(model, tokenizer, config: ServeConfig, model_name: str = "default") -> FastAPI:
    """The FastAPI app serving every adapter under config.adapters on (model, tokenizer)."""
    state = ServerState(model, tokenizer, config, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        state.loop = asyncio.get_running_loop()
        state.ready = True
        yield
        # uvicorn has already let in-flight requests finish; drain anything left.
        state.draining = True
        await asyncio.to_thread(state.batcher.close)

    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.softprompt = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.type, **exc.extra), exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(_validation_message(exc), "invalid_request_error"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "http_error"), exc.status_code)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return resources.files(__package__).joinpath("static/index.html").read_text()

    @app.get("/health")
    async def health():
        """200 when ready; 503 while loading (startup not finished) and while draining."""
        if state.draining or state.batcher._closed:
            status = "draining"
        else:
            status = "ok" if state.ready else "loading"
        body = {
            "status": status,
            "model": state.model_name,
            "adapters": sorted(state.entries),
            "refused": state.refused,
            "queue_depth": state.queue_depth,
            "kv_cache": {"entries": len(state.kv), "bytes": state.kv.bytes},
            "in_flight": state.in_flight,
        }
        return JSONResponse(body, 200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str, entry: Predictor) -> dict:
        about = entry.describe()
        about["base"] = entry is state.base
        return {
            "id": name,
            "object": "model",
            "created": state.created.get(name, 0),
            "owned_by": "softprompt",
            "softprompt": about,
        }

    @app.get("/v1/models")
    async def list_models():
        """The base model first (no soft prompt), then every adapter by name."""
        cards = [model_card(state.model_name, state.base)]
        cards += [model_card(n, e) for n, e in sorted(state.entries.items())]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return model_card(name, state.get(name))

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest, request: Request):
        entry = state.get(req.adapter)
        request.scope[ADAPTER_KEY] = entry.name  # known names only: bounded label values
        if not req.inputs:
            raise ApiError(400, "inputs is empty; give at least one text")
        if len(req.inputs) > config.max_inputs:
            raise ApiError(
                413, f"{len(req.inputs)} inputs, more than the {config.max_inputs} allowed"
            )
        if entry is state.base:
            raise ApiError(
                400,
                f"{entry.name!r} is the base model (no soft prompt): it has no labels to score; "
                "name an adapter with labels in 'adapter', or use /v1/completions",
                param="adapter",
            )
        if not entry.task.label_names:
            raise ApiError(
                400,
                f"adapter {entry.name!r} has no label names (a plain PEFT adapter without "
                "softprompt.json); use /v1/completions",
            )
        rows, warnings, cut = [], [], []
        for i, text in enumerate(req.inputs):
            ids, truncated = state.encode(entry.task, text, entry.budget, req.strict, f"input {i}")
            rows.append(ClassifyRow(entry, ids))
            cut.append(truncated)
            if truncated:
                warnings.append(
                    f"input {i} was cut to fit {entry.budget} tokens (the adapter's max_length "
                    f"{entry.task.max_length} minus its longest label), as in training"
                )
        state.metrics.truncated.inc(sum(cut))
        probs = await state.run(rows, request)
        state.metrics.on_tokens(entry.name, sum(len(r.ids) for r in rows))
        names = entry.task.label_names
        results = [
            {
                "label": names[max(range(len(p)), key=p.__getitem__)],
                "probabilities": dict(zip(names, p, strict=True)),
                "truncated": t,
            }
            for p, t in zip(probs, cut, strict=True)
        ]
        body = {"adapter": entry.name, "calibrated": entry.bias is not None, "results": results}
        if warnings:
            body["warnings"] = warnings
        return body

    def generation_entry(name: str) -> Predictor:
        entry = state.get(name)
        if entry.is_ensemble:
            raise ApiError(
                400,
                f"{entry.name!r} is an ensemble of {len(entry.members)} prompts: completions use one "
                "prompt; use /v1/classify, or one of its members",
                param="model",
            )
        return entry

    def common_checks(req) -> list[str]:
        """The settings completions and chat share; returns the stop strings."""
        for flag, bad, what in (("n", req.n != 1, "n must be 1 (one completion per prompt)"),):
            if bad:
                raise ApiError(400, what, param=flag)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        return stops

    def room(entry: Predictor, max_tokens: int) -> int:
        """Prompt tokens allowed once the prompt's vectors and max_tokens are counted."""
        budget = state.context - entry.num_virtual_tokens - entry.task.suffix_tokens - max_tokens
        if budget < 1:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} leaves no room in the model's context of "
                f"{state.context} tokens ({entry.num_virtual_tokens} virtual tokens)",
                param="max_tokens",
            )
        return budget

    def gen_row(entry: Predictor, ids: list[int], req, stream: TextStream) -> GenerateRow:
        greedy = req.temperature == 0
        top_p = 1.0 if greedy else req.top_p
        return GenerateRow(entry, ids, req.max_tokens, req.temperature, top_p, stream.on_token)

    def reason(stream: TextStream, hit_eos: bool) -> str:
        return "stop" if hit_eos or stream.stopped else "length"

    async def answer(rows, streams: list[TextStream], request: Request, extra=()) -> list:
        """Wait for the rows (and `extra` rows of other kinds, in the same job); each generate
        row's (text, finish_reason, token infos, new tokens), then each extra row's result."""
        outs = await state.run(
            [*rows, *extra], request, on_cancel=lambda: [s.cancelled.set() for s in streams]
        )
        count_tokens(rows, outs[: len(rows)])
        done: list = []
        for st, (toks, hit_eos) in zip(streams, outs[: len(rows)], strict=True):
            st.finish()
            done.append((st.text, reason(st, hit_eos), st.tokens, toks))
        return done + outs[len(rows) :]

    def prompt_infos(ids: list[int], scores) -> list[dict]:
        """Token infos (as TextStream keeps them) of a prompt's tokens; the first has none."""
        picked, top_ids, top_lp = scores
        dec = functools.partial(token_text, state.tokenizer)
        out = [{"token": dec(ids[0]), "logprob": None, "top": None}]
        for t, lp, ti, tl in zip(ids[1:], picked.tolist(), top_ids.tolist(), top_lp.tolist(), strict=True):  # fmt: skip
            out.append({"token": dec(t), "logprob": lp, "top": {dec(a): b for a, b in zip(ti, tl, strict=True)}})  # fmt: skip
        return out

    def completion_logprobs(infos: list[dict], offset: int = 0) -> dict:
        """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        offsets = []
        for x in infos:
            offsets.append(offset)
            offset += len(x["token"])
        return {
            "tokens": [x["token"] for x in infos],
            "token_logprobs": [x["logprob"] for x in infos],
            "top_logprobs": [x["top"] for x in infos],
            "text_offset": offsets,
        }

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def event_stream(
        rows, streams: list[TextStream], chunk, final_chunk, include_usage: bool, make_usage
    ):
        """Server-sent events: each row's pieces as the model makes them (`chunk(i, piece,
        infos)`), then `final_chunk(i, finish_reason)` per row, the usage if asked for, and
        `data: [DONE]`. A client that leaves ends its rows at their next token; other requests
        in the same batch go on. A client that stays but does not read: once
        `--stream-buffer` events wait for it its rows end (the stream then ends with an error
        event), and once it has taken no data for `--stream-timeout-s` the connection closes."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        overflow = [False]

        def put(i: int, piece: str, infos: list[dict]) -> None:  # on the event loop
            if overflow[0]:
                return
            if q.qsize() >= config.stream_buffer:
                overflow[0] = True
                for st in streams:
                    st.cancelled.set()  # the rows end at their next token
                state.metrics.stalled.labels("buffer").inc()
                log.warning("a stream's client is not reading: its rows ended (buffer full)")
                return
            q.put_nowait((i, piece, infos))

        for i, st in enumerate(streams):
            st.on_piece = functools.partial(
                lambda i, piece, infos: loop.call_soon_threadsafe(put, i, piece, infos), i
            )
        job = state.submit(rows)  # before the response starts: a refusal is a plain 503
        job.future.add_done_callback(lambda _: q.put_nowait(None))

        def on_stall() -> None:
            state.metrics.stalled.labels("timeout").inc()
            log.warning(
                "a stream's client took no data for %s s: closing it", config.stream_timeout_s
            )

        async def events():
            complete = False
            try:
                while (item := await q.get()) is not None:
                    yield sse(chunk(*item))
                if overflow[0]:
                    msg = (
                        f"the stream was ended: {config.stream_buffer} events waited for the "
                        "client to read them (--stream-buffer)"
                    )
                    yield sse(error_body(msg, "stream_overflow"))
                    complete = True
                    return
                try:
                    outs = job.future.result()
                except Exception as e:  # noqa: BLE001 - the stream has begun: say so in it
                    log.error("request failed: %s", e)
                    msg = f"the model failed on this request: {e}"
                    yield sse(error_body(msg, "server_error"))
                    complete = True
                    return
                count_tokens(rows, outs)
                for i, (st, (_, hit_eos)) in enumerate(zip(streams, outs, strict=True)):
                    piece, infos = st.finish()
                    if piece or infos:
                        yield sse(chunk(i, piece, infos))
                    yield sse(final_chunk(i, reason(st, hit_eos)))
                if include_usage:
                    yield sse(make_usage(outs))
                yield "data: [DONE]\n\n"
                complete = True
            finally:
                if not complete:  # the client went away mid-stream
                    for st in streams:
                        st.cancelled.set()
                    job.future.cancel()
                    state.metrics.disconnects.inc()

        return _StreamResponse(
            events(),
            config.stream_timeout_s,
            on_stall,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def include_usage(req) -> bool:
        return bool((req.stream_options or {}).get("include_usage"))

    def count_tokens(rows, outs) -> None:
        state.metrics.on_tokens(
            rows[0].predictor.name, sum(len(r.ids) for r in rows), sum(len(t) for t, _ in outs)
        )

    def usage(rows, outs) -> dict:
        """OpenAI's usage: prompt and new tokens (outs: the engine's (tokens, eos) per row)."""
        prompt_tokens = sum(len(r.ids) for r in rows)
        completion_tokens = sum(len(t) for t, _ in outs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        request.scope[ADAPTER_KEY] = state.get(req.model).name  # known names only
        entry = generation_entry(req.model)
        stops = common_checks(req)
        for flag, bad, what in (
            ("echo", req.echo and req.stream, "echo is not supported with stream"),
            ("best_of", req.best_of not in (None, 1), "best_of must be 1"),
            ("suffix", req.suffix is not None, "suffix is not supported"),
        ):
            if bad:
                raise ApiError(400, what, param=flag)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        if len(prompts) > config.max_inputs:
            raise ApiError(
                413, f"{len(prompts)} prompts, more than the {config.max_inputs} allowed"
            )
        task = raw_task(entry.task)
        budget = room(entry, req.max_tokens)
        rows, warnings, streams = [], [], []
        for i, text in enumerate(prompts):
            ids, truncated = state.encode(task, text, budget, req.strict, f"prompt {i}")
            if truncated:
                state.metrics.truncated.inc()
                warnings.append(f"prompt {i} was cut at the end to fit {budget} tokens")
            if not ids:  # as OpenAI: an empty prompt is the end-of-text token
                ids = [state.tokenizer.eos_token_id]
            streams.append(TextStream(state.tokenizer, stops, logprobs=req.logprobs))
            rows.append(gen_row(entry, ids, req, streams[-1]))
        scored = []
        if req.echo and req.logprobs is not None:  # the prompts' own tokens, scored
            scored = [PromptLogprobRow(entry, r.ids, req.logprobs) for r in rows]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def envelope(choices: list, **extra) -> dict:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": entry.name,
                "choices": choices,
                **extra,
            }

        if req.stream:
            offsets = [0] * len(rows)
            told = [not warnings]

            def first(body: dict) -> dict:
                """The stream's first event carries the warnings (prompts that were cut)."""
                if not told[0]:
                    told[0] = True
                    body["warnings"] = warnings
                return body

            def chunk(i: int, piece: str, infos: list[dict]) -> dict:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = completion_logprobs(infos, offsets[i])
                    offsets[i] += sum(len(x["token"]) for x in infos)
                choice = {"text": piece, "index": i, "logprobs": logprobs, "finish_reason": None}
                return first(envelope([choice]))

            return event_stream(
                rows,
                streams,
                chunk,
                lambda i, why: first(
                    envelope([{"text": "", "index": i, "logprobs": None, "finish_reason": why}])
                ),
                include_usage(req),
                lambda outs: envelope([], usage=usage(rows, outs)),
            )
        done = await answer(rows, streams, request, extra=scored)
        choices = []
        for i, (text, why, infos, _) in enumerate(done[: len(rows)]):
            lead, lead_infos = "", []
            if req.echo:
                ids = [t for t in rows[i].ids if t >= 0]
                lead = prompts[i] if not warnings else state.tokenizer.decode(ids)
                if scored:
                    lead_infos = prompt_infos(ids, done[len(rows) + i])
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(lead_infos + infos)
            choices.append(
                {"text": lead + text, "index": i, "logprobs": logprobs, "finish_reason": why}
            )
        body = envelope(choices, usage=usage(rows, [(d[3], None) for d in done[: len(rows)]]))
        if warnings:
            body["warnings"] = warnings
        return body

    def chat_ids(entry: Predictor, messages: list[ChatMessage]) -> list[int]:
        """The messages rendered with the base tokenizer's chat template (and the assistant's
        turn opened), tokenised; the adapter's suffix placeholders after them, if it has any."""
        tok = state.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(
                400,
                f"the base model {state.model_name!r} has no chat template in its tokenizer, so "
                "messages cannot be rendered; use /v1/completions with a prompt",
                param="messages",
            )
        if not messages:
            raise ApiError(400, "messages is empty; give at least one message", param="messages")
        plain = []
        for i, m in enumerate(messages):
            if isinstance(m.content, list):
                texts = [p.get("text") for p in m.content if isinstance(p, dict)]
                if any(p.get("type") != "text" for p in m.content) or None in texts:
                    raise ApiError(
                        400,
                        f"messages[{i}].content: only text parts ({{type: 'text', text}}) are "
                        "supported",
                        param=f"messages[{i}].content",
                    )
                content = "".join(texts)
            else:
                content = m.content or ""
            plain.append({"role": m.role, "content": content})
        try:
            text = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template's own error (e.g. roles out of order)
            raise ApiError(
                400, f"the chat template refused the messages: {e}", param="messages"
            ) from None
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        return ids + suffix_placeholders(entry.task.suffix_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        request.scope[ADAPTER_KEY] = state.get(req.model).name  # known names only
        entry = generation_entry(req.model)
        stops = common_checks(req)
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        ids = chat_ids(entry, req.messages)
        left = state.context - entry.num_virtual_tokens - len(ids)
        if req.max_tokens is None:
            req.max_tokens = min(256, left)
        if left < max(req.max_tokens, 1):
            raise ApiError(
                413,
                f"the rendered messages are {len(ids)} tokens: with max_tokens {req.max_tokens} "
                f"and {entry.num_virtual_tokens} virtual tokens they do not fit the model's "
                f"context of {state.context}; send fewer or shorter messages or lower max_tokens",
                "input_too_long",
                param="messages",
            )
        stream = TextStream(state.tokenizer, stops)
        rows = [gen_row(entry, ids, req, stream)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def envelope(choices: list, **extra) -> dict:
            return {
                "id": cid,
                "object": "chat.completion.chunk" if req.stream else "chat.completion",
                "created": created,
                "model": entry.name,
                "choices": choices,
                **extra,
            }

        if req.stream:
            started = [False]

            def chunk(i, piece, infos):
                delta = {"content": piece}
                if not started[0]:
                    started[0] = True
                    delta["role"] = "assistant"
                return envelope([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])  # fmt: skip

            return event_stream(
                rows,
                [stream],
                chunk,
                lambda i, why: envelope(
                    [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": why}]
                ),
                include_usage(req),
                lambda outs: envelope([], usage=usage(rows, outs)),
            )
        ((text, why, _, toks),) = await answer(rows, [stream], request)
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": why}
        return envelope([choice], usage=usage(rows, [(toks, None)]))

    def need_admin(what: str) -> None:
        if not config.allow_adapter_admin:
            raise ApiError(
                403,
                f"{what} adapters over HTTP is off; start the server with --allow-adapter-admin "
                "to allow it",
                "forbidden",
            )

    @app.post("/v1/adapters", status_code=201)
    async def load(req: LoadRequest):
        need_admin("loading")
        raw = Path(req.path).expanduser()
        target = (raw if raw.is_absolute() else state.root / raw).resolve()
        if state.root not in target.parents:
            raise ApiError(
                403,
                f"path {req.path!r} is outside the adapters folder {state.root}; only adapters "
                "under it can be loaded",
                "forbidden",
            )
        if not target.is_dir():
            raise ApiError(
                404, f"no adapter folder at {req.path!r} under {state.root}", "not_found_error"
            )
        name = req.name or target.name
        if name == state.model_name:
            raise ApiError(409, f"{name!r} is the base model's name; give another name", "conflict")
        if name in state.entries:
            raise ApiError(409, f"adapter {name!r} is already loaded; unload it first", "conflict")
        try:
            entry = await asyncio.to_thread(load_predictor, target, name, state.engine)
        except SoftpromptError as e:
            raise ApiError(400, str(e), "invalid_adapter") from None
        if name in state.entries:  # loaded by a concurrent request meanwhile
            raise ApiError(409, f"adapter {name!r} is already loaded; unload it first", "conflict")
        state.entries[name] = entry
        state.created[name] = int(time.time())
        log.info("loaded adapter %s (%s)", name, target)
        return {"loaded": name, **model_card(name, entry)}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        need_admin("unloading")
        if name == state.model_name:
            raise ApiError(400, f"{name!r} is the base model; it cannot be unloaded")
        entry = state.get(name)
        del state.entries[name]
        state.created.pop(name, None)
        entry.unloaded = True
        for m in entry.members:
            state.kv.discard(m)
        log.info("unloaded adapter %s", name)
        return {"deleted": name}

    app.add_middleware(Guard, state=state)
    return app

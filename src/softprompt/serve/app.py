"""The HTTP server: one frozen model, many soft prompts, each request with its own.

Endpoints (every error is JSON: {"error": {"message", "type", ...}}; `/docs` describes each):
    POST   /v1/classify          {adapter, inputs: [...], strict?}: label and probabilities
    POST   /v1/completions       OpenAI-compatible (model = adapter name or the base model);
                                 stream (server-sent events), stop, logprobs, echo
    POST   /v1/chat/completions  OpenAI-compatible chat: the base tokenizer's chat template
    GET    /v1/models            OpenAI-compatible list: the base model, then the adapters
    POST   /v1/adapters          {path, name?}: load an adapter from under the adapters folder
    DELETE /v1/adapters/{name}   unload (its queued requests still finish); both only with
                                 --allow-adapter-admin
    GET    /health, /metrics     status (503 while starting or shutting down); Prometheus text
    GET    /                     the playground page

The layout follows vLLM's OpenAI entrypoint: protocol.py (the request, response and stream chunk
models), serving.py (what completions.py and chat.py share), classify.py, routes.py (routers
and their dependencies: state, servings, the API key), metrics.py, state.py (model, engine,
batcher, adapters), errors.py; settings.py holds ServeConfig. batcher.py, registry.py and
text.py use no web framework.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from .chat import ServingChat
from .completions import ServingCompletion
from .errors import add_error_handlers, error_response
from .metrics import RequestMetrics
from .protocol import ChatCompletionStreamResponse, CompletionStreamResponse
from .routes import api, public
from .settings import ServeConfig
from .state import ServerState


def create_app(model, tokenizer, config: ServeConfig, model_name: str = "default") -> FastAPI:
    """The FastAPI app serving every adapter under config.adapters on (model, tokenizer)."""
    state = ServerState(model, tokenizer, config, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        state.ready = True
        yield
        # uvicorn has let the requests in flight finish (--drain-s); finish anything queued
        await asyncio.to_thread(state.batcher.close)

    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.softprompt = state
    app.state.serving_completion = ServingCompletion(state)
    app.state.serving_chat = ServingChat(state)
    app.include_router(api)
    app.include_router(public)
    add_error_handlers(app)
    app.add_middleware(body_limit, limit=config.max_body_bytes)
    app.add_middleware(RequestMetrics, state=state)  # outermost: counts 413s too
    app.openapi = lambda: _openapi(app)
    return app


STREAMS = {
    "/v1/completions": CompletionStreamResponse,
    "/v1/chat/completions": ChatCompletionStreamResponse,
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, and the stream chunks' models as the event-stream responses."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        refs = "#/components/schemas/{model}"
        _, defs = models_json_schema([(m, "serialization") for m in STREAMS.values()], ref_template=refs)  # fmt: skip
        schema["components"]["schemas"].update(defs["$defs"])
        for path, model in STREAMS.items():
            content = schema["paths"][path]["post"]["responses"]["200"]["content"]
            content["text/event-stream"] = {"schema": {"$ref": refs.format(model=model.__name__)}}
        app.openapi_schema = schema
    return app.openapi_schema


def body_limit(app, limit: int):
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything reads it
    (by its Content-Length; a body without one is read here, up to the limit)."""

    async def too_big(scope, receive, send):
        msg = f"request body is over the limit of {limit} bytes; send fewer or shorter inputs per request"  # fmt: skip
        await error_response(413, msg, "request_too_large")(scope, receive, send)

    async def limited(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                bad = error_response(400, "bad Content-Length header", "invalid_request_error")
                return await bad(scope, receive, send)
            if int(length) > limit:
                return await too_big(scope, receive, send)
            return await app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        return await app(scope, lambda: _replay(body, receive), send)

    return limited


async def _replay(body: list, receive):
    """The body read before, then the connection's own messages (a disconnect)."""
    return body.pop() if body else await receive()

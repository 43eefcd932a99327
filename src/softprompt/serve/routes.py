"""The endpoints, as routers whose handlers get what they need from dependencies: the server's
state, the serving of completions and chat, and the API key (FastAPI's HTTP bearer security, so
`/docs` can send it). Every route but /health and the playground page needs the key when the
server has one."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..errors import SoftpromptError
from .chat import ServingChat
from .classify import classify
from .completions import ServingCompletion
from .errors import ApiError
from .protocol import (
    ChatCompletionResponse,
    ChatRequest,
    ClassifyRequest,
    ClassifyResponse,
    CompletionRequest,
    CompletionResponse,
    DeleteResponse,
    ErrorResponse,
    Health,
    KVCacheInfo,
    LoadRequest,
    LoadResponse,
    ModelCard,
    ModelList,
)
from .registry import load_predictor
from .state import ServerState

log = logging.getLogger("softprompt.serve")


def get_state(request: Request) -> ServerState:
    return request.app.state.softprompt


def get_completions(request: Request) -> ServingCompletion:
    return request.app.state.serving_completion


def get_chat(request: Request) -> ServingChat:
    return request.app.state.serving_chat


State = Annotated[ServerState, Depends(get_state)]
bearer = HTTPBearer(auto_error=False, description="The server's --api-key, when it has one.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


async def require_key(creds: Credentials, state: State) -> None:
    key = state.config.api_key
    if key and (creds is None or not hmac.compare_digest(creds.credentials.strip(), key)):
        raise ApiError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
            "key the server was started with (--api-key)",
            headers={"WWW-Authenticate": "Bearer"},
            code="invalid_api_key",
        )


def need_admin(state: ServerState, what: str) -> None:
    if not state.config.allow_adapter_admin:
        raise ApiError(
            403,
            f"{what} adapters over HTTP is off; start the server with --allow-adapter-admin "
            "to allow it",
            "forbidden",
        )


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}
STREAM = {"description": "With stream: server-sent events, then `data: [DONE]`."}
api = APIRouter(dependencies=[Security(require_key)], responses=ERRORS)
public = APIRouter()


@api.post("/v1/classify", tags=["classify"])
async def classify_texts(req: ClassifyRequest, request: Request, state: State) -> ClassifyResponse:
    """Each input's label and each label's probability (label scoring), for one adapter."""
    return await classify(req, request, state)


@api.post("/v1/completions", tags=["openai"], response_model=CompletionResponse, responses={200: STREAM})  # fmt: skip
async def completions(
    req: CompletionRequest,
    request: Request,
    serving: Annotated[ServingCompletion, Depends(get_completions)],
):
    """OpenAI's completions; `model` is an adapter's name or the base model's."""
    return await serving.create(req, request)


@api.post("/v1/chat/completions", tags=["openai"], response_model=ChatCompletionResponse, responses={200: STREAM})  # fmt: skip
async def chat_completions(
    req: ChatRequest, request: Request, serving: Annotated[ServingChat, Depends(get_chat)]
):
    """OpenAI's chat completions, with the base tokenizer's chat template."""
    return await serving.create(req, request)


@api.get("/v1/models", tags=["openai"])
async def list_models(state: State) -> ModelList:
    """The base model first (no soft prompt), then every adapter by name."""
    cards = [state.model_card(state.model_name, state.base)]
    cards += [state.model_card(n, e) for n, e in sorted(state.entries.items())]
    return ModelList(data=cards)


@api.get("/v1/models/{name:path}", tags=["openai"])
async def get_model(name: str, state: State) -> ModelCard:
    return state.model_card(name, state.get(name))


@api.post("/v1/adapters", status_code=201, tags=["admin"])
async def load_adapter(req: LoadRequest, state: State) -> LoadResponse:
    """Load an adapter from under the adapters folder (needs --allow-adapter-admin)."""
    need_admin(state, "loading")
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
    _not_loaded(state, name)
    try:
        entry = await asyncio.to_thread(load_predictor, target, name, state.engine)
    except SoftpromptError as e:
        raise ApiError(400, str(e), "invalid_adapter") from None
    _not_loaded(state, name)  # a concurrent request may have loaded it meanwhile
    state.entries[name] = entry
    state.created[name] = int(time.time())
    log.info("loaded adapter %s (%s)", name, target)
    return LoadResponse(loaded=name, **state.model_card(name, entry).model_dump())


def _not_loaded(state: ServerState, name: str) -> None:
    if name in state.entries:
        raise ApiError(409, f"adapter {name!r} is already loaded; unload it first", "conflict")


@api.delete("/v1/adapters/{name}", tags=["admin"])
async def unload_adapter(name: str, state: State) -> DeleteResponse:
    """Unload an adapter; its queued requests still finish (needs --allow-adapter-admin)."""
    need_admin(state, "unloading")
    if name == state.model_name:
        raise ApiError(400, f"{name!r} is the base model; it cannot be unloaded")
    entry = state.get(name)
    del state.entries[name]
    state.created.pop(name, None)
    entry.unloaded = True
    for m in entry.members:
        state.kv.discard(m)
    log.info("unloaded adapter %s", name)
    return DeleteResponse(deleted=name)


@api.get("/metrics", tags=["health"], response_class=Response)
async def metrics(state: State):
    """Prometheus text."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)


@public.get("/health", tags=["health"], responses={503: {"model": Health}})
async def health(state: State) -> Health:
    """200 when ready; 503 while loading (startup not finished) and while shutting down."""
    body = Health(
        status=state.status,
        model=state.model_name,
        adapters=sorted(state.entries),
        refused=state.refused,
        queue_depth=state.queue_depth,
        kv_cache=KVCacheInfo(entries=len(state.kv), bytes=state.kv.bytes),
        in_flight=state.in_flight,
    )
    if body.status != "ok":
        return JSONResponse(body.model_dump(), 503)
    return body


@public.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground():
    return resources.files(__package__).joinpath("static/index.html").read_text()

"""What completions and chat share (as vLLM's serving engine does for its OpenAI endpoints): the
checks, the generate rows, waiting for the answer, the stream of server-sent events, the usage
and the response's head. `ServingCompletion` and `ServingChat` say what is theirs: how a request
becomes token ids, and the shape of a choice."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError

from ..predictors import GenerateRow, Predictor
from .errors import ApiError
from .metrics import note_adapter
from .protocol import ErrorResponse, UsageInfo
from .state import ServerState, result
from .text import TextStream

log = logging.getLogger("softprompt.serve")


@dataclass
class Finished:
    """A generate row's answer: its text, why it ended, its token infos, its new tokens."""

    text: str
    finish_reason: str
    infos: list[dict]
    tokens: list[int]


class OpenAIServing:
    id_prefix = ""

    def __init__(self, state: ServerState):
        self.state = state

    # ------------------------------------------------------------------ the request

    async def create(self, req, request: Request):
        """The answer to a request: its model and the settings both endpoints take checked,
        then the endpoint's own `respond`."""
        entry = self.predictor(req.model, request)
        return await self.respond(req, request, entry, self.stop_strings(req))

    async def respond(self, req, request: Request, entry: Predictor, stops: list[str]):
        raise NotImplementedError

    def predictor(self, name: str, request: Request) -> Predictor:
        """The adapter (or the base model) to generate with; an ensemble cannot, nor an adapter
        with a classification head."""
        entry = self.state.get(name)
        note_adapter(request, entry.name)
        if not entry.can_generate:
            raise ApiError(
                400,
                f"{entry.name!r} has a classification head (--head): it answers /v1/classify "
                "with label probabilities, not text",
                param="model",
            )
        if entry.is_ensemble:
            raise ApiError(
                400,
                f"{entry.name!r} is an ensemble of {len(entry.members)} prompts: completions use one "
                "prompt; use /v1/classify, or one of its members",
                param="model",
            )
        return entry

    def stop_strings(self, req) -> list[str]:
        """The settings completions and chat share, checked; returns the stop strings."""
        if req.n != 1:
            raise ApiError(400, "n must be 1 (one completion per prompt)", param="n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        return stops

    def row(self, entry: Predictor, ids: list[int], req, max_tokens: int, stream: TextStream):
        top_p = 1.0 if req.temperature == 0 else req.top_p  # greedy
        return GenerateRow(entry, ids, max_tokens, req.temperature, top_p, stream.on_token)

    def head(self, entry: Predictor) -> dict:
        """What every response and chunk of one request starts with."""
        return {"id": f"{self.id_prefix}{uuid.uuid4().hex}", "created": int(time.time()), "model": entry.name}  # fmt: skip

    def usage(self, rows: list[GenerateRow], new_tokens: list[int]) -> UsageInfo:
        """OpenAI's usage: prompt and new tokens (counted in the metrics too)."""
        prompt, new = sum(len(r.ids) for r in rows), sum(new_tokens)
        self.state.metrics.on_tokens(rows[0].predictor.name, prompt, new)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=new, total_tokens=prompt + new)

    # ------------------------------------------------------------------ the answer

    async def answer(self, rows, streams: list[TextStream], request: Request, extra=()) -> list:
        """Wait for the rows (and `extra` rows of other kinds, in the same job): each generate
        row's `Finished`, then each extra row's result."""
        job = self.state.submit([*rows, *extra])
        await self.state.wait(job, request, on_cancel=functools.partial(_cancel, streams))
        outs = result(job)
        done = []
        for st, (toks, hit_eos) in zip(streams, outs[: len(rows)], strict=True):
            st.finish()
            done.append(Finished(st.text, _reason(st, hit_eos), st.tokens, toks))
        return done + outs[len(rows) :]

    async def stream(
        self,
        rows,
        streams: list[TextStream],
        request: Request,
        chunk: Callable[[int, str, list[dict]], BaseModel],
        final_chunk: Callable[[int, str], BaseModel],
        usage_chunk: Callable[[UsageInfo], BaseModel] | None,
    ) -> EventSourceResponse:
        """Server-sent events: each row's pieces as the model makes them (`chunk(i, piece,
        infos)`), then `final_chunk(i, finish_reason)` per row, `usage_chunk(usage)` if asked
        for, and `data: [DONE]`. The response starts with the first piece: a request the engine
        refuses is a plain JSON error. A client that leaves ends its rows at their next token;
        other requests in the same batch go on. A client that stays but does not read: once
        `--stream-buffer` events wait for it its rows end (the stream then ends with an error
        event), and once it has taken no data for `--stream-timeout-s` the connection closes."""
        state, config = self.state, self.state.config
        pump = _Pump(config.stream_buffer, streams, state)
        for i, st in enumerate(streams):
            st.on_piece = functools.partial(pump.put_threadsafe, i)
        job = state.submit(rows)  # before the response starts: a refusal is a plain 503
        job.future.add_done_callback(lambda _: pump.q.put_nowait(None))
        cancel = functools.partial(_cancel, streams)
        first = await state.wait(job, request, on_cancel=cancel, until=pump.q.get())
        if first is None:
            result(job)  # failed before its first piece: raises the request's error

        async def events():
            complete = False
            try:
                item = first
                while item is not None:
                    yield _event(chunk(*item))
                    item = await pump.q.get()
                if pump.overflow:
                    msg = (
                        f"the stream was ended: {config.stream_buffer} events waited for the "
                        "client to read them (--stream-buffer)"
                    )
                    yield _event(_error(msg, "stream_overflow"))
                    complete = True
                    return
                try:
                    outs = job.future.result()
                except Exception as e:  # noqa: BLE001 - the stream has begun: say so in it
                    log.error("request failed: %s", e)
                    yield _event(_error(f"the model failed on this request: {e}", "server_error"))
                    complete = True
                    return
                for i, (st, (_, hit_eos)) in enumerate(zip(streams, outs, strict=True)):
                    piece, infos = st.finish()
                    if piece or infos:
                        yield _event(chunk(i, piece, infos))
                    yield _event(final_chunk(i, _reason(st, hit_eos)))
                usage = self.usage(rows, [len(t) for t, _ in outs])
                if usage_chunk is not None:
                    yield _event(usage_chunk(usage))
                yield {"data": "[DONE]"}
                complete = True
            finally:
                if not complete:  # the client went away (or stalled) mid-stream
                    cancel()
                    job.future.cancel()
                    state.metrics.disconnects.inc()

        def on_stall() -> None:
            state.metrics.stalled.labels("timeout").inc()
            log.warning("a stream's client took no data for %s s: closed it", config.stream_timeout_s)  # fmt: skip

        return _EventStream(
            events(),
            on_stall,
            sep="\n",
            send_timeout=config.stream_timeout_s,
            headers={"Cache-Control": "no-cache"},
        )


class _Pump:
    """A stream's events, from the model's thread to the response (a queue on the loop). When
    `limit` events wait for a client that does not read, its rows end."""

    def __init__(self, limit: int, streams: list[TextStream], state: ServerState):
        self.q: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.limit = limit
        self.streams = streams
        self.state = state
        self.overflow = False

    def put_threadsafe(self, i: int, piece: str, infos: list[dict]) -> None:
        self.loop.call_soon_threadsafe(self.put, i, piece, infos)

    def put(self, i: int, piece: str, infos: list[dict]) -> None:  # on the event loop
        if self.overflow:
            return
        if self.q.qsize() >= self.limit:
            self.overflow = True
            _cancel(self.streams)  # the rows end at their next token
            self.state.metrics.stalled.labels("buffer").inc()
            log.warning("a stream's client is not reading: its rows ended (buffer full)")
            return
        self.q.put_nowait((i, piece, infos))


class _EventStream(EventSourceResponse):
    """sse-starlette's response; a client that takes no data for `send_timeout` is counted
    (`on_stall`) and its response ends there."""

    def __init__(self, content, on_stall: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self.on_stall = on_stall

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            self.on_stall()


def _event(body: BaseModel) -> dict:
    return {"data": body.model_dump_json()}


def _error(message: str, type_: str) -> ErrorResponse:
    return ErrorResponse(error={"message": message, "type": type_})


def _cancel(streams: list[TextStream]) -> None:
    for st in streams:
        st.cancelled.set()


def _reason(stream: TextStream, hit_eos: bool) -> str:
    return "stop" if hit_eos or stream.stopped else "length"

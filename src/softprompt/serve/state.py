"""What every endpoint shares: the model, its engine and batcher, the adapters by name.

Mutated only on the event loop; the batcher's worker thread reads adapters only through the
rows it is given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import Request

from ..data import Task, encode_input
from ..engine import Engine
from ..errors import SoftpromptError
from ..predictors import Predictor
from .batcher import Batcher, Closed
from .errors import ApiError
from .metrics import Metrics
from .protocol import ModelCard
from .registry import scan_folder
from .settings import ServeConfig

log = logging.getLogger("softprompt.serve")


class ServerState:
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

    @property
    def status(self) -> str:
        if self.batcher.closed:
            return "draining"
        return "ok" if self.ready else "loading"

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

    def model_card(self, name: str, entry: Predictor) -> ModelCard:
        about = {**entry.describe(), "base": entry is self.base}
        return ModelCard(id=name, created=self.created.get(name, 0), softprompt=about)

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
        await self.wait(job, request, on_cancel)
        return result(job)

    async def wait(self, job, request: Request, on_cancel=None, until=None):
        """Wait for the job, or for `until` (an awaitable that comes first; its result is
        returned); a client that leaves meanwhile cancels the job: 499."""
        gone = asyncio.ensure_future(_wait_disconnect(request))
        first = asyncio.ensure_future(until) if until is not None else job.future
        try:
            await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not first.done():
            first.cancel()
            job.future.cancel()
            if on_cancel is not None:
                on_cancel()
            self.metrics.disconnects.inc()
            raise ApiError(499, "client closed the request", "client_closed")
        return first.result() if until is not None else None


def result(job) -> list:
    """A finished job's results; the engine's refusal of a request (SoftpromptError, e.g. an
    adapter that cannot generate) is a 400 with its message, any other failure a 500."""
    try:
        return job.future.result()
    except SoftpromptError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:  # noqa: BLE001
        log.error("request failed: %s", e)
        raise ApiError(500, f"the model failed on this request: {e}", "server_error") from None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

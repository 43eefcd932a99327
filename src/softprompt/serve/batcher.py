"""Dynamic batching: one worker thread owns the model; the asyncio side queues rows.

A request is a Job of one or more rows (one per input). Rows of any requests, for any
adapters, that arrive within `max_wait_ms` of each other (up to `max_batch_size` rows) run
together through the inference engine, each after its own adapter's prompt. A row's result
does not depend on the other rows of its batch (up to float rounding).

Generation is batched per decoding step (continuous batching): new generate rows join the
running decode batch between two steps (`Engine.begin`, `merge_decoding`), and a row leaves it
as soon as it ends (`Engine.step`), so a short request never waits for a long one. Classify
and prompt-scoring rows that arrive meanwhile run between two steps (`Engine.run`).

No web framework here; `app.py` turns HTTP requests into Jobs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from ..engine import Engine
from ..errors import SoftpromptError
from ..predictors import ClassifyRow, GenerateRow, PromptLogprobRow
from ..readouts.generation import Decoding, merge_decoding

log = logging.getLogger("softprompt.serve")

Row = ClassifyRow | GenerateRow | PromptLogprobRow


class Closed(Exception):
    """The batcher no longer accepts work (the server is shutting down)."""


class Job:
    """One request's rows; its asyncio future gets every row's result, in order."""

    def __init__(self, rows: Sequence[Row], loop: asyncio.AbstractEventLoop):
        self.rows = list(rows)
        self.results: list = [None] * len(rows)
        self.remaining = len(rows)
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.queued_at = time.monotonic()
        self.started = False

    @property
    def cancelled(self) -> bool:
        return self.future.done()

    def _settle(self, fn: Callable, *args) -> None:
        def apply() -> None:
            if not self.future.done():
                fn(*args)

        try:
            self.loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting
            pass

    def row_done(self, i: int, value) -> None:
        self.results[i] = value
        self.remaining -= 1
        if self.remaining == 0:
            self._settle(self.future.set_result, self.results)

    def fail(self, exc: BaseException) -> None:
        self.remaining = -1
        self._settle(self.future.set_exception, exc)


_STOP = object()


class Batcher:
    """Collects rows from the event loop into batches for one model-owning worker thread.

    `on_batch(rows, adapters, seconds)` is called after every batch, `on_queue(seconds)` once
    per request when the model takes its first row (metrics).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_queue: Callable[[float], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch
        self.on_queue = on_queue
        self._q: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        """Generate rows taken from the queue that did not fit the running batch yet."""
        self._closed = False
        self._thread: threading.Thread | None = None
        self.in_flight = 0
        """Rows taken from the queue and not yet answered."""

    @property
    def queue_depth(self) -> int:
        """Rows waiting for the worker."""
        return self._q.qsize() + len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="softprompt-batcher", daemon=True)
        self._thread.start()

    def submit(self, rows: Sequence[Row]) -> Job:
        """Queue a request's rows; await `job.future` for the results. Call from the loop."""
        if self._closed:
            raise Closed("the server is shutting down")
        job = Job(rows, asyncio.get_running_loop())
        for i in range(len(rows)):
            self._q.put((job, i))
        return job

    def close(self, timeout: float | None = 60.0) -> None:
        """Refuse new work, finish every queued row, stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self, limit: int, wait: bool) -> tuple[list[tuple[Job, int]], bool]:
        """Up to `limit` queued rows (held-back generate rows first), and whether the stop
        mark came. `wait`: block for the first row, then give others `max_wait` to join."""
        items: list = []
        while self._pending and len(items) < limit:
            items.append(self._pending.popleft())
        if wait and not items:
            first = self._q.get()
            if first is _STOP:
                return [], True
            items.append(first)
        deadline = time.monotonic() + (self.max_wait if wait else 0)
        while len(items) < limit:
            left = deadline - time.monotonic()
            try:
                item = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return items, True
            items.append(item)
        return items, False

    def _work(self) -> None:
        stop = False
        running: Decoding | None = None
        owner: dict[int, tuple[Job, int]] = {}  # id(generate row) -> where its answer goes
        while True:
            busy = running is not None and bool(running.rows)
            if not busy and not self._pending and stop:
                return
            items: list = []
            if not stop:
                items, stop = self._take(self.max_batch_size, wait=not busy)
            elif self._pending:
                items, _ = self._take(self.max_batch_size, wait=False)
            items = [(job, i) for job, i in items if not job.cancelled]
            now = time.monotonic()
            for job, _ in items:
                if not job.started:
                    job.started = True
                    if self.on_queue is not None:
                        self.on_queue(now - job.queued_at)
            gen = [it for it in items if isinstance(it[0].rows[it[1]], GenerateRow)]
            other = [it for it in items if not isinstance(it[0].rows[it[1]], GenerateRow)]
            if other:  # classify and scoring rows: between two decoding steps
                self._timed(other, self._run, other)
            room = self.max_batch_size - (len(running.rows) if busy else 0)
            self._pending.extendleft(reversed(gen[room:]))
            if gen[:room]:
                new = self._timed(gen[:room], self._begin, gen[:room])
                if new is not None:
                    began = {id(r) for r in new.rows}  # not the rows of requests that failed
                    for job, i in gen[:room]:
                        if id(job.rows[i]) in began:
                            owner[id(job.rows[i])] = (job, i)
                    running = merge_decoding(running, new) if busy else new
            if running is not None and running.rows:
                running = self._step(running, owner)

    def _timed(self, batch: list[tuple[Job, int]], fn: Callable, *args):
        """fn(*args), counted in the batch metrics as one model pass over `batch`."""
        self.in_flight = len(batch)
        start = time.perf_counter()
        out = fn(*args)
        if self.on_batch is not None:
            adapters = len({id(job.rows[i].predictor) for job, i in batch})
            self.on_batch(len(batch), adapters, time.perf_counter() - start)
        self.in_flight = 0
        return out

    def _begin(self, batch: list[tuple[Job, int]]) -> Decoding | None:
        """New generate rows, run after their prompts; a failure fails their requests only
        (each request's rows tried alone, to find the one at fault)."""
        try:
            return self.engine.begin([j.rows[i] for j, i in batch])
        except Exception as e:  # noqa: BLE001
            parts = _by_job(batch)
            if len(parts) == 1:
                if not isinstance(e, SoftpromptError):
                    log.exception("generation failed to start")
                batch[0][0].fail(_refusal(e))
                return None
        running = None
        for part in parts:
            new = self._begin(part)
            if new is not None:
                running = new if running is None else merge_decoding(running, new)
        return running

    def _step(self, running: Decoding, owner: dict) -> Decoding | None:
        """One decoding step; answers the rows that ended. Rows of requests that were
        cancelled leave first."""
        gone = [r for r in running.rows if owner[id(r)][0].cancelled]
        if gone:
            self.engine.drop(running, gone)
            for r in gone:
                owner.pop(id(r))
            if not running.rows:
                return running
        try:
            ended = self.engine.step(running)
        except Exception:  # noqa: BLE001 - the running batch is lost; its requests fail
            log.exception("decoding step failed")
            for r in running.rows:
                job, _ = owner.pop(id(r))
                if job.remaining > 0:
                    job.fail(RuntimeError("the model failed on this request"))
            return None
        for r, result in ended:
            job, i = owner.pop(id(r))
            if job.remaining > 0:
                job.row_done(i, result)
        return running

    def _run(self, batch: list[tuple[Job, int]]) -> None:
        try:
            results = self.engine.run([job.rows[i] for job, i in batch])
        except Exception as e:  # noqa: BLE001 - find the request at fault; the others still get answers
            parts = _by_job(batch)
            if len(parts) == 1:
                if not isinstance(e, SoftpromptError):
                    log.exception("batch failed")
                batch[0][0].fail(_refusal(e))
                return
            for part in parts:
                self._run(part)
            return
        for (job, i), value in zip(batch, results, strict=True):
            if job.remaining > 0:
                job.row_done(i, value)


def _by_job(batch: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
    """A batch's rows grouped by request, in order."""
    by_job: dict[int, list[tuple[Job, int]]] = {}
    for item in batch:
        by_job.setdefault(id(item[0]), []).append(item)
    return list(by_job.values())


def _refusal(e: Exception) -> Exception:
    """What a request's failure tells its client: the engine's refusal (SoftpromptError: a
    request the model cannot answer, e.g. generation from an ensemble) as it is; any other
    failure without its details."""
    return e if isinstance(e, SoftpromptError) else RuntimeError("the model failed on this request")

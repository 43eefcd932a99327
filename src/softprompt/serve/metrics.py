"""Prometheus metrics, in a registry of their own per app: the counters and histograms the
endpoints and the batcher feed, gauges read from the server's state, and the middleware that
counts every HTTP request by adapter, route and status, with its latency."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .state import ServerState

ADAPTER_KEY = "softprompt.adapter"
"""Where an endpoint notes (in the ASGI scope) the adapter a request named, for the metrics."""


def note_adapter(request, name: str) -> None:
    """Count the request under this adapter (known names only: bounded label values)."""
    request.scope[ADAPTER_KEY] = name


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


class RequestMetrics:
    """ASGI middleware: every HTTP request counted by adapter, route and status (499: the
    client left), its latency observed, and the requests in flight (all but /health)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [499]  # until a response starts: a client that left

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = scope["path"] != "/health"
        self.state.in_flight += counted
        try:
            await self.app(scope, receive, send_status)
        except Exception:
            status[0] = 500 if status[0] == 499 else status[0]
            raise
        finally:
            self.state.in_flight -= counted
            route = getattr(scope.get("route"), "path", "unmatched")
            m = self.state.metrics
            m.requests.labels(scope.get(ADAPTER_KEY, ""), route, str(status[0])).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)

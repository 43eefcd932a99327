"""`softprompt serve`: one frozen model serving many soft prompts over HTTP.

Needs the serve extra (`pip install 'softprompt[serve]'`): FastAPI, uvicorn, prometheus-client.
`batcher.py` and `registry.py` use only torch; `app.py` is the web layer.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path


def run_server(
    adapters: str,
    *,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    kv_cache_mb: float = 256.0,
    max_body_bytes: int = 1_000_000,
    max_inputs: int = 1024,
    stream_buffer: int = 256,
    stream_timeout_s: float = 30.0,
    log_level: str = "info",
    drain_s: float = 60.0,
    api_key: str | None = None,
    allow_adapter_admin: bool = False,
) -> None:
    """Load the base model and every adapter under `adapters` that fits it, then serve until
    SIGINT/SIGTERM: /health turns 503, new requests get 503, in-flight requests (at most
    `drain_s` seconds) finish, then the server exits."""
    import uvicorn

    DrainingServer = _draining_server_class()
    from ..modeling.load import dtype_line, load_base
    from .app import ServeConfig, create_app

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("softprompt.serve").info("%s", dtype_line(dtype, device))
    base, tokenizer, name = load_base(
        model, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    config = ServeConfig(
        adapters=Path(adapters),
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        kv_cache_mb=kv_cache_mb,
        max_body_bytes=max_body_bytes,
        max_inputs=max_inputs,
        stream_buffer=stream_buffer,
        stream_timeout_s=stream_timeout_s,
        api_key=api_key,
        allow_adapter_admin=allow_adapter_admin,
    )
    app = create_app(base, tokenizer, config, model_name=name)
    state = app.state.softprompt
    logging.getLogger("softprompt.serve").info(
        "serving %d adapter(s) on %s (%d refused): %s",
        len(state.entries),
        name,
        len(state.refused),
        ", ".join(sorted(state.entries)) or "(none yet: POST /v1/adapters)",
    )
    server = DrainingServer(
        uvicorn.Config(
            app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_s
        ),
        state,
        drain_s,
    )
    server.run()


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, but the first SIGINT/SIGTERM drains first: /health turns 503 and new
        requests get 503 while the listener stays open, in-flight requests (streams too)
        finish, then uvicorn shuts down. A second SIGINT exits at once."""

        def __init__(self, config, state, drain_s: float):
            super().__init__(config)
            self.state = state
            self.drain_s = drain_s

        def handle_exit(self, sig, frame) -> None:
            loop = self.state.loop
            if self.state.draining or loop is None:
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True
                return
            self.state.draining = True

            async def drain_then_exit() -> None:
                await self.state.drain(self.drain_s)
                self.should_exit = True

            loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit()))

    return DrainingServer

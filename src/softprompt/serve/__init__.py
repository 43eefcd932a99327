"""`softprompt serve`: one frozen model serving many soft prompts over HTTP.

Needs the serve extra (`pip install 'softprompt[serve]'`): FastAPI, uvicorn, prometheus-client.
`batcher.py` and `registry.py` use only torch; `app.py` is the web layer.
"""

from __future__ import annotations

import logging
import signal


def run_server(config) -> None:
    """Load the base model and every adapter under `config.adapters` (a `settings.ServeConfig`)
    that fits it, then serve until SIGINT/SIGTERM: /health turns 503, new requests get 503,
    in-flight requests (at most `config.drain_s` seconds) finish, then the server exits."""
    import uvicorn

    DrainingServer = _draining_server_class()
    from ..modeling.load import dtype_line, load_base
    from .app import create_app

    level = config.log_level
    logging.basicConfig(level=level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("softprompt.serve").info("%s", dtype_line(config.dtype, config.device))
    base, tokenizer, name = load_base(
        config.model,
        dtype=config.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
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
            app,
            host=config.host,
            port=config.port,
            log_level=level,
            timeout_graceful_shutdown=config.drain_s,
        ),
        state,
        config.drain_s,
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

"""`softprompt serve`: one frozen model serving many soft prompts over HTTP.

Needs the serve extra (`pip install 'softprompt[serve]'`): FastAPI, uvicorn, sse-starlette,
prometheus-client, pydantic-settings. `batcher.py`, `registry.py` and `text.py` use only torch;
`app.py` is the web layer.
"""

from __future__ import annotations

import logging
import signal


class _Stopped(Exception):
    """SIGTERM, which uvicorn raises again once it has shut down."""


def _stop(signum, frame) -> None:
    raise _Stopped


def run_server(config) -> None:
    """Load the base model and every adapter under `config.adapters` (a `settings.ServeConfig`)
    that fits it, then serve
    until SIGINT / SIGTERM: uvicorn's graceful shutdown stops taking connections, lets the
    requests in flight (streams too) finish for at most `config.drain_s` seconds, then the
    server stops; a second SIGINT stops it at once."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    from ..modeling.load import dtype_line, load_base
    from .app import create_app

    log = logging.getLogger("softprompt.serve")
    level = config.log_level
    logging.basicConfig(level=level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    log.info("%s", dtype_line(config.dtype, config.device))
    base, tokenizer, name = load_base(
        config.model,
        dtype=config.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
    )
    app = create_app(base, tokenizer, config, model_name=name)
    state = app.state.softprompt
    log.info(
        "serving %d adapter(s) on %s (%d refused): %s",
        len(state.entries),
        name,
        len(state.refused),
        ", ".join(sorted(state.entries)) or "(none yet: POST /v1/adapters)",
    )
    AppStatus.disable_automatic_graceful_drain()  # streams in flight finish during the drain
    signal.signal(signal.SIGTERM, _stop)
    try:
        uvicorn.run(
            app,
            host=config.host,
            port=config.port,
            log_level=level,
            timeout_graceful_shutdown=config.drain_s,
        )
    except (KeyboardInterrupt, _Stopped):
        pass  # the signal that stopped uvicorn, raised again after its graceful shutdown

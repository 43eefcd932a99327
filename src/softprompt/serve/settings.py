"""`softprompt serve`'s settings: one pydantic-settings class. Each field is a flag
(`--max-batch-size`) and an environment variable (`SOFTPROMPT_MAX_BATCH_SIZE`); a flag wins over
the variable, the variable over the default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..config import Dtype
from ..errors import SoftpromptError
from ..flags import problem, settings_fields


class ServeConfig(BaseSettings):
    """Everything `softprompt serve` takes; `create_app` reads the server's part of it."""

    model_config = SettingsConfigDict(
        env_prefix="SOFTPROMPT_", env_ignore_empty=True, use_attribute_docstrings=True
    )

    adapters: Path
    """Folder whose sub-folders are adapters; an adapter's name is its folder's name (--adapters)."""
    model: str | None = None
    """Base model: Hub id or local folder; default: the built-in model (--model)."""
    host: str = "127.0.0.1"
    """Address to listen on (--host)."""
    port: int = Field(8000, ge=0, le=65535)
    """Port to listen on (--port)."""
    dtype: Dtype = "auto"
    """Base model dtype: auto (bfloat16 where the CPU or GPU has bfloat16 hardware, else
    float32; SOFTPROMPT_AUTO_DTYPE=float32|bfloat16 overrides what auto picks), float32, bfloat16 or float16 (--dtype)."""
    device: str | None = None
    """cuda, mps or cpu; default: the first available (--device)."""
    trust_remote_code: bool = False
    """Allow models with custom code from the Hub (--trust-remote-code)."""
    max_batch_size: int = Field(32, ge=1)
    """Most rows (inputs) in one forward pass (--max-batch-size)."""
    max_wait_ms: float = Field(5.0, ge=0)
    """How long the first queued row waits for others to join its batch (--max-wait-ms)."""
    kv_cache_mb: float = Field(256.0, ge=0)
    """Budget for cached prompt keys/values, least recently used out first; at least the
    adapter in use is kept (--kv-cache-mb)."""
    max_body_bytes: int = Field(1_000_000, ge=1)
    """Larger request bodies get 413 (--max-body-bytes)."""
    max_inputs: int = Field(1024, ge=1)
    """Most inputs (or prompts) in one request (--max-inputs)."""
    stream_buffer: int = Field(256, ge=1)
    """Most events a stream holds for a client that does not read them; when it is full the
    stream's rows end (they stop taking decoding steps) (--stream-buffer)."""
    stream_timeout_s: float = Field(30.0, gt=0)
    """A stream whose client takes no data for this long is closed and its rows end
    (--stream-timeout-s)."""
    drain_s: float = Field(60.0, ge=0)
    """On SIGINT / SIGTERM, how long requests in flight may take to finish (--drain-s)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server and uvicorn (--log-level)."""
    api_key: str | None = None
    """If set, every request but /health and the playground page / needs
    `Authorization: Bearer <key>` (--api-key, or SOFTPROMPT_API_KEY)."""
    allow_adapter_admin: bool = False
    """Allow loading and unloading adapters over HTTP (POST /v1/adapters,
    DELETE /v1/adapters/{name}) (--allow-adapter-admin)."""

    def __init__(self, **values):
        """Every problem at once, on one line, naming the flag and the variable."""
        try:
            super().__init__(**values)
        except ValidationError as e:
            fields = settings_fields(type(self))
            problems = []
            for err in e.errors():
                s = fields[err["loc"][0]]
                problems.append(problem(s, err, f"{s.flag} (or SOFTPROMPT_{s.name.upper()})"))
            raise SoftpromptError("invalid settings: " + "; ".join(problems)) from None

    @field_validator("api_key")
    @classmethod
    def _key_is_not_blank(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError("is empty; give a key or leave it unset")
        return key

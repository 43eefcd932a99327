"""Writing files so that a kill never leaves a torn one (`atomic_write_bytes`), and reading the
JSON and safetensors files of an adapter or run with one-line errors naming the file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import Tensor

from .errors import SoftpromptError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object, or a SoftpromptError naming the file if it is damaged."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SoftpromptError(f"{path}: not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise SoftpromptError(
            f"{path}: holds a {type(data).__name__}, not a settings object; the file is corrupt"
        )
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, or a SoftpromptError naming it if it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SoftpromptError(f"{path}: corrupt or truncated safetensors file ({e})") from None

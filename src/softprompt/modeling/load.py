"""Loading a frozen causal LM: the device, the dtype ("auto" probes for bfloat16 hardware), the
checks that a soft prompt can go in front of its input, and small facts about it (hidden size,
decoder layers, parameter counts)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..config import DTYPE_CHOICES
from ..errors import SoftpromptError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""What --dtype takes: "auto" (see `resolve_dtype`) or one of DTYPES."""

AUTO_DTYPE_ENV = "SOFTPROMPT_AUTO_DTYPE"
"""Set to float32, bfloat16 or float16, it is what --dtype auto resolves to on any machine (the
test suite runs its fast tiers again with it set to the type the machine would not pick); an
explicit --dtype wins."""


def _forced_auto() -> str | None:
    """The type SOFTPROMPT_AUTO_DTYPE names, or None where it is unset or empty."""
    value = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if value and value not in DTYPES:
        raise SoftpromptError(
            f"{AUTO_DTYPE_ENV}={value!r} is not one of {', '.join(DTYPES)}; unset it to let "
            "--dtype auto probe the hardware"
        )
    return value or None


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA, then MPS, then CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where
    there is no such file (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def bf16_hardware(device: torch.device) -> str | None:
    """What gives `device` bfloat16 arithmetic in hardware, in words ("the CPU has AMX bf16"),
    or None where bfloat16 would only be emulated (then it runs slower than float32).

    CUDA: `torch.cuda.is_bf16_supported` without emulation (Ampere and later). CPU: AMX bf16 or
    AVX512-BF16 (x86), BF16 (Arm), as torch's own probes say where it has them, else the
    flags in /proc/cpuinfo. MPS and anything else: None.
    """
    if device.type == "cuda":
        on = (
            torch.cuda.device(device.index)
            if device.index is not None
            else contextlib.nullcontext()
        )
        with on:  # is_bf16_supported asks about the current device
            try:
                ok = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch without the argument
                ok = torch.cuda.is_bf16_supported()
            return f"the GPU ({torch.cuda.get_device_name(device)}) has bfloat16" if ok else None
    if device.type != "cpu":
        return None
    probes = torch._C._cpu  # present in some torch releases only
    if getattr(probes, "_is_amx_tile_supported", lambda: False)():
        return "the CPU has AMX bf16"
    if getattr(probes, "_is_avx512_bf16_supported", lambda: False)():
        return "the CPU has AVX512-BF16"
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "the CPU has AMX bf16"
    if "avx512_bf16" in flags:
        return "the CPU has AVX512-BF16"
    if "bf16" in flags:  # Arm (e.g. Neoverse V1, Graviton3)
        return "the CPU has Arm BF16"
    return None


def resolve_dtype(dtype: str, device: torch.device | str | None = None) -> str:
    """The dtype to load the base model in: `dtype` itself, or for "auto" bfloat16 where
    `device` (default: `pick_device()`) has bfloat16 hardware (`bf16_hardware`) and float32
    elsewhere, unless SOFTPROMPT_AUTO_DTYPE names the type. The prompt and its optimiser state
    stay float32 either way."""
    if dtype not in DTYPE_CHOICES:
        raise SoftpromptError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if dtype != "auto":
        return dtype
    if forced := _forced_auto():
        return forced
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return "bfloat16" if bf16_hardware(dev) else "float32"


def dtype_name(dtype: torch.dtype) -> str:
    """The --dtype spelling of a torch dtype: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def dtype_line(dtype: str, device: torch.device | str | None = None) -> str:
    """One line saying which dtype `dtype` gives on `device` and why:
    "dtype: bfloat16 (auto: the CPU has AMX bf16)", "dtype: float32 (--dtype float32)"."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    resolved = resolve_dtype(dtype, dev)
    if dtype != "auto":
        return f"dtype: {resolved} (--dtype {dtype})"
    forced = _forced_auto()
    why = f"{AUTO_DTYPE_ENV}={forced}" if forced else bf16_hardware(dev)
    why = why or f"no bfloat16 hardware found on {dev.type}"
    return f"dtype: {resolved} (auto: {why})"


def load_base(
    name: str | None = None,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a frozen causal LM and its tokenizer.

    `name` is a Hugging Face model id, a local folder, the short name of a built-in model
    (`modeling.builtin`: gemma3-270m), or None/`default` for the built-in SmolLM2-135M-Instruct. Returns (model, tokenizer, resolved_name); every parameter of the
    model has requires_grad=False and the model is in eval mode (no dropout). `dtype` "auto"
    is bfloat16 where the device has bfloat16 hardware, else float32 (`resolve_dtype`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .builtin import builtin_model, builtin_model_dir, is_default_model

    target = pick_device(device)
    dtype = resolve_dtype(dtype, target)
    builtin = builtin_model(name)
    source = str(builtin_model_dir(name)) if builtin is not None else name
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().is_dir():
        raise SoftpromptError(
            f"--model {name}: no such folder; pass a Hugging Face model id or a local model folder"
        )
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SoftpromptError(
            f"could not load model {name!r}: {first_line(e)} (check the id or folder, your network, "
            "or pass --trust-remote-code for models with custom code)"
        ) from e
    if getattr(config, "is_encoder_decoder", False):
        raise SoftpromptError(
            f"--model {name}: {config.model_type} is an encoder-decoder model; softprompt tunes "
            "prompts for decoder-only causal LMs (Llama, Qwen, Mistral, Gemma, BLOOM, GPT-2, ...)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise SoftpromptError(
            f"could not load model {name!r}: {first_line(e)} (check the id or folder, your network, "
            "or pass --trust-remote-code for models with custom code)"
        ) from e
    check_model(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    model.to(target)
    if builtin is not None:
        name = "default" if is_default_model(name) else builtin.name
    return model, tokenizer, name


def check_model(model) -> None:
    """Refuse, before any work, a model softprompt cannot put a prompt in front of: an
    encoder-decoder, or one with no input embeddings or no decoder stack to run them through."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise SoftpromptError(
            f"{name} is an encoder-decoder model: softprompt tunes prompts for decoder-only "
            "causal LMs (Llama, Qwen, Mistral, Gemma, BLOOM, GPT-2, ...); pick one with --model"
        )
    try:
        emb = model.get_input_embeddings()
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        emb = decoder = None
    if not isinstance(emb, torch.nn.Embedding) or decoder is None or decoder is model:
        raise SoftpromptError(
            f"{name} exposes no input embeddings and decoder stack (get_input_embeddings / "
            "get_decoder): softprompt cannot place a soft prompt in front of its input; pick a "
            "causal LM from transformers with --model"
        )


def decoder_layers(model) -> list:
    """The model's decoder layers (Hugging Face's GradientCheckpointingLayer blocks)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def count_parameters(model, prompt_params: int) -> tuple[int, int]:
    """(trainable, all) parameters of prompt + frozen model, as PEFT counts them."""
    total = sum(p.numel() for p in model.parameters()) + prompt_params
    return prompt_params, total


def format_trainable(trainable: int, total: int) -> str:
    """The PEFT guide's `print_trainable_parameters` line."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"

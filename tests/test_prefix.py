"""Deep prompts (prefix tuning, `--method prefix`): PEFT's PREFIX_TUNING format both ways, the
fast loss against PEFT's, every door, and what is refused.

Models: the tiny Llama-like (grouped-query attention: 4 heads, 2 key/value heads) and GPT-2-like
models of conftest, and a tiny Qwen2 (grouped-query as well)."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch

from bounds import door_tolerance
from families import family_model
from softprompt.adapters import load_adapter, save_adapter
from softprompt.cli import main
from softprompt.data import Task
from softprompt.engine import Engine
from softprompt.errors import SoftpromptError
from softprompt.forward.batch import padded
from softprompt.forward.kv import kv_to_prefix, prefix_dims, prefix_to_kv
from softprompt.forward.run import run
from softprompt.peft_format import prefix_config
from softprompt.predictors import ClassifyRow
from softprompt.prompt import init_prefix, init_prompt
from softprompt.readouts.words import label_loss

LABELS = ["complaint", "no complaint"]
TEXTS = ["@ZephyrMobile no signal for three days", "thanks, lovely service today", "ok"]
TASK = Task(text_column="Tweet text", label_names=LABELS, max_length=40)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def arch(request, tokenizer):
    if request.param == "qwen2":
        return family_model("qwen2", len(tokenizer)), tokenizer
    from conftest import make_model

    return make_model(request.param, len(tokenizer)), tokenizer


def _batch(tok):
    enc = tok(["Tweet text : my order is late Label : ", "Tweet text : hi Label : x"], padding=True, return_tensors="pt", padding_side="right")  # fmt: skip
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100
    return ids, mask, labels


def _peft(model, P: int):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    return get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))  # fmt: skip


def test_dims_and_layout_are_pefts(arch):
    model, tok = arch
    pm = _peft(model, 3)
    c = pm.peft_config["default"]
    L, heads, d = prefix_dims(model)
    assert (c.num_layers, c.num_attention_heads, c.token_dim) == (L, heads, heads * d)
    prefix = torch.randn(3, L * 2 * heads * d)
    assert torch.equal(kv_to_prefix(prefix_to_kv(model, prefix))[0], prefix)


def test_fast_loss_and_gradient_equal_peft_packed_and_padded(arch):
    model, tok = arch
    ids, mask, labels = _batch(tok)
    start = init_prefix(model, tok, 4, "vocab", seed=1)
    pm = _peft(model, 4)
    w = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        w.copy_(start)
    peft_loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    peft_loss.backward()
    for packed in (True, False):
        x = start.clone().requires_grad_(True)
        loss = label_loss(model, x, ids, mask, labels, kind="prefix", shared_prefix=packed)
        loss.backward()
        assert abs(float(loss - peft_loss)) < 1e-5, packed
        assert torch.allclose(x.grad, w.grad, atol=1e-6, rtol=1e-4), packed
    assert float(w.grad.abs().sum()) > 0


def test_our_prefix_adapter_loads_in_peft_with_equal_logits(arch, tmp_path):
    from peft import PeftModel

    model, tok = arch
    prefix = init_prefix(model, tok, 5, "vocab", seed=2)
    conf = prefix_config(model, prefix, base_model=None, projection=False)
    save_adapter(tmp_path / "ours", prefix, conf, TASK)
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    ids, mask, _ = _batch(tok)
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=mask).logits
        rows = [r[: int(n)] for r, n in zip(ids.tolist(), mask.sum(-1).tolist(), strict=True)]
        hidden = run(model, padded(rows, 0, ids.device), kv=prefix_to_kv(model, prefix)).final
        ours = model.get_output_embeddings()(hidden)
    real = mask.bool()
    assert torch.allclose(theirs[real], ours[real], atol=1e-5, rtol=1e-5)
    a = load_adapter(tmp_path / "ours")
    assert a.kind == "prefix" and torch.equal(a.prompt, prefix)


def test_peft_trained_prefix_and_p_tuning_adapters_load_and_classify_as_peft_scores(arch, tmp_path):
    from peft import PromptEncoderConfig, TaskType, get_peft_model

    model, tok = arch
    pm = _peft(model, 4)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "prefix")
    pt = get_peft_model(copy.deepcopy(model), PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=16))  # fmt: skip
    pt.save_pretrained(tmp_path / "ptuning")
    engine = Engine(model, tok)
    for name, peft_model in (("prefix", pm), ("ptuning", pt)):
        adapter = load_adapter(tmp_path / name)
        assert adapter.kind == ("prefix" if name == "prefix" else "prompt")
        adapter.task = TASK
        pred = engine.predictor([adapter])
        got = engine.classify(pred, TEXTS).log()
        peft_model.eval()
        want = torch.zeros(len(TEXTS), 2)
        for i, text in enumerate(TEXTS):
            row = engine.encode(pred, text)[0]
            for j, lab in enumerate(pred.label_ids):
                x = torch.tensor([row + lab])
                with torch.no_grad():
                    logits = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
                logits = logits[-len(x[0]) :]  # P-tuning returns the virtual positions too
                logp = torch.log_softmax(logits.float(), -1)
                want[i, j] = sum(logp[len(row) - 1 + k, t] for k, t in enumerate(lab))
        assert torch.allclose(got, torch.log_softmax(want, -1), atol=1e-5), name


def test_a_batch_mixing_prefix_and_prompt_adapters_equals_each_alone(tokenizer):
    from conftest import make_model

    model = make_model("llama", len(tokenizer))
    engine = Engine(model, tokenizer)
    P = 4
    from softprompt.predictors import predictor_for_prompt

    preds = [
        predictor_for_prompt(model, tokenizer, init_prefix(model, tokenizer, P, "vocab", seed=s), TASK, kind="prefix", name=f"prefix{s}")  # fmt: skip
        for s in (1, 2)
    ] + [predictor_for_prompt(model, tokenizer, init_prompt(model, tokenizer, P, "vocab", seed=3), TASK, name="prompt")]  # fmt: skip
    rows = [ClassifyRow(p, engine.encode(p, t)[0]) for t in TEXTS for p in preds]
    mixed = engine.label_probabilities(rows)
    for r, got in zip(rows, mixed, strict=True):
        alone = engine.label_probabilities([r])[0]
        assert torch.allclose(got, alone, atol=1e-6)
    # a prefix started from a prompt's keys/values answers as that prompt does
    prompt = init_prompt(model, tokenizer, P, "vocab", seed=3)
    same = predictor_for_prompt(model, tokenizer, init_prefix(model, tokenizer, P, start=prompt), TASK, kind="prefix")  # fmt: skip
    a = engine.classify(same, TEXTS)
    b = engine.classify(preds[2], TEXTS)
    assert torch.allclose(a, b, atol=1e-5)


def test_a_prefix_for_another_model_is_refused_naming_both_shapes(tokenizer, tmp_path):
    from conftest import make_model

    llama, gpt2 = make_model("llama", len(tokenizer)), make_model("gpt2", len(tokenizer))
    prefix = init_prefix(gpt2, tokenizer, 3, "vocab")
    save_adapter(tmp_path / "p", prefix, prefix_config(gpt2, prefix, base_model="gpt2-tiny", projection=False), TASK)  # fmt: skip
    with pytest.raises(SoftpromptError) as e:
        Engine(llama, tokenizer).predictor([load_adapter(tmp_path / "p")])
    msg = str(e.value)
    assert "2 layers x 4 key/value heads x head size 8" in msg and "2 x 2 x 8" in msg, msg
    assert "\n" not in msg


def _cli(*argv: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(list(argv)) == 0
    return buf.getvalue()


def test_prefix_runs_through_train_eval_predict_cv_and_serve(
    tiny_model_dir, tokenizer, demo_train, demo_test, tmp_path
):
    from fastapi.testclient import TestClient

    from softprompt.modeling.load import load_base
    from softprompt.serve.app import ServeConfig, create_app

    common = ["--model", str(tiny_model_dir), "--data", str(demo_train), "--text-column", "Tweet text", "--label-column", "Label", "--epochs", "1", "--head", "none", "--no-progress"]  # fmt: skip
    runs = tmp_path / "runs"
    _cli("train", *common, "--out", str(runs / "prompt"), "--suffix-tokens", "0")
    _cli("train", *common, "--out", str(runs / "prefix"), "--method", "prefix", "--init-from", str(runs / "prompt"))  # fmt: skip
    saved = json.loads((runs / "prefix" / "train_config.json").read_text())
    assert saved["method"] == "prefix" and saved["suffix_tokens"] == 0
    assert json.loads((runs / "prefix" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"  # fmt: skip
    assert "deep prompt" in (runs / "prefix" / "README.md").read_text()
    ev = json.loads(_cli("eval", str(runs / "prefix"), "--data", str(demo_test), "--model", str(tiny_model_dir), "--no-progress"))  # fmt: skip
    assert ev["n"] == 80 and ev["invalid"] == 0
    out = [json.loads(x) for x in _cli("predict", str(runs / "prefix"), *TEXTS, "--model", str(tiny_model_dir), "--no-progress").splitlines()]  # fmt: skip
    gen = _cli("predict", str(runs / "prefix"), TEXTS[0], "--generate", "--model", str(tiny_model_dir), "--no-progress")  # fmt: skip
    assert "generated" in json.loads(gen)
    model, _, _ = load_base(str(tiny_model_dir), dtype="auto")  # as the CLI doors load it
    app = create_app(model, tokenizer, ServeConfig(adapters=runs, max_wait_ms=5), model_name="tiny")
    with TestClient(app) as client:
        cards = {m["id"]: m["softprompt"] for m in client.get("/v1/models").json()["data"]}
        assert cards["prefix"]["method"] == "prefix" and cards["prompt"]["method"] == "prompt"
        served = client.post("/v1/classify", json={"adapter": "prefix", "inputs": TEXTS}).json()
        r = client.post("/v1/completions", json={"model": "prefix", "prompt": "hi", "max_tokens": 2})  # fmt: skip
        assert r.status_code == 200, r.text
    for s, p in zip(served["results"], out, strict=True):
        assert s["label"] == p["label"]
        tol = door_tolerance(model.get_input_embeddings().weight.dtype)
        assert abs(s["probabilities"]["complaint"] - p["p(complaint)"]) < tol
    _cli("cv", *common, "--out", str(tmp_path / "cv"), "--method", "prefix", "--folds", "2")
    assert (tmp_path / "cv" / "cv.json").is_file()


def test_prefix_settings_that_cannot_work_are_refused(tmp_path, demo_train):
    from softprompt.config import TrainConfig

    bad = TrainConfig(data=str(demo_train), method="prefix", suffix_tokens=8, gradient_checkpointing=True)  # fmt: skip
    problems = " ".join(bad.problems())
    assert "--suffix-tokens 8 does not combine with --method prefix" in problems
    assert "--gradient-checkpointing" in problems
    assert "--init-from is for --method prefix" in " ".join(
        TrainConfig(data="x.csv", init_from="runs/a", method="prompt").problems()
    )
    assert "--method must be one of" in " ".join(
        TrainConfig(data="x.csv", method="lora").problems()
    )


@pytest.mark.parametrize(
    "given, method",
    [
        ({}, "prefix"),  # the pooled head, the default readout
        ({"head": "pooled"}, "prefix"),
        ({"task": "multilabel"}, "prefix"),
        ({"init_from": "runs/a"}, "prefix"),
        ({"head": "none"}, "prompt"),  # label words: the guide's form
        ({"head": "linear"}, "prompt"),  # PEFT's SEQ_CLS form
        ({"suffix_tokens": 4}, "prompt"),  # settings that need an input prompt
        ({"reparam": "mlp"}, "prompt"),
        ({"gradient_checkpointing": True}, "prompt"),
        ({"method": "prompt"}, "prompt"),
    ],
)
def test_the_pooled_head_defaults_to_a_deep_prompt(given, method):
    """docs/accuracy.md: a deep prompt under the pooled head is level or ahead on every task and
    both models; label words and the linear head keep PEFT's prompt, and so do the settings that
    need an input prompt."""
    from softprompt.config import TrainConfig

    cfg = TrainConfig(data="x.csv", **given)
    assert cfg.problems() == [] and cfg.resolved().method == method

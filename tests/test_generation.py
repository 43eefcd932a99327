"""Generation tasks (`--task generation`): free-text targets trained as the guide trains label
tokens, PEFT's own adapters both ways (loss against PEFT's, prompt and prefix), the engine's
beam search against transformers', the field's metrics, every door, and what is refused."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from softprompt.adapters import load_adapter
from softprompt.cli import main
from softprompt.config import TrainConfig
from softprompt.data import (
    Task,
    collate_train,
    encode_targets,
    group_references,
    grouped_split,
    looks_like_free_text,
)
from softprompt.engine import Engine, cut_at_stop
from softprompt.errors import SoftpromptError
from softprompt.metrics import generation_metrics
from softprompt.predictors import predictor_for_prompt
from softprompt.prompt import init_prompt
from softprompt.readouts.words import rows_loss

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"mr": f"name[Place {i}], food[{food}]", "ref": ref.format(i=i, food=food)}
    for i in range(8)
    for food in ("Thai", "French")
    for ref in ("Place {i} serves {food} food.", "{food} food is served at Place {i}.")
]
TASK = Task(text_column="mr", label_names=[], label_column="ref", max_length=64, kind="generation")


def _train(model, tok, tmp_path, method="prompt", **kw):
    from softprompt import train

    cfg = TrainConfig(
        data=None, task="generation", text_column="mr", label_column="ref", method=method,
        out=str(tmp_path / f"gen-{method}"), epochs=1, progress=False, **kw,
    )  # fmt: skip
    return train(cfg, model, tok, data=ROWS)


# --------------------------------------------------------------------------- data


def test_targets_end_with_the_end_token_and_carry_the_loss(tokenizer):
    rows, cuts = encode_targets(tokenizer, TASK, ["name[A]"], ["A place."])
    (r,) = rows
    assert r.label_ids == tokenizer("A place.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # fmt: skip
    assert r.input_ids == tokenizer(TASK.render("name[A]"))["input_ids"]
    assert (cuts.inputs, cuts.targets) == (0, 0)
    b = collate_train(rows, tokenizer.pad_token_id)
    assert (b["labels"][0] != -100).sum() == len(r.label_ids)


def test_long_rows_are_cut_and_counted_never_dropped(tokenizer):
    task = Task(text_column="mr", label_names=[], max_length=24, kind="generation")
    long_text, long_target = "name[Somewhere] " * 20, "A very long description of it. " * 20
    rows, cuts = encode_targets(tokenizer, task, [long_text, "x", "x"], ["short.", long_target, "y"])  # fmt: skip
    assert len(rows) == 3 and all(len(r) <= 24 for r in rows)
    assert cuts.inputs == 1 and cuts.targets == 1 and cuts.longest > 24
    assert rows[1].label_ids[-1] == tokenizer.eos_token_id  # the end token is kept
    assert rows[2].label_ids == tokenizer("y", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # fmt: skip


def test_training_says_how_many_rows_were_cut_and_which_flag_keeps_them(tiny, tmp_path, caplog):
    model, tok = tiny
    rows = [{**r, "ref": r["ref"] + " It has a long story." * (20 if i < 3 else 0)} for i, r in enumerate(ROWS)]  # fmt: skip
    from softprompt import train

    cfg = TrainConfig(
        data=None, task="generation", text_column="mr", label_column="ref", max_length=48,
        out=str(tmp_path / "cut"), epochs=1, progress=False,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="softprompt"):
        result = train(cfg, model, tok, data=rows)
    said = [r.getMessage() for r in caplog.records if "raise --max-length" in r.getMessage()]
    assert len(said) == 1 and "3 target(s) cut" in said[0] and f"of {len(rows)} rows" in said[0]
    assert all(len(r) <= 48 for r in encode_targets(tok, load_adapter(result.out).task, [r["mr"] for r in rows], [r["ref"] for r in rows])[0])  # fmt: skip


def test_references_group_by_input_and_splits_keep_inputs_whole():
    texts = [r["mr"] for r in ROWS]
    inputs, refs = group_references(texts, [r["ref"] for r in ROWS])
    assert len(inputs) == 16 and all(len(x) == 2 for x in refs)
    keep, held = grouped_split(texts, 0.25, seed=3)
    assert sorted(keep + held) == list(range(len(texts)))
    assert not {texts[i] for i in keep} & {texts[i] for i in held}
    assert len({texts[i] for i in held}) == 4


def test_a_label_column_of_free_text_is_named_as_such():
    assert looks_like_free_text([f"sentence {i}" for i in range(40)])
    assert not looks_like_free_text(["complaint", "no complaint"] * 20)


# --------------------------------------------------------------------------- metrics


def test_metrics_are_sacrebleus_and_rouge_scores_with_every_reference():
    import sacrebleu

    preds = ["The Eagle is a pub near the river.", "Zizzi serves cheap food"]
    refs = [["the eagle is a pub by the river.", "The Eagle pub is near the river."], ["Zizzi serves cheap food"]]  # fmt: skip
    m = generation_metrics(preds, refs)
    want = sacrebleu.corpus_bleu(
        [p.lower() for p in preds],
        [[refs[0][0].lower(), refs[1][0].lower()], [refs[0][1].lower(), None]],  # fmt: skip
    )
    assert m["bleu"] == pytest.approx(want.score)
    one = generation_metrics(preds, [r[:1] for r in refs])
    assert m["bleu"] > one["bleu"]  # a second reference can only help
    assert m["exact_match"] == 0.5 and 0 < m["rouge_l"] <= 100 and m["n"] == 2
    assert generation_metrics(["a b c d"], [["A  b c d "]])["exact_match"] == 1.0
    with pytest.raises(ValueError, match="no reference"):
        generation_metrics(["x"], [[]])


def test_cut_at_stop():
    assert cut_at_stop("one. two\nthree", ["\n", "two"]) == "one. "
    assert cut_at_stop("nothing here", ["\n"]) == "nothing here"


# --------------------------------------------------------------------------- parity


def _peft_loss(pm, rows, pad):
    b = collate_train(rows, pad)
    return pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss


@pytest.mark.parity
@pytest.mark.parametrize("method,reparam", [("prompt", "none"), ("prefix", "none"), ("prompt", "mlp")])  # fmt: skip
def test_trained_adapter_is_pefts_and_its_loss_equals_pefts(tiny, tmp_path, method, reparam):
    """The saved generation adapter is PEFT's own CAUSAL_LM adapter (prompt tuning, prefix
    tuning, and P-tuning's reparameterised prompt saved as the prompt): PEFT loads it, and its
    loss on the training rows equals softprompt's within 1e-5 (float32)."""
    from peft import PeftModel

    model, tok = tiny
    result = _train(model, tok, tmp_path, method=method, reparam=reparam)
    conf = json.loads((result.out / "adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM"
    assert conf["peft_type"] == ("PROMPT_TUNING" if method == "prompt" else "PREFIX_TUNING")
    adapter = load_adapter(result.out)
    assert adapter.task.kind == "generation" and adapter.task.label_names == []
    rows, _ = encode_targets(tok, adapter.task, [r["mr"] for r in ROWS], [r["ref"] for r in ROWS])
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(result.out)).eval()
    with torch.no_grad():
        theirs = _peft_loss(pm, rows, tok.pad_token_id)
        ours = rows_loss(model, adapter.prompt, rows, kind=adapter.kind)
    assert abs(float(ours - theirs)) < 1e-5


@pytest.mark.parity
def test_generation_loss_and_gradient_equal_pefts_on_long_targets(tiny, tmp_path):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model, tok = tiny
    pm = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5))  # fmt: skip
    w = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        w.copy_(init_prompt(model, tok, 5, "vocab", seed=4))
    texts = [r["mr"] for r in ROWS[:6]]
    targets = [r["ref"] + " It is in the city centre." * (i % 3) for i, r in enumerate(ROWS[:6])]
    rows, _ = encode_targets(tok, TASK, texts, targets)
    theirs = _peft_loss(pm, rows, tok.pad_token_id)
    theirs.backward()
    x = w.detach().clone().requires_grad_(True)
    ours = rows_loss(model, x, rows)
    ours.backward()
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert torch.allclose(x.grad, w.grad, atol=1e-6, rtol=1e-4)


def _hf_generate(model, tok, prompt, text, **kw):
    ids = torch.tensor([tok(TASK.render(text))["input_ids"]])
    embeds = torch.cat([prompt[None].to(model.dtype), model.get_input_embeddings()(ids)], 1)
    out = model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw,
    )  # fmt: skip
    new = [t for t in out[0].tolist() if t != tok.eos_token_id]
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parity
@pytest.mark.parametrize("beams", [1, 3])
@torch.no_grad()
def test_greedy_and_beam_search_equal_transformers_generate(tiny, beams):
    """The engine's decoding (prompt keys/values cached, rows batched and length-sorted) writes
    what transformers' `generate` writes with the same prompt in front, one input at a time."""
    model, tok = tiny
    prompt = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    texts = [r["mr"] for r in ROWS[::4]] + ["name[A much longer place name here], food[Thai]"]
    engine = Engine(model, tok)
    predictor = predictor_for_prompt(model, tok, prompt, TASK)
    ours = engine.generate(predictor, texts, max_new_tokens=7, num_beams=beams, batch_size=8)
    for text, got in zip(texts, ours, strict=True):
        want = _hf_generate(model, tok, prompt, text, max_new_tokens=7, num_beams=beams, early_stopping=False)  # fmt: skip
        assert got == want, text


def test_decoding_buffers_grow_in_place_and_equal_concatenation(monkeypatch):
    """`decode_cache`'s layers write a step's position into the buffer a view heads, a new
    buffer (with room again) when it is full or the view is not a buffer's head (rows picked
    by `Decoding.keep`, a fresh prefill); the keys/values always equal torch.cat's."""
    from softprompt.forward import kv as kvmod

    monkeypatch.setattr(kvmod, "GROW_ROOM", 2)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(3, 2, 4, 5, generator=g)
    layer = kvmod.decode_cache(((first, first.clone()),)).layers[0]
    want, ptrs = first, []
    for _ in range(5):
        new = torch.randn(3, 2, 1, 5, generator=g)
        keys, _ = layer.update(new, new)
        want = torch.cat([want, new], 2)
        assert torch.equal(keys, want)
        ptrs.append(keys.data_ptr())
        layer = kvmod.decode_cache(((keys, keys),)).layers[0]  # the next step's cache
    # a new buffer at step 0 (a plain tensor) and whenever the room of 2 ran out
    assert ptrs[0] == ptrs[1] == ptrs[2] != ptrs[3] == ptrs[4]
    picked = keys[torch.tensor([2, 0])]  # rows leaving the batch: a copy, never written in place
    new = torch.randn(2, 2, 1, 5, generator=g)
    grown, _ = kvmod.decode_cache(((picked, picked),)).layers[0].update(new, new)
    assert torch.equal(grown, torch.cat([want[[2, 0]], new], 2))
    assert torch.equal(keys, want) and grown.data_ptr() != keys.data_ptr()


@pytest.mark.parity
@torch.no_grad()
def test_greedy_decoding_equals_generate_when_buffers_regrow_every_step(tiny, monkeypatch):
    from softprompt.forward import kv as kvmod

    monkeypatch.setattr(kvmod, "GROW_ROOM", 1)
    model, tok = tiny
    prompt = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    texts = [r["mr"] for r in ROWS[:3]]
    predictor = predictor_for_prompt(model, tok, prompt, TASK)
    ours = Engine(model, tok).generate(predictor, texts, max_new_tokens=9, batch_size=8)
    for text, got in zip(texts, ours, strict=True):
        assert got == _hf_generate(model, tok, prompt, text, max_new_tokens=9, num_beams=1), text


# --------------------------------------------------------------------------- doors


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mr", "ref"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def gen_run(one_thread, tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("gen")
    data = _write(d / "train.csv", ROWS)
    args = ["train", "--task", "generation", "--data", data, "--text-column", "mr",
            "--label-column", "ref", "--model", str(tiny_model_dir), "--out", str(d / "run"),
            "--epochs", "2", "--eval-fraction", "0.25", "--no-progress", "--dtype", "float32"]  # fmt: skip
    assert main(args) == 0
    return d


def test_train_keeps_the_lowest_eval_loss_and_scores_its_outputs(gen_run):
    history = [json.loads(x) for x in (gen_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    assert all("eval_loss" in r and "eval_macro_f1" not in r for r in history)
    task = json.loads((gen_run / "run" / "softprompt.json").read_text())
    assert task["kind"] == "generation" and task["max_new_tokens"] > 0
    kept = task["extra"]["metrics"]
    assert kept["eval_loss"] == min(r["eval_loss"] for r in history)
    assert {"eval_bleu", "eval_rouge_l", "eval_chrf", "eval_exact_match"} <= set(kept)
    config = json.loads((gen_run / "run" / "train_config.json").read_text())
    assert config["head"] == "none" and config["max_length"] == 256 and config["suffix_tokens"] == 0


def test_eval_scores_outputs_against_every_reference_and_writes_them(gen_run, capsys):
    out = gen_run / "outputs.jsonl"
    args = ["eval", str(gen_run / "run"), "--data", str(gen_run / "train.csv"), "--no-progress",
            "--dtype", "float32", "--max-new-tokens", "5", "--outputs", str(out)]  # fmt: skip
    assert main(args) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 16 and m["references"] == len(ROWS)
    assert {"bleu", "chrf", "rouge_l", "exact_match", "settings", "decoding"} <= set(m)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 16 and all(len(r["references"]) == 2 for r in rows)
    # the outputs are what predict writes, and the metrics are those of the outputs
    again = generation_metrics([r["output"] for r in rows], [r["references"] for r in rows])
    assert again["bleu"] == m["bleu"]
    assert main(["predict", str(gen_run / "run"), rows[0]["text"], "--no-progress",
                 "--dtype", "float32", "--max-new-tokens", "5"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed == {"text": rows[0]["text"], "generated": rows[0]["output"]}


def test_beam_search_from_the_command_line(gen_run, capsys):
    args = ["predict", str(gen_run / "run"), "name[Place 1], food[Thai]", "--no-progress",
            "--dtype", "float32", "--num-beams", "3", "--max-new-tokens", "5"]  # fmt: skip
    assert main(args) == 0
    assert "generated" in json.loads(capsys.readouterr().out)
    assert main([*args[:-4], "--num-beams", "0"]) == 2
    assert "--num-beams must be at least 1" in capsys.readouterr().err


def test_a_generation_adapter_refuses_label_scoring(gen_run):
    from softprompt.pipeline import SoftPrompt

    sp = SoftPrompt.load(str(gen_run / "run"), dtype="float32")
    with pytest.raises(SoftpromptError, match="generation adapter"):
        sp.classify(["name[Place 1], food[Thai]"])


# --------------------------------------------------------------------------- refusals


def test_settings_that_do_not_fit_generation_are_refused():
    bad = TrainConfig(data="x.csv", task="generation", head="pooled").problems()
    assert any("--head pooled" in p and "--task generation" in p for p in bad)
    bad = TrainConfig(data="x.csv", select_by="bleu").problems()
    assert any("--select-by bleu" in p for p in bad)
    cfg = TrainConfig(data="x.csv", task="generation").resolved()
    assert (cfg.head, cfg.max_length, cfg.suffix_tokens, cfg.epochs) == ("none", 256, 0, 5)
    assert cfg.method == "prefix"
    cfg = TrainConfig(data="x.csv").resolved()
    assert (cfg.head, cfg.max_length, cfg.method) == ("pooled", 64, "prefix")


@pytest.mark.parametrize(
    "given",
    [
        {"reparam": "mlp"},
        {"suffix_tokens": 4},
        {"gradient_checkpointing": True},
        {"method": "prompt"},
    ],
)
def test_generation_defaults_to_a_deep_prompt_unless_a_setting_needs_an_input_prompt(given):
    cfg = TrainConfig(data="x.csv", task="generation", **given)
    assert cfg.problems() == [] and cfg.resolved().method == "prompt"
    assert (
        TrainConfig(data="x.csv", task="generation", method="prefix").resolved().method == "prefix"
    )


def test_free_text_trained_as_labels_says_to_pass_task_generation(tmp_path, tiny_model_dir, capsys):
    rows = [{"mr": f"input {i}", "ref": f"a sentence of its own, number {i}"} for i in range(300)]
    args = ["train", "--data", _write(tmp_path / "t.csv", rows), "--text-column", "mr",
            "--label-column", "ref", "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
            "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--task generation" in err and "'ref'" in err and err.count("\n") == 1


def test_empty_targets_and_inputs_are_named(tmp_path, tiny_model_dir, capsys):
    rows = [dict(r) for r in ROWS]
    rows[3]["ref"] = ""
    args = ["train", "--task", "generation", "--data", _write(tmp_path / "t.csv", rows),
            "--text-column", "mr", "--label-column", "ref", "--model", str(tiny_model_dir),
            "--out", str(tmp_path / "r"), "--no-progress", "--epochs", "1"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'ref' is empty in 1 row(s) (rows 3)" in err
    rows = [{**r, "mr": ""} for r in ROWS]
    args[4] = _write(tmp_path / "e.csv", rows)
    assert main(args) == 2
    assert "'mr' (--text-column) is empty in every row" in capsys.readouterr().err

"""k-fold cross-validation (`softprompt cv`) and the saved decision bias, on a tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fast import label_probabilities
from softprompt.adapters import load_adapter
from softprompt.calibrate import apply_bias
from softprompt.cli import main
from softprompt.cv import input_folds
from softprompt.data import group_references, stratified_folds
from softprompt.errors import SoftpromptError
from softprompt.metrics import generation_metrics, metrics
from softprompt.pipeline import SoftPrompt

LABELS = ["complaint", "no complaint"]


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (5, 2)])
def test_stratified_folds_partition_the_rows_and_share_each_class(k, seed):
    labels = ["a"] * 17 + ["b"] * 33 + ["c"] * 5
    folds = stratified_folds(labels, k, seed)
    assert sorted(i for f in folds for i in f) == list(range(len(labels)))
    for lab in "abc":
        per_fold = [sum(labels[i] == lab for i in f) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert folds == stratified_folds(labels, k, seed)


@pytest.mark.parametrize("k", [1, 6])
def test_stratified_folds_refuses_k_outside_2_to_the_smallest_class(k):
    with pytest.raises(
        SoftpromptError, match=r"^--folds must be between 2 .*\{'a': 9, 'b': 5\}.*got"
    ):
        stratified_folds(["a"] * 9 + ["b"] * 5, k, 0)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, demo_train) -> Path:
    """12 rows of each class from the demo data."""
    with open(demo_train, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picked = [r for r in rows if r["Label"] == LABELS[0]][:12]
    picked += [r for r in rows if r["Label"] == LABELS[1]][:12]
    path = tmp_path_factory.mktemp("cvdata") / "small.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["Tweet text", "Label"], extrasaction="ignore")
        w.writeheader()
        w.writerows(picked)
    return path


def cv_args(
    data: Path, model_dir: Path, out: Path, *extra: str, text="Tweet text", label="Label"
) -> list[str]:
    return [
        "cv", "--data", str(data), "--text-column", text, "--label-column", label,
        "--model", str(model_dir), "--epochs", "2", "--batch-size", "4", "--no-progress",
        "--lr", "0.3", "--out", str(out), "--folds", "3", *extra,
    ]  # fmt: skip


def test_cv_reports_out_of_fold_metrics_and_trains_a_calibrated_final_run(
    tmp_path, tiny_model_dir, small_data, capsys
):
    torch.set_num_threads(1)
    out = tmp_path / "cv"
    assert main(cv_args(small_data, tiny_model_dir, out)) == 0
    report = json.loads((out / "cv.json").read_text())
    assert report["status"] == "done" and report["folds"] == 3
    assert [r["epoch"] for r in report["epochs"]] == [1, 2]
    best = report["best_epoch"]
    assert (
        best
        == max(report["epochs"], key=lambda r: (r["oof_macro_f1"], -r["oof_log_loss"]))["epoch"]
    )

    # the out-of-fold numbers are those of each fold's prompt on the rows it never saw
    with open(small_data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts, gold = [r["Tweet text"] for r in rows], [r["Label"] for r in rows]
    folds = stratified_folds(gold, 3, 42)
    a0 = load_adapter(out / "folds" / "0")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    oof = torch.zeros(len(texts), 2)
    for i, held in enumerate(folds):
        a = load_adapter(out / "folds" / str(i) / "epochs" / f"{best:03d}")
        oof[held] = label_probabilities(model, tok, a.prompt, a0.task, [texts[j] for j in held], head=a.head, kind=a.kind)  # fmt: skip
    pred = [LABELS[j] for j in oof.argmax(-1).tolist()]
    row = report["epochs"][best - 1]
    assert row["oof_macro_f1"] == pytest.approx(metrics(gold, pred, LABELS)["macro_f1"])
    assert row["oof_accuracy"] == pytest.approx(metrics(gold, pred, LABELS)["accuracy"])

    # the final run: all rows, the chosen epochs, the fitted bias in softprompt.json
    final = out / "final"
    lines = (final / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == best
    task = json.loads((final / "softprompt.json").read_text())
    assert task["extra"]["calibration"]["bias"] == report["bias"]
    sp = SoftPrompt(load_adapter(final), model, tok)
    raw = label_probabilities(model, tok, sp.prompt, sp.task, texts[:5], head=sp.adapter.head, kind=sp.adapter.kind)  # fmt: skip
    got = torch.tensor([[o["probabilities"][n] for n in LABELS] for o in sp.classify(texts[:5])])
    assert torch.allclose(got, apply_bias(raw, report["bias"]), atol=1e-5)
    plain = sp.classify(texts[:5], calibrated=False)
    assert torch.allclose(
        torch.tensor([[o["probabilities"][n] for n in LABELS] for o in plain]), raw, atol=1e-5
    )
    # eval says whether the bias was used
    capsys.readouterr()
    argv = ["eval", str(final), "--data", str(small_data), "--no-progress"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["calibrated"] is True
    assert main([*argv, "--no-calibration"]) == 0
    assert json.loads(capsys.readouterr().out)["calibrated"] is False


def test_cv_refuses_more_folds_than_the_smallest_class(
    tmp_path, tiny_model_dir, small_data, capsys
):
    rc = main(cv_args(small_data, tiny_model_dir, tmp_path / "x", "--folds", "13"))
    err = capsys.readouterr().err
    assert rc == 2 and "--folds" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("softprompt: error: --folds")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_cv_takes_a_preset(tmp_path, tiny_model_dir, small_data):
    torch.set_num_threads(1)
    out = tmp_path / "cv"
    argv = cv_args(small_data, tiny_model_dir, out, "--preset", "small-data", "--no-retrain")
    assert main([*argv, "--suffix-tokens", "2"]) == 0
    conf = json.loads((out / "cv.json").read_text())["config"]
    assert conf["balance"] is True and conf["eval_fraction"] == 0.0
    assert conf["suffix_tokens"] == 2 and conf["epochs"] == 2  # given flags win


# --------------------------------------------------------------------------- --task generation

FOODS = ["Italian", "French", "Chinese", "Indian", "Japanese", "English"]


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory) -> Path:
    """12 inputs with 2 references each, the references of one input not next to each other."""
    rows = []
    for ref in range(2):
        for i in range(12):
            place, food = f"Place {i}", FOODS[i % len(FOODS)]
            target = f"{place} serves {food} food." if ref == 0 else f"{food} food at {place}."
            rows.append({"mr": f"name[{place}], food[{food}]", "ref": target})
    path = tmp_path_factory.mktemp("cvgen") / "gen.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["mr", "ref"])
        w.writeheader()
        w.writerows(rows)
    return path


def gen_args(data: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return cv_args(
        data, model_dir, out, "--task", "generation", "--dtype", "float32", "--num-virtual-tokens",
        "4", "--max-length", "64", *extra, text="mr", label="ref",
    )  # fmt: skip


def read_rows(path: Path, text: str, label: str) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r[text] for r in rows], [r[label] for r in rows]


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 1), (5, 2)])
def test_input_folds_keep_each_inputs_rows_together(k, seed):
    texts = [f"in{i % 11}" for i in range(40)]  # 11 inputs, 3 or 4 rows each, interleaved
    folds = input_folds(texts, k, seed)
    assert len(folds) == k and all(folds)
    assert sorted(i for f in folds for i in f) == list(range(len(texts)))
    owner = {}
    for n, fold in enumerate(folds):
        for i in fold:
            assert owner.setdefault(texts[i], n) == n
    assert folds == input_folds(texts, k, seed)


@pytest.mark.parametrize("k", [1, 12])
def test_input_folds_refuse_k_outside_2_to_the_number_of_inputs(k):
    with pytest.raises(SoftpromptError, match=r"^--folds must be between 2 and .*inputs \(11"):
        input_folds([f"in{i % 11}" for i in range(40)], k, 0)


def test_cv_on_a_generation_task_folds_by_input_and_picks_the_lowest_held_out_loss(
    tmp_path, tiny_model_dir, gen_data
):
    torch.set_num_threads(1)
    out = tmp_path / "cv"
    assert main(gen_args(gen_data, tiny_model_dir, out)) == 0
    report = json.loads((out / "cv.json").read_text())
    assert report["status"] == "done" and report["task"] == "generation"
    assert report["folds"] == 3 and report["inputs"] == 12 and report["select_by"] == "loss"
    assert "bias" not in report

    # the folds: every row held out once, all the references of an input in the same fold
    texts, refs = read_rows(gen_data, "mr", "ref")
    parts = report["fold_rows"]
    assert parts == input_folds(texts, 3, 42)
    assert sorted(i for p in parts for i in p) == list(range(len(texts)))
    for p in parts:
        held = {texts[i] for i in p}
        assert [i for i, t in enumerate(texts) if t in held] == p
    assert [len({texts[i] for i in p}) for p in parts] == [4, 4, 4]

    # per epoch: the mean and spread of the fold runs' own held-out loss; the lowest one chosen
    fold_loss = [
        [
            json.loads(line)["eval_loss"]
            for line in (out / "folds" / str(i) / "metrics.jsonl").read_text().splitlines()
        ]  # fmt: skip
        for i in range(3)
    ]
    assert [r["epoch"] for r in report["epochs"]] == [1, 2]
    for e, row in enumerate(report["epochs"]):
        got = [fold_loss[i][e] for i in range(3)]
        assert row["fold_loss"] == pytest.approx(got)
        assert row["oof_loss_mean"] == pytest.approx(sum(got) / 3)
        assert row["oof_loss_std"] > 0
        assert not any(k.startswith("oof_bleu") for k in row)  # no outputs written with loss
    best = report["best_epoch"]
    assert best == min(report["epochs"], key=lambda r: r["oof_loss_mean"])["epoch"]
    for i in range(3):  # every epoch of every fold kept
        assert (out / "folds" / str(i) / "epochs" / f"{2:03d}").is_dir()

    # the final run: all rows, the chosen epochs, a generation adapter without a bias
    final = out / "final"
    assert len((final / "metrics.jsonl").read_text().splitlines()) == best
    adapter = load_adapter(final)
    assert adapter.task.kind == "generation"
    assert "calibration" not in json.loads((final / "softprompt.json").read_text())["extra"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(SoftPrompt(adapter, model, tok).generate(texts[:2])) == 2


def test_cv_on_a_generation_task_selects_by_the_pooled_out_of_fold_score(
    tmp_path, tiny_model_dir, gen_data, capsys
):
    torch.set_num_threads(1)
    out = tmp_path / "cv"
    # chrF: the tiny model's outputs share characters with the references, rarely a 4-gram
    argv = gen_args(gen_data, tiny_model_dir, out, "--folds", "2", "--select-by", "chrf")
    assert main([*argv, "--no-retrain"]) == 0
    assert "oof_chrf" in capsys.readouterr().out  # the table printed
    report = json.loads((out / "cv.json").read_text())
    assert report["select_by"] == "chrf" and not (out / "final").exists()
    texts, refs = read_rows(gen_data, "mr", "ref")
    inputs, references = group_references(texts, refs)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row in report["epochs"]:
        # the fold prompts of that epoch, each writing out the inputs it never saw, pooled
        written = {}
        for i, held in enumerate(report["fold_rows"]):
            a = load_adapter(out / "folds" / str(i) / "epochs" / f"{row['epoch']:03d}")
            mine = list(dict.fromkeys(texts[j] for j in held))
            written.update(zip(mine, SoftPrompt(a, model, tok).generate(mine), strict=True))
        pooled = generation_metrics([written[t] for t in inputs], references)
        for k in ("bleu", "chrf", "rouge_l", "exact_match"):
            assert row[f"oof_{k}"] == pytest.approx(pooled[k])
        assert row["oof_chrf"] > 0
        assert {"fold_chrf_mean", "fold_chrf_std", "oof_loss_mean"} <= set(row)
    best = max(report["epochs"], key=lambda r: (r["oof_chrf"], -r["oof_loss_mean"]))
    assert report["best_epoch"] == best["epoch"]


def test_cv_on_a_generation_task_refuses_more_folds_than_inputs(
    tmp_path, tiny_model_dir, gen_data, capsys
):
    rc = main(gen_args(gen_data, tiny_model_dir, tmp_path / "x", "--folds", "13"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("softprompt: error: --folds must be between 2 and the number of distinct inputs (12")  # fmt: skip
    assert not (tmp_path / "x").exists()  # refused before anything was written

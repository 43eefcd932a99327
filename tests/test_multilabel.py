"""Multi-label tasks (`--task multilabel`): label sets read from text cells and JSONL lists, the
bad inputs refused in one line, training and its files, the metrics against scikit-learn, the
engine's per-label sigmoid against a plain forward, PEFT's SEQ_CLS form with
problem_type="multi_label_classification", eval/predict/cv doors and `/v1/classify`."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from softprompt.adapters import load_adapter, save_adapter
from softprompt.calibrate import fit_thresholds
from softprompt.cli import main
from softprompt.data import (
    Task,
    encode_label_sets,
    label_set,
    label_sets,
    load_table,
    shuffled_split,
)
from softprompt.engine import Engine
from softprompt.errors import SoftpromptError
from softprompt.metrics import multilabel_metrics
from softprompt.peft_format import peft_config
from softprompt.predictors import predictor_for_prompt
from softprompt.prompt import init_prompt
from softprompt.readouts.head import ClassifierHead, fit_pooled_multilabel_head
from softprompt.training.card import model_card
from softprompt.training.setup import label_pos_weight
from test_head import LAYER, TEXTS, _reference

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["billing", "delivery", "praise"]
ROWS = [
    ("my bill is wrong again, charged twice", ["billing"]),
    ("parcel never arrived and the invoice is wrong", ["billing", "delivery"]),
    ("love the new app, great job", ["praise"]),
    ("delivery was late but the driver was lovely", ["delivery", "praise"]),
    ("refund still not processed", ["billing"]),
    ("package left in the rain", ["delivery"]),
    ("thanks for the quick refund, great service", ["billing", "praise"]),
    ("courier lost my order", ["delivery"]),
    ("amazing support team!", ["praise"]),
    ("overcharged and the box came broken", ["billing", "delivery"]),
    ("fast shipping, very happy", ["delivery", "praise"]),
    ("why is there a late fee on my account", ["billing"]),
]


def write_csv(path: Path, rows, sep: str = ",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "tags"])
        for text, labels in rows:
            w.writerow([text, labels if isinstance(labels, str) else sep.join(labels)])
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"text": t, "tags": labels}) + "\n" for t, labels in rows))
    return path


def ml_task(**kw) -> Task:
    """The tests' multilabel task on the tiny models (the guide's template, three labels)."""
    return Task(
        text_column="Tweet text",
        label_names=NAMES,
        max_length=48,
        kind="multilabel",
        label_separator=",",
        **kw,
    )


def _cli(*argv: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(list(argv)) == 0
    return buf.getvalue()


def _refused(capsys, *argv: str) -> str:
    """The one line a refused command prints (exit code 2)."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def train_args(data: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--task", "multilabel", "--data", str(data), "--label-column", "tags",
        "--model", str(model_dir), "--epochs", "2", "--batch-size", "8", "--no-progress",
        "--out", str(out), *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- reading labels


def test_text_cells_are_split_on_the_separator_and_jsonl_lists_taken_as_they_are(tmp_path):
    rows = [("a", " billing ; delivery "), ("b", "praise"), ("c", "praise;praise;billing")]
    t = load_table(str(write_csv(tmp_path / "x.csv", rows)), "text", "tags", separator=";")
    assert t.labels == [["billing", "delivery"], ["praise"], ["praise", "billing"]]
    assert label_set(t) == NAMES
    # a list is taken as it is: a comma inside a name stays there
    j = write_jsonl(tmp_path / "x.jsonl", [("a", ["billing", "late, again"]), ("b", ["praise"])])
    t = load_table(str(j), "text", "tags", separator=",")
    assert t.labels == [["billing", "late, again"], ["praise"]]
    # text cells in a JSONL file split as in a CSV
    j = write_jsonl(tmp_path / "y.jsonl", [("a", "billing,delivery"), ("b", "praise")])
    assert load_table(str(j), "text", "tags", separator=",").labels == [["billing", "delivery"], ["praise"]]  # fmt: skip
    # without a separator the column reads as single labels, as before
    single = load_table(str(write_csv(tmp_path / "s.csv", [("a", "billing")])), "text", "tags")
    assert single.labels == ["billing"]


def test_bad_label_cells_are_refused_in_one_line_naming_the_file_row_and_fix(tmp_path):
    where = "--data f.csv"
    # the chosen separator appears nowhere, another does: name the flag and the value
    with pytest.raises(SoftpromptError) as e:
        label_sets(["billing;delivery", "praise", "delivery;praise"], ",", where, "tags")
    said = str(e.value)
    assert "f.csv" in said and "row 0" in said and "--label-separator ';'" in said
    # rows that mix separators: name the odd row
    with pytest.raises(SoftpromptError) as e:
        label_sets(["billing,delivery", "praise", "delivery|praise"], ",", where, "tags")
    said = str(e.value)
    assert "row 2" in said and "'|'" in said and "use one separator in every row" in said
    # a row with no label (an empty cell, an empty list, separators only)
    for cells in (["billing", ""], ["billing", []], ["billing", " , "]):
        with pytest.raises(SoftpromptError) as e:
            label_sets(cells, ",", where, "tags")
        said = str(e.value)
        assert "f.csv" in said and "(rows 1)" in said and "at least one label" in said
        assert "\n" not in said


def test_bad_inputs_stop_the_cli_in_one_line(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    train = write_csv(tmp_path / "train.csv", ROWS)
    # a label seen only in the evaluation data
    held = write_jsonl(tmp_path / "held.jsonl", [("x", ["billing"]), ("y", ["praise", "refund"])])
    err = _refused(capsys, *train_args(train, tiny_model_dir, out, "--eval-data", str(held)))
    assert "--eval-data" in err and "held.jsonl" in err and "row 1" in err and "'refund'" in err
    assert "add training rows with it" in err
    # rows using another separator than --label-separator
    semi = write_csv(tmp_path / "semi.csv", ROWS, sep=";")
    err = _refused(capsys, *train_args(semi, tiny_model_dir, out))
    assert "semi.csv" in err and "row 1" in err and "--label-separator ';'" in err
    # an empty label cell
    empty = write_csv(tmp_path / "empty.csv", [*ROWS[:3], ("no tags here", "")])
    err = _refused(capsys, *train_args(empty, tiny_model_dir, out))
    assert "empty.csv" in err and "rows 3" in err
    # label words choose one label: refused, naming the flag
    err = _refused(capsys, *train_args(train, tiny_model_dir, out, "--head", "none"))
    assert "--head none" in err and "--task multilabel" in err
    assert not out.exists()


# --------------------------------------------------------------------------- metrics, fitting


def test_metrics_equal_scikit_learns():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    gold = [["billing"], ["billing", "delivery"], ["praise"], ["delivery", "praise"], ["billing"]]
    pred = [["billing"], ["delivery"], [], ["delivery", "praise", "billing"], ["praise"]]
    m = multilabel_metrics(gold, pred, NAMES)
    y = [[int(n in g) for n in NAMES] for g in gold]
    yhat = [[int(n in p) for n in NAMES] for p in pred]
    assert m["micro_f1"] == pytest.approx(f1_score(y, yhat, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, yhat, average="macro"))
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(y, yhat)) == 0.2
    p, r, f, s = precision_recall_fscore_support(y, yhat, zero_division=0)
    for i, n in enumerate(NAMES):
        assert m["per_label"][n] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
        )
    assert m["n"] == 5
    with pytest.raises(ValueError, match="refund"):
        multilabel_metrics([["refund"]], [[]], NAMES)


def test_cv_folds_hold_out_every_label_with_enough_rows_in_every_fold():
    from softprompt.cv import label_set_folds

    # "rare" on 3 rows of 30: plain shuffled folds would often leave a fold without it
    sets = [["common"]] * 15 + [["common", "mid"]] * 6 + [["mid"]] * 3 + [["rare"]] * 2
    sets += [["common", "rare"], [], [], ["odd"]]
    for seed in range(20):
        folds = label_set_folds(sets, 3, seed)
        assert sorted(i for f in folds for i in f) == list(range(len(sets)))
        for label in ("common", "mid", "rare"):
            for f in folds:
                assert any(label in sets[i] for i in f), (seed, label, f)
    assert label_set_folds(sets, 3, 0) == label_set_folds(sets, 3, 0)
    assert label_set_folds(sets, 3, 0) != label_set_folds(sets, 3, 1)
    with pytest.raises(SoftpromptError, match="--folds must be between 2 and the number of rows"):
        label_set_folds(sets, len(sets) + 1, 0)


def test_thresholds_maximise_each_labels_f1_on_the_grid():
    from sklearn.metrics import f1_score

    from softprompt.calibrate import THRESHOLD_GRID

    g = torch.Generator().manual_seed(0)
    gold = (torch.rand(60, 3, generator=g) < torch.tensor([0.5, 0.2, 0.0])).float()
    probs = (0.35 * gold + 0.65 * torch.rand(60, 3, generator=g)).clamp(0, 1)
    got = fit_thresholds(probs, gold)
    for k in range(2):
        best = max(f1_score(gold[:, k], probs[:, k] >= t, zero_division=0) for t in THRESHOLD_GRID)
        assert f1_score(gold[:, k], probs[:, k] >= got[k]) == pytest.approx(best)
    assert got[2] == 0.5  # no positive row: F1 is 0 everywhere, the threshold stays at 0.5


def test_the_pooled_head_starts_as_one_logistic_regression_per_label():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    targets = [[k for k, on in enumerate((r[0] > 0, r[1] > 0.5, True)) if on] for r in x.tolist()]
    head = fit_pooled_multilabel_head({1: x}, targets, 3, (1,), balance=True)
    z = ((x - x.mean(0)) / x.std(0, unbiased=False)).numpy()
    from softprompt.readouts.head import RowFeatures

    logits = head(RowFeatures(None, {1: x}))
    for k in range(2):
        y = [int(k in t) for t in targets]
        clf = LogisticRegression(C=0.1, max_iter=5000, class_weight="balanced").fit(z, y)
        want = torch.tensor(clf.decision_function(z), dtype=torch.float32)
        assert torch.allclose(logits[:, k], want, atol=1e-3)
    # every row has label 2: no probe, the (clamped) log-odds of its rate
    assert torch.equal(head.weight[2], torch.zeros(6))
    assert head.bias[2].item() == pytest.approx(torch.logit(torch.tensor(0.99)).item())


# --------------------------------------------------------------------------- engine, PEFT


def _ml_heads(H: int, seed: int = 0) -> tuple[ClassifierHead, ClassifierHead]:
    g = torch.Generator().manual_seed(seed)
    pooled = ClassifierHead(
        "pooled",
        torch.randn(3, H, generator=g),
        torch.randn(3, generator=g),
        torch.randn(1, H, generator=g),
        torch.rand(1, H, generator=g) + 0.5,
        (LAYER,),
    )
    return pooled, ClassifierHead("linear", torch.randn(3, H, generator=g))


@pytest.mark.parity
def test_engine_probabilities_are_each_labels_sigmoid_of_a_plain_forward(tiny):
    """The engine's multilabel answer is sigmoid(head(features of a plain forward)), not a
    softmax; an ensemble's is the mean of its members' sigmoids."""
    model, tok = tiny
    task = ml_task()
    H = model.get_input_embeddings().weight.shape[1]
    prompts = [init_prompt(model, tok, 4, "random", seed=s) for s in (1, 2)]
    engine = Engine(model, tok)
    for head in _ml_heads(H):
        each = []
        for prompt in prompts:
            got = engine.classify(predictor_for_prompt(model, tok, prompt, task, head=head), TEXTS)
            want = torch.sigmoid(head(_reference(model, prompt, task, tok)))
            assert torch.allclose(got, want, atol=1e-5), head.kind
            assert not torch.allclose(got.sum(-1), torch.ones(len(TEXTS)), atol=1e-3)
            each.append(got)
        both = predictor_for_prompt(model, tok, torch.stack(prompts), task, head=head)
        assert torch.allclose(engine.classify(both, TEXTS), torch.stack(each).mean(0), atol=1e-6)


def _save_linear(tmp_path, model, tok, head, name="linear", task=None) -> Path:
    prompt = init_prompt(model, tok, 4, "random", seed=3)
    conf = peft_config(model, prompt, base_model=None, init="random", init_text=None, tokenizer_name=None)  # fmt: skip
    return save_adapter(tmp_path / name, prompt, conf, task or ml_task(), head=head)


@pytest.mark.parity
def test_peft_seq_cls_with_multi_label_problem_type_gives_our_logits_and_loss(tiny, tmp_path):
    """PEFT's SEQ_CLS model with problem_type="multi_label_classification" loads our linear
    multilabel adapter: its logits are the head's (their sigmoid our probabilities), and its
    BCE loss, averaged over the rows, equals our training loss (`batch_loss`, no --balance)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from softprompt.training.step import batch_loss

    model, tok = tiny
    model = model.float()
    base = tmp_path / "base"
    model.save_pretrained(base)
    _, linear = _ml_heads(model.get_input_embeddings().weight.shape[1])
    folder = _save_linear(tmp_path, model, tok, linear)
    conf = json.loads((folder / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS"
    seq = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=3, problem_type="multi_label_classification"
    )
    pm = PeftModel.from_pretrained(seq, str(folder)).eval()
    engine = Engine(model, tok)
    adapter = load_adapter(folder)
    ours = engine.classify(engine.predictor([adapter]), TEXTS)
    task = ml_task()
    gold = [["billing"], ["praise"], ["billing", "delivery"], []]
    target = torch.tensor([[float(n in g) for n in NAMES] for g in gold])
    logits, losses = [], []
    for t, y in zip(TEXTS, target, strict=True):  # one text at a time: PEFT reads the last position
        with torch.no_grad():
            out = pm(**tok(task.render(t), return_tensors="pt"), labels=y[None])
        logits.append(out.logits[0])
        losses.append(out.loss)
    logits = torch.stack(logits)
    assert torch.allclose(torch.sigmoid(logits), ours, atol=1e-5)
    # PEFT's loss per row is BCEWithLogitsLoss over its labels; over the batch, their mean
    assert torch.stack(losses).mean().item() == pytest.approx(
        torch.nn.BCEWithLogitsLoss()(logits, target).item(), rel=1e-6
    )
    rows = encode_label_sets(tok, task, TEXTS, gold)
    run = SimpleNamespace(
        task=task, model=model, head_ids=list(tok(task.head())["input_ids"]), kind="prompt",
        packed=True, encoder=None,
    )  # fmt: skip
    with torch.no_grad():
        loss = batch_loss(run, adapter.prompt, rows, head=adapter.head) / len(rows)
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    # with --balance each label's positives weigh pos_weight, as BCEWithLogitsLoss(pos_weight)
    pw = torch.tensor([2.0, 0.5, 3.0])
    with torch.no_grad():
        weighted = batch_loss(run, adapter.prompt, rows, head=adapter.head, pos_weight=pw)
        want = torch.nn.BCEWithLogitsLoss(pos_weight=pw)(logits, target)
    assert (weighted / len(rows)).item() == pytest.approx(want.item(), rel=1e-5)
    # the model card shows PEFT users the problem_type
    card = model_card(task, conf, {"epoch": 1}, None, adapter.head)
    assert 'num_labels=3, problem_type="multi_label_classification"' in card


def test_balance_weighs_each_labels_positives_by_its_negatives(tokenizer):
    rows = encode_label_sets(tokenizer, ml_task(), ["a", "b", "c", "d"], [["billing"], ["billing", "praise"], ["billing"], ["delivery", "billing"]])  # fmt: skip
    # billing: every row (no weighting), delivery: 1 of 4 (3 negatives), praise: 1 of 4
    assert label_pos_weight(rows, 3).tolist() == [1.0, 3.0, 3.0]
    keep, held = shuffled_split(10, 0.2, seed=0)
    assert len(held) == 2 and sorted(keep + held) == list(range(10))
    assert (keep, held) == shuffled_split(10, 0.2, seed=0)
    assert shuffled_split(10, 0.0, seed=0) == (list(range(10)), [])


# --------------------------------------------------------------------------- doors


@pytest.fixture(scope="module")
def ml_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("mldata")
    return write_csv(d / "train.csv", ROWS * 2), write_jsonl(d / "test.jsonl", ROWS)


@pytest.fixture(scope="module")
def ml_run(one_thread, tmp_path_factory, tiny_model_dir, ml_data) -> Path:
    """One multilabel run (pooled head, --eval-data), trained once for the module."""
    out = tmp_path_factory.mktemp("mlrun") / "run"
    train, test = ml_data
    _cli(*train_args(train, tiny_model_dir, out, "--eval-data", str(test)))
    return out


def test_training_writes_a_multilabel_adapter_kept_by_eval_macro_f1(ml_run):
    task = json.loads((ml_run / "softprompt.json").read_text())
    assert task["kind"] == "multilabel" and task["label_names"] == NAMES
    assert task["label_separator"] == ","
    assert task["extra"]["problem_type"] == "multi_label_classification"
    a = load_adapter(ml_run)
    assert a.task.multilabel and a.head.kind == "pooled" and a.head.num_labels == 3
    history = [json.loads(x) for x in (ml_run / "metrics.jsonl").read_text().splitlines()]
    for r in history:
        assert {"eval_loss", "eval_micro_f1", "eval_macro_f1", "eval_subset_accuracy"} <= set(r)
        assert "eval_accuracy" not in r
    best = max(history, key=lambda r: (r["eval_macro_f1"], -r["eval_loss"]))
    assert task["extra"]["metrics"]["epoch"] == best["epoch"]
    conf = json.loads((ml_run / "adapter_config.json").read_text())
    assert conf["task_type"] == "SOFTPROMPT_POOLED_CLS"
    assert "problem_type" not in conf  # PEFT's config has no such field (it would warn)


def test_eval_and_predict_doors_answer_as_the_python_api(ml_run, ml_data, tmp_path):
    from softprompt.pipeline import SoftPrompt

    _, test = ml_data
    m = json.loads(
        _cli("eval", str(ml_run), "--data", str(test), "--no-progress", "--dtype", "float32")
    )
    assert set(m) >= {"micro_f1", "macro_f1", "subset_accuracy", "per_label", "n", "thresholds"}
    assert m["n"] == len(ROWS) and m["head"] == "pooled" and m["calibrated"] is False
    assert set(m["per_label"]) == set(NAMES) and m["thresholds"] == [0.5] * 3
    sp = SoftPrompt.load(str(ml_run), dtype="float32")
    texts = [t for t, _ in ROWS]
    answers = sp.classify(texts)
    for a in answers:
        assert a["labels"] == [n for n in NAMES if a["probabilities"][n] >= 0.5]
        assert "label" not in a
    direct = sp.evaluate(texts, [labels for _, labels in ROWS])
    assert direct["macro_f1"] == pytest.approx(m["macro_f1"], abs=1e-6)
    # predict: the label set and each label's probability; a list in JSONL, joined in CSV
    lines = _cli("predict", str(ml_run), *texts[:3], "--no-progress", "--dtype", "float32")
    rows = [json.loads(x) for x in lines.splitlines()]
    for row, a in zip(rows, answers, strict=False):
        assert row["labels"] == a["labels"]
        for n in NAMES:
            assert row[f"p({n})"] == pytest.approx(a["probabilities"][n], abs=1e-5)
    for suffix in ("csv", "jsonl"):
        path = tmp_path / f"p.{suffix}"
        _cli("predict", str(ml_run), "--data", str(test), "--output", str(path), "--no-progress", "--dtype", "float32")  # fmt: skip
        if suffix == "csv":
            with open(path, newline="") as f:
                got = [r["labels"] for r in csv.DictReader(f)]
            assert got == [",".join(a["labels"]) for a in answers]
        else:
            got = [json.loads(x)["labels"] for x in path.read_text().splitlines()]
            assert got == [a["labels"] for a in answers]


def test_an_ensemble_averages_its_members_label_probabilities(tmp_path, tiny_model_dir, ml_data):
    """`train --seeds 2` on a multilabel task: one folder whose probabilities are the mean of its
    members' per-label sigmoids, its labels those at or above 0.5, at eval and predict too."""
    from softprompt.pipeline import SoftPrompt

    train, test = ml_data
    out = tmp_path / "ens"
    _cli(*train_args(train, tiny_model_dir, out, "--seeds", "2"))
    members = json.loads((out / "ensemble.json").read_text())["members"]
    assert len(members) == 2
    texts = [t for t, _ in ROWS]
    ens = SoftPrompt.load(str(out), dtype="float32").classify(texts)
    each = [SoftPrompt.load(str(out / m), dtype="float32").classify(texts) for m in members]
    assert any(
        abs(a["probabilities"][n] - b["probabilities"][n]) > 1e-4
        for a, b in zip(*each, strict=True)
        for n in NAMES
    ), "the two seeds trained the same prompt: the mean would not be tested"
    for k, a in enumerate(ens):
        for n in NAMES:
            mean = (each[0][k]["probabilities"][n] + each[1][k]["probabilities"][n]) / 2
            assert a["probabilities"][n] == pytest.approx(mean, abs=1e-5)
        assert a["labels"] == [n for n in NAMES if a["probabilities"][n] >= 0.5]
    m = json.loads(_cli("eval", str(out), "--data", str(test), "--no-progress", "--dtype", "float32"))  # fmt: skip
    gold = [set(labels) for _, labels in ROWS]
    assert m["subset_accuracy"] == pytest.approx(
        sum(set(a["labels"]) == g for a, g in zip(ens, gold, strict=True)) / len(ROWS)
    )
    rows = [json.loads(x) for x in _cli("predict", str(out), *texts[:2], "--no-progress", "--dtype", "float32").splitlines()]  # fmt: skip
    assert [r["labels"] for r in rows] == [a["labels"] for a in ens[:2]]


def test_cv_fits_thresholds_that_eval_and_predict_apply(tmp_path, tiny_model_dir, ml_data, capsys):
    from softprompt.cv import set_calibration
    from softprompt.pipeline import SoftPrompt

    train, test = ml_data
    out = tmp_path / "cv"
    _cli("cv", "--task", "multilabel", "--data", str(train), "--label-column", "tags",
         "--model", str(tiny_model_dir), "--epochs", "2", "--folds", "2", "--no-progress",
         "--out", str(out))  # fmt: skip
    report = json.loads((out / "cv.json").read_text())
    assert report["status"] == "done" and report["task"] == "multilabel"
    assert len(report["thresholds"]) == 3 and all(0 < t < 1 for t in report["thresholds"])
    assert report["best_epoch"] == max(report["epochs"], key=lambda r: (r["oof_macro_f1"], -r["oof_log_loss"]))["epoch"]  # fmt: skip
    assert sorted(i for f in report["fold_rows"] for i in f) == list(range(2 * len(ROWS)))
    saved = json.loads((out / "final" / "softprompt.json").read_text())["extra"]["calibration"]
    assert saved["thresholds"] == report["thresholds"]
    # thresholds that make the decision visible: always billing, never delivery, praise at 0.5
    set_calibration(out / "final", [0.0, 1.01, 0.5], "by hand", key="thresholds")
    sp = SoftPrompt.load(str(out / "final"), dtype="float32")
    assert sp.thresholds == [0.0, 1.01, 0.5]
    for a in sp.classify([t for t, _ in ROWS]):
        assert a["labels"] == ["billing"] + (["praise"] if a["probabilities"]["praise"] >= 0.5 else [])  # fmt: skip
    m = json.loads(_cli("eval", str(out / "final"), "--data", str(test), "--no-progress"))
    assert m["calibrated"] is True and m["thresholds"] == [0.0, 1.01, 0.5]
    assert m["per_label"]["delivery"]["recall"] == 0 and m["per_label"]["billing"]["recall"] == 1
    raw = json.loads(_cli("eval", str(out / "final"), "--data", str(test), "--no-progress", "--no-calibration"))  # fmt: skip
    assert raw["calibrated"] is False and raw["thresholds"] == [0.5] * 3
    rows = [json.loads(x) for x in _cli("predict", str(out / "final"), "courier lost my order", "--no-progress").splitlines()]  # fmt: skip
    assert "billing" in rows[0]["labels"] and "delivery" not in rows[0]["labels"]


@pytest.mark.server
def test_v1_classify_answers_each_labels_probability_and_the_chosen_labels(tiny, tmp_path):
    """/v1/classify on a multilabel adapter: each label's own probability (what
    SoftPrompt.classify gives), the labels reaching their thresholds, the thresholds; batched
    with a single-label adapter, whose answer keeps its shape."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from softprompt.cv import set_calibration
    from softprompt.pipeline import SoftPrompt
    from softprompt.serve.app import ServeConfig, create_app

    model, tok = tiny
    model = model.float()
    pooled, linear = _ml_heads(model.get_input_embeddings().weight.shape[1])
    folder = tmp_path / "adapters"
    _save_linear(folder, model, tok, linear, name="tags")
    set_calibration(folder / "tags", [0.3, 0.5, 0.7], "by hand", key="thresholds")
    single = Task(text_column="Tweet text", label_names=["complaint", "no complaint"])
    two = ClassifierHead("linear", linear.weight.detach()[:2])
    _save_linear(folder, model, tok, two, name="single", task=single)
    app = create_app(model, tok, ServeConfig(adapters=folder, max_wait_ms=50), model_name="tiny")
    with TestClient(app) as client:
        about = {m["id"]: m["softprompt"] for m in client.get("/v1/models").json()["data"]}
        assert about["tags"]["task"] == "multilabel" and about["tags"]["thresholds"] == [0.3, 0.5, 0.7]  # fmt: skip
        r = client.post("/v1/classify", json={"adapter": "tags", "inputs": TEXTS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["calibrated"] is True and body["thresholds"] == [0.3, 0.5, 0.7]
        want = SoftPrompt.load(str(folder / "tags"), model, tok).classify(TEXTS)
        for got, w in zip(body["results"], want, strict=True):
            assert "label" not in got and got["labels"] == w["labels"]
            for n, p in w["probabilities"].items():
                assert abs(got["probabilities"][n] - p) < 1e-5
            cuts = dict(zip(NAMES, (0.3, 0.5, 0.7), strict=True))
            assert got["labels"] == [n for n in NAMES if got["probabilities"][n] >= cuts[n]]
        r = client.post("/v1/classify", json={"adapter": "single", "inputs": TEXTS[:1]}).json()
        assert "labels" not in r["results"][0] and "thresholds" not in r
        assert abs(sum(r["results"][0]["probabilities"].values()) - 1) < 1e-5


@pytest.mark.browser
def test_the_playground_marks_the_chosen_labels(tiny, tmp_path):
    """The page shows a multilabel adapter's probabilities as bars and marks the labels that
    reach their thresholds."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from softprompt.pipeline import SoftPrompt
    from softprompt.serve.app import ServeConfig, create_app
    from test_serve import _chrome, _shown, running

    model, tok = tiny
    model = model.float()
    _, linear = _ml_heads(model.get_input_embeddings().weight.shape[1])
    folder = tmp_path / "adapters"
    _save_linear(folder, model, tok, linear, name="tags")
    want = SoftPrompt.load(str(folder / "tags"), model, tok).classify(TEXTS[:1])[0]
    browser = _chrome()
    try:
        app = create_app(model, tok, ServeConfig(adapters=folder), model_name="tiny")
        with running(app) as url:
            browser.set_page_load_timeout(30)
            browser.get(url + "/")
            wait = WebDriverWait(browser, 30)
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")  # fmt: skip
            Select(browser.find_element(By.ID, "adapter")).select_by_value("tags")
            browser.find_element(By.ID, "text").send_keys(TEXTS[0])
            browser.find_element(By.ID, "run").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#probabilities td.prob")) == 3)  # fmt: skip
            shown = _shown(browser)
            for n, p in want["probabilities"].items():
                assert abs(shown[n][0] - p) < 1e-4 and abs(shown[n][1] - p) < 0.02
            marked = [
                r.get_attribute("data-label")
                for r in browser.find_elements(By.CSS_SELECTOR, "#probabilities tr[data-chosen]")
            ]
            assert marked == want["labels"]
            assert browser.find_element(By.ID, "labels").text == (", ".join(want["labels"]) or "(none)")  # fmt: skip
    finally:
        browser.quit()

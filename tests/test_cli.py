"""End to end through `softprompt.cli.main` on the tiny Llama (in-process, no network)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from softprompt.adapters import load_adapter
from softprompt.cli import main, parse_train_args

RUN_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "softprompt.json",
    "README.md",
    "metrics.jsonl",
    "train_config.json",
    "last/adapter_model.safetensors",
    "checkpoint/state.pt",
]
METRIC_KEYS = {"train_loss", "eval_loss", "eval_ppl", "eval_accuracy", "eval_macro_f1"}
LABELS = ["complaint", "no complaint"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_args(data: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    """`softprompt train` on the tiny model with the guide's settings (a hold-out to evaluate
    on every epoch, no suffix tokens), 2 epochs; `extra` flags (another --preset) win."""
    return [
        "train", "--data", str(data), "--text-column", "Tweet text", "--label-column", "Label",
        "--model", str(model_dir), "--preset", "guide", "--epochs", "2", "--batch-size", "8",
        "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(one_thread, tmp_path_factory, tiny_model_dir, demo_train):
    """One run, trained once for the whole module: (exit code, stdout, run folder)."""
    out = tmp_path_factory.mktemp("runs") / "complaints"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(train_args(demo_train, tiny_model_dir, out))
    return rc, buf.getvalue(), out


@pytest.fixture
def run_dir(trained) -> Path:
    rc, _, out = trained
    assert rc == 0
    return out


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A private copy of the run that a test may damage."""
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def prompt_of(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"]


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def cli_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run argv, expect exit 2 with one 'softprompt: error: ...' line and no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    # ignore transformers' weight-loading bar (see test_no_progress_hides_loading_bar) and the
    # line saying which dtype the model loads in (eval/predict say it on stderr before loading)
    lines = [
        ln
        for ln in err.splitlines()
        if ln.strip() and "Loading weights" not in ln and not ln.startswith("dtype: ")
    ]
    assert len(lines) == 1, err
    assert lines[0].startswith("softprompt: error: "), err
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- train


def test_train_writes_a_run_folder(trained):
    rc, stdout, out = trained
    assert rc == 0
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for epoch, line in enumerate(lines, 1):
        rec = json.loads(line)
        assert rec["epoch"] == epoch
        assert METRIC_KEYS <= set(rec)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "PROMPT_TUNING" and conf["task_type"] == "CAUSAL_LM"
    assert conf["num_virtual_tokens"] == 8 and conf["token_dim"] == 32
    assert prompt_of(out).shape == (8, 32)
    assert prompt_of(out / "last").shape == (8, 32)
    task = json.loads((out / "softprompt.json").read_text())
    assert task["label_names"] == LABELS
    assert task["text_column"] == "Tweet text" and task["label_column"] == "Label"
    assert json.loads((out / "train_config.json").read_text())["epochs"] == 2
    assert ModelCard.load(out / "README.md").data.library_name == "peft"
    assert "trainable params: 256 || all params: " in stdout
    assert "|| trainable%:" in stdout
    assert "best prompt (epoch" in stdout


def test_same_seed_is_bit_identical(run_dir, tmp_path, tiny_model_dir, demo_train, capsys):
    assert main(train_args(demo_train, tiny_model_dir, tmp_path / "again")) == 0
    assert torch.equal(prompt_of(tmp_path / "again"), prompt_of(run_dir))
    assert torch.equal(prompt_of(tmp_path / "again" / "last"), prompt_of(run_dir / "last"))


def test_defaults_are_the_recommended_recipe_and_guide_is_one_flag_away(
    tmp_path, tiny_model_dir, demo_train
):
    out = tmp_path / "defaults"
    argv = [
        "train", "--data", str(demo_train), "--text-column", "Tweet text", "--label-column",
        "Label", "--model", str(tiny_model_dir), "--epochs", "2", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    conf = json.loads((out / "train_config.json").read_text())
    assert conf["balance"] is True and conf["eval_fraction"] == 0.0 and conf["init"] == "text"
    assert conf["head"] == "pooled" and conf["suffix_tokens"] == 0 and conf["epochs"] == 2
    assert conf["extra"] == {} and load_adapter(out).head.kind == "pooled"
    assert json.loads((out / "softprompt.json").read_text())["suffix_tokens"] == 0
    # with the pooled head the default is a deep prompt (docs/accuracy.md)
    peft_conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["method"] == "prefix" and peft_conf["peft_type"] == "PREFIX_TUNING"
    assert peft_conf["task_type"] == "SOFTPROMPT_POOLED_CLS"
    # the init text is built from this task's labels, not the guide's complaints instruction
    prompt = tmp_path / "prompt"
    assert main([*argv[:-1], str(prompt), "--method", "prompt"]) == 0
    peft_conf = json.loads((prompt / "adapter_config.json").read_text())
    assert peft_conf["prompt_tuning_init_text"] == "Classify the text as complaint or no complaint:"
    # with label words (--head none) the defaults add 32 suffix tokens and train 15 epochs
    words = tmp_path / "words"
    assert main([*argv[:-1], str(words), "--head", "none"]) == 0
    conf = json.loads((words / "train_config.json").read_text())
    assert conf["suffix_tokens"] == 32 and conf["epochs"] == 2
    assert (words / "softprompt_suffix.safetensors").is_file() and load_adapter(words).head is None
    no_epochs = [a for a in argv if a not in ("--epochs", "2")]
    cfg = parse_train_args("train", [*no_epochs[1:], "--head", "none"])
    from softprompt.config import TrainConfig

    assert TrainConfig(**{"data": None, **cfg.given}).resolved().epochs == 15
    assert TrainConfig(**{"data": None, **parse_train_args("train", no_epochs[1:]).given}).resolved().epochs == 10  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "eval_loss" not in records[0]  # no hold-out: all rows train
    # small-data is the same recipe under its earlier name
    same = tmp_path / "small-data"
    assert main([*argv[:-1], str(same), "--preset", "small-data"]) == 0
    assert torch.equal(prompt_of(same), prompt_of(out))
    # --preset guide: the guide's settings; a given flag still wins, booleans can be negated
    guide = tmp_path / "guide"
    assert main([*argv[:-1], str(guide), "--preset", "guide", "--eval-fraction", "0.25"]) == 0
    conf = json.loads((guide / "train_config.json").read_text())
    assert conf["suffix_tokens"] == 0 and conf["balance"] is False and conf["eval_fraction"] == 0.25
    assert conf["init_text"] == "Classify if the tweet is a complaint or not:"
    assert conf["extra"] == {"preset": "guide"} and conf["epochs"] == 2
    assert not (guide / "softprompt_suffix.safetensors").exists()
    assert "eval_loss" in json.loads((guide / "metrics.jsonl").read_text().splitlines()[0])
    off = tmp_path / "off"
    assert main([*argv[:-1], str(off), "--no-balance", "--suffix-tokens", "0"]) == 0
    conf = json.loads((off / "train_config.json").read_text())
    assert conf["balance"] is False and conf["suffix_tokens"] == 0


def test_seeds_trains_one_servable_ensemble(
    tmp_path, tiny_model_dir, demo_train, demo_test, capsys
):
    from softprompt.pipeline import SoftPrompt

    out = tmp_path / "ens"
    argv = train_args(
        demo_train, tiny_model_dir, out, "--epochs", "1", "--seeds", "2", "--seed", "5"
    )
    assert main(argv) == 0
    manifest = json.loads((out / "ensemble.json").read_text())
    assert manifest["members"] == ["seed-5", "seed-6"]
    assert json.loads((out / "seed-6" / "train_config.json").read_text())["seed"] == 6
    assert not torch.equal(prompt_of(out / "seed-5"), prompt_of(out / "seed-6"))
    sp = SoftPrompt.load(str(out), model=None)
    assert sp.ensemble_size == 2
    texts = ["my parcel never arrived", "thanks a lot"]
    members = [SoftPrompt.load(str(out / m), sp.model, sp.tokenizer) for m in manifest["members"]]
    for i, got in enumerate(sp.classify(texts)):
        for name, p in got["probabilities"].items():
            want = sum(m.classify(texts)[i]["probabilities"][name] for m in members) / 2
            assert p == pytest.approx(want, abs=1e-5)
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(demo_test), "--label-column", "Label", "--no-progress"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["n"] > 0
    # the folder is a run: not replaced without --overwrite, replaced with it
    cli_error(capsys, argv, "already holds a run")
    assert main([*argv, "--overwrite"]) == 0
    cli_error(capsys, [*argv, "--overwrite", "--seeds", "0"], "--seeds must be at least 1")


def test_unknown_preset_and_preset_with_resume(
    run_dir, tmp_path, tiny_model_dir, demo_train, capsys
):
    argv = train_args(demo_train, tiny_model_dir, tmp_path / "x", "--preset", "tiny-data")
    cli_error(capsys, argv, "--preset", "invalid choice: 'tiny-data'", "small-data")
    assert not (tmp_path / "x").exists()
    cli_error(
        capsys,
        ["train", "--resume", str(run_dir), "--preset", "small-data", "--no-progress"],
        "--preset cannot be used with --resume",
    )


def test_existing_run_needs_overwrite(run_copy, tiny_model_dir, demo_train, capsys):
    before = prompt_of(run_copy)
    cli_error(
        capsys,
        train_args(demo_train, tiny_model_dir, run_copy),
        "already holds a run",
        "--overwrite",
    )
    assert torch.equal(prompt_of(run_copy), before)
    assert main(train_args(demo_train, tiny_model_dir, run_copy, "--overwrite", "--seed", "7")) == 0
    assert not torch.equal(prompt_of(run_copy), before)  # replaced by the new (seed 7) run
    # the old run was removed, not appended to
    assert len((run_copy / "metrics.jsonl").read_text().splitlines()) == 2


def test_non_run_folder_is_never_replaced(tmp_path, tiny_model_dir, demo_train, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        cli_error(
            capsys, train_args(demo_train, tiny_model_dir, out, *extra), "not a softprompt run"
        )
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "precious"


def test_other_adapter_folder_is_never_replaced(tmp_path, tiny_model_dir, demo_train, capsys):
    out = tmp_path / "my-lora"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (out / "notes.txt").write_text("precious")
    rc = main(train_args(demo_train, tiny_model_dir, out, "--overwrite"))
    assert rc == 2
    assert (out / "notes.txt").read_text() == "precious"


def test_out_is_a_file(tmp_path, tiny_model_dir, demo_train, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    cli_error(capsys, train_args(demo_train, tiny_model_dir, out), "is a file")


# --------------------------------------------------------------------------- --config


def config_of(*argv: str, command: str = "train"):
    """The TrainConfig that `softprompt train ARGV` would train with (without training)."""
    from softprompt.cli import _train_config, parse_train_args

    return _train_config(parse_train_args(command, [str(a) for a in argv]))


def test_config_file_sits_between_preset_and_flags(tmp_path, demo_train):
    """defaults < --preset < --config file < flags, whatever their order on the command line."""
    conf = tmp_path / "run.yaml"
    conf.write_text(
        f"data: {demo_train}\ntext_column: Tweet text\nlabel_column: Label\n"
        "epochs: 3\nbalance: true\nnum-virtual-tokens: 4\nlr: 1e-2\n"
    )
    for argv in (
        ["--config", conf, "--preset", "guide", "--epochs", "2"],
        ["--epochs", "2", "--preset", "guide", "--config", conf],
    ):
        cfg = config_of(*argv)
        assert cfg.epochs == 2  # the flag over the file
        assert cfg.balance is True and cfg.lr == 1e-2  # the file over the preset and defaults
        assert cfg.eval_fraction == 0.2 and cfg.suffix_tokens == 0  # the preset over the defaults
        assert cfg.num_virtual_tokens == 4 and cfg.text_column == "Tweet text"
        assert cfg.weight_decay == 0.01 and cfg.extra == {"preset": "guide"}  # default; preset
    # a JSON file, and a later file over an earlier one; the preset may come from a file
    later = tmp_path / "later.json"
    later.write_text(json.dumps({"epochs": 5, "preset": "guide", "balance": False}))
    cfg = config_of("--config", conf, "--config", later)
    assert cfg.epochs == 5 and cfg.balance is False and cfg.eval_fraction == 0.2
    assert cfg.lr == 1e-2 and cfg.data == str(demo_train)
    # cv reads the same files; --folds and --retrain may sit in them too
    (tmp_path / "cv.yaml").write_text(f"data: {demo_train}\nfolds: 3\nretrain: false\n")
    from softprompt.cli import parse_train_args

    args = parse_train_args("cv", ["--config", str(tmp_path / "cv.yaml"), "--folds", "4"])
    assert args.folds == 4 and args.retrain is False and args.given == {"data": str(demo_train)}


def test_a_runs_train_config_is_a_config(run_dir, tmp_path):
    """The finished run's train_config.json as --config: the same TrainConfig, the same prompt."""
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["dtype_requested"] == "auto" and saved["extra"] == {"preset": "guide"}
    cfg = config_of("--config", run_dir / "train_config.json")
    assert dataclasses.asdict(cfg) == {k: v for k, v in saved.items() if k != "dtype_requested"}
    out = tmp_path / "again"
    assert main(["train", "--config", str(run_dir / "train_config.json"), "--out", str(out)]) == 0
    again = json.loads((out / "train_config.json").read_text())
    assert again["out"] == str(out) and again["dtype_requested"] == saved["dtype"]
    same = {"out": None, "dtype_requested": None}
    assert {**again, **same} == {**saved, **same}
    assert torch.equal(prompt_of(out), prompt_of(run_dir))


def test_every_boolean_negates_over_preset_and_file(tmp_path):
    from softprompt.config import TrainConfig

    flags = [f.name for f in dataclasses.fields(TrainConfig) if f.type in ("bool", bool)]
    assert {"balance", "overwrite", "progress", "fsdp"} <= set(flags)
    for name in flags:
        flag = name.replace("_", "-")
        assert getattr(config_of("--data", "x", f"--no-{flag}"), name) is False, flag
        assert getattr(config_of("--data", "x", f"--{flag}"), name) is True, flag
    # the guide preset's balance=False, switched back on; small-data's balance=True, off
    assert config_of("--data", "x", "--preset", "guide").balance is False
    assert config_of("--data", "x", "--preset", "guide", "--balance").balance is True
    assert config_of("--preset", "small-data", "--data", "x", "--no-balance").balance is False
    # a file's booleans, switched by flags; the last flag wins
    conf = tmp_path / "run.yaml"
    conf.write_text("data: x\noverwrite: true\nbalance: false\n")
    cfg = config_of("--config", conf, "--no-overwrite", "--balance")
    assert cfg.overwrite is False and cfg.balance is True
    assert config_of("--data", "x", "--no-balance", "--balance").balance is True


def test_given_holds_only_what_was_given(tmp_path):
    """--resume takes only the settings actually given: defaults never count as given."""
    from softprompt.cli import parse_train_args

    args = parse_train_args("train", ["--resume", "runs/x", "--no-progress", "--lr", "0.03"])
    assert args.given == {"resume": "runs/x", "progress": False, "lr": 0.03}
    assert args.preset is None and args.seeds == 1
    conf = tmp_path / "device.yaml"
    conf.write_text("device: cpu\n")
    args = parse_train_args("train", ["--resume", "runs/x", "--config", str(conf)])
    assert args.given == {"resume": "runs/x", "device": "cpu"}


def test_config_and_flag_errors_are_one_line(tmp_path, capsys):
    conf = tmp_path / "run.yaml"
    argv = ["train", "--config", str(conf)]
    conf.write_text("data: x.csv\nepoch: 3\n")
    cli_error(capsys, argv, str(conf), "unknown key 'epoch'", "did you mean 'epochs'")
    cli_error(capsys, ["cv", *argv[1:]], str(conf), "unknown key 'epoch'")
    conf.write_text("data: x.csv\nepochs: three\n")
    cli_error(capsys, argv, str(conf), "epochs: expected an integer or null, got three")
    conf.write_text("balance: maybe\n")
    cli_error(capsys, argv, str(conf), "balance: expected true or false, got 'maybe'")
    conf.write_text("model: [a, b]\n")
    cli_error(capsys, argv, str(conf), "model: expected a string or null")
    conf.write_text("- data\n- x.csv\n")
    cli_error(capsys, argv, str(conf), "key: value")
    conf.write_text("data: [x.csv\n")
    cli_error(capsys, argv, str(conf), "not valid YAML or JSON", "line 2")
    missing = tmp_path / "nope.yaml"
    cli_error(capsys, ["train", "--config", str(missing)], str(missing), "file not found")
    cli_error(capsys, ["train", "--epochs", "x"], "--epochs: expected an integer, got x")
    cli_error(capsys, ["train", "--epoch-count", "3"], "--epoch-count", "--help")
    cli_error(capsys, ["cv", "--seeds", "2"], "--seeds", "softprompt cv --help")


def test_every_subcommand_checks_its_flags_in_one_line(tmp_path, capsys):
    """eval, predict, push and serve take their flags from their settings classes: a wrong type
    or choice, a missing value, an unknown flag is one line naming the flag, before any work."""
    run = str(tmp_path)
    cli_error(capsys, ["eval", run, "--data", "d.csv", "--batch-size", "x"], "--batch-size: expected an integer, got x")  # fmt: skip
    cli_error(capsys, ["eval", run], "--data is required")
    cli_error(capsys, ["predict", run, "hi", "--dtype", "f8"], "--dtype", "invalid choice: 'f8'")
    cli_error(capsys, ["predict", run, "hi", "--max-new-tokens", "1.5", "--batch-size", "0.5"],
              "--max-new-tokens: expected an integer, got 1.5", "--batch-size: expected an integer")  # fmt: skip
    cli_error(capsys, ["predict", run, "hi", "--nope"], "unrecognized arguments: --nope", "softprompt predict --help")  # fmt: skip
    cli_error(capsys, ["push", run], "repo_id")
    cli_error(capsys, ["serve", "--adapters", run, "--port", "http"], "--port (or SOFTPROMPT_PORT): expected an integer, got http")  # fmt: skip
    cli_error(capsys, ["serve", "--adapters", run, "--log-level", "loud"], "--log-level", "invalid choice")  # fmt: skip


def test_predict_texts_are_taken_as_given():
    """Texts with commas, brackets or JSON are one text each, wherever the flags stand."""
    from softprompt.cli import parse_command

    texts = ["no water, and the bill is paid", "[urgent] help", '{"a": 1}', "null"]
    cfg = parse_command("predict", ["runs/x", texts[0], "--no-calibration", *texts[1:], "--ensemble", "runs/y"])  # fmt: skip
    assert cfg.texts == texts and cfg.adapter == "runs/x" and cfg.ensemble == ["runs/y"]
    assert cfg.calibration is False and cfg.progress is True and cfg.batch_size == 32


def test_eval_help_comes_from_its_settings_class(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Labeled data: a file or a Hub dataset id (--data). (type: str, required)" in out
    assert "--calibration, --no-calibration" in out and "{auto,float32,bfloat16,float16}" in out


# --------------------------------------------------------------------------- eval


def test_eval_prints_metrics(run_dir, demo_test, tmp_path, capsys):
    n_rows = len(csv_rows(demo_test))
    out_json = tmp_path / "m.json"
    capsys.readouterr()
    rc = main(
        ["eval", str(run_dir), "--data", str(demo_test), "--no-progress", "--output", str(out_json)]
    )
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(m)
    assert set(m["per_class"]) == set(LABELS)
    assert m["confusion_matrix"]["labels"] == LABELS
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == n_rows == m["n"]
    assert m["invalid"] == 0 and m["method"] == "label_scoring" and m["head"] == "none"
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert json.loads(out_json.read_text()) == m


def test_eval_generate(run_dir, demo_test, tiny_model_dir, capsys):
    n_rows = len(csv_rows(demo_test))
    capsys.readouterr()
    argv = [
        "eval",
        str(run_dir),
        "--data",
        str(demo_test),
        "--model",
        str(tiny_model_dir),
        "--generate",
    ]
    assert main([*argv, "--no-progress", "--max-new-tokens", "3"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["method"] == "generation"
    assert "invalid" in m
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) + m["invalid"] == n_rows


def test_eval_label_not_in_training_labels(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("Tweet text,Label\nfine,complaint\nhmm,maybe\n")
    cli_error(
        capsys,
        ["eval", str(run_dir), "--data", str(bad), "--no-progress"],
        "row 1",
        "'maybe'",
        str(bad),
    )


# --------------------------------------------------------------------------- predict


def test_predict_inline_texts(run_dir, capsys):
    texts = ["my train is late again", "lovely weather today", "ünïcode ☕ text"]
    capsys.readouterr()
    # no --model: the base model recorded in the run is used; options may follow the texts
    assert main(["predict", str(run_dir), *texts, "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(texts)
    for text, line in zip(texts, lines, strict=True):
        row = json.loads(line)
        assert row["text"] == text
        assert row["label"] in LABELS
        probs = [row[f"p({lab})"] for lab in LABELS]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert row["label"] == LABELS[probs.index(max(probs))]


def test_predict_generate(run_dir, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                str(run_dir),
                "--generate",
                "some text",
                "--max-new-tokens",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    (line,) = capsys.readouterr().out.splitlines()
    assert set(json.loads(line)) == {"text", "generated"}


def test_predict_file_to_csv_and_jsonl(run_dir, demo_test, tmp_path, capsys):
    texts = [r["Tweet text"] for r in csv_rows(demo_test)]
    out = tmp_path / "preds.csv"
    base = ["predict", str(run_dir), "--data", str(demo_test), "--no-progress"]
    assert main([*base, "--output", str(out)]) == 0
    rows = csv_rows(out)
    assert [r["text"] for r in rows] == texts
    assert all(r["label"] in LABELS for r in rows)
    assert list(rows[0]) == ["text", "label", "p(complaint)", "p(no complaint)"]
    for r in rows:
        assert float(r["p(complaint)"]) + float(r["p(no complaint)"]) == pytest.approx(1, abs=1e-5)

    before = out.read_bytes()
    cli_error(capsys, [*base, "--output", str(out)], "already exists", "--overwrite")
    assert out.read_bytes() == before
    assert main([*base, "--output", str(out), "--overwrite"]) == 0

    out_jsonl = tmp_path / "preds.jsonl"
    assert main([*base, "--output", str(out_jsonl)]) == 0
    recs = [json.loads(line) for line in out_jsonl.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in recs] == texts
    assert all(r["label"] in LABELS for r in recs)


def test_predict_needs_texts(run_dir, capsys):
    cli_error(capsys, ["predict", str(run_dir)], "give texts")


def test_predict_bad_output_name(run_dir, tmp_path, capsys):
    cli_error(
        capsys,
        ["predict", str(run_dir), "x", "--output", str(tmp_path / "p.txt")],
        ".csv or .jsonl",
    )


def test_no_progress_hides_loading_bar(run_dir, capsys):
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh `softprompt` process
    try:
        capsys.readouterr()
        assert main(["predict", str(run_dir), "hello", "--no-progress"]) == 0
        assert capsys.readouterr().err == ""
    finally:
        if not was_enabled:
            hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- help and push


def test_module_help():
    r = subprocess.run(
        [sys.executable, "-m", "softprompt.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "predict" in r.stdout and "push" in r.stdout


def test_train_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--data",
        "--text-column",
        "--eval-fraction",
        "--max-length",
        "--overwrite",
        "--no-progress",
        "--preset",
        "--config",
        "--no-balance",
        "--no-overwrite",
        "--report-to",
    ):
        assert flag in out
    # help from TrainConfig's docstrings, with the default; the order of the layers
    assert "Length of the soft prompt (--num-virtual-tokens). (type: int, default: 8)" in " ".join(
        out.split()
    )
    assert "the first of: a flag on the command line, a --config file, the --preset" in " ".join(
        out.split()
    )


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    calls: dict[str, list] = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, **kw):
        calls["create_repo"].append({"repo_id": repo_id, **kw})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kw):
        calls["upload_folder"].append(kw)
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push(run_dir, fake_hub, capsys):
    from huggingface_hub.utils import filter_repo_objects

    capsys.readouterr()
    assert main(["push", str(run_dir), "me/my-prompt", "--private"]) == 0
    assert "https://huggingface.co/me/my-prompt" in capsys.readouterr().out
    (create,) = fake_hub["create_repo"]
    assert create["repo_id"] == "me/my-prompt" and create["private"] is True
    (up,) = fake_hub["upload_folder"]
    assert up["repo_id"] == "me/my-prompt"
    assert Path(up["folder_path"]) == run_dir
    ignore = up["ignore_patterns"]
    assert "last/**" in ignore and any(p.startswith("checkpoint") for p in ignore)
    files = [p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()]
    uploaded = set(
        filter_repo_objects(files, allow_patterns=up.get("allow_patterns"), ignore_patterns=ignore)
    )
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "softprompt.json",
        "README.md",
    } <= uploaded
    assert not any(f.startswith("last/") for f in uploaded)


def test_push_refuses_a_broken_adapter(run_copy, fake_hub, capsys):
    (run_copy / "adapter_model.safetensors").unlink()
    cli_error(capsys, ["push", str(run_copy), "me/my-prompt"], "is missing")
    assert fake_hub["upload_folder"] == []


def test_push_failure_is_one_line(run_dir, monkeypatch, capsys):
    import huggingface_hub

    def create_repo(self, repo_id, **kw):
        raise RuntimeError(
            "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\n\nInvalid credentials"
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    cli_error(capsys, ["push", str(run_dir), "me/my-prompt"], "push to me/my-prompt failed", "401")


# --------------------------------------------------------------------------- user errors


def test_missing_data_file(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "nope.csv"
    cli_error(
        capsys, train_args(missing, tiny_model_dir, tmp_path / "out"), str(missing), "not found"
    )
    assert not (tmp_path / "out").exists()


def test_missing_text_column(tmp_path, tiny_model_dir, demo_train, capsys):
    argv = train_args(demo_train, tiny_model_dir, tmp_path / "out")
    argv[argv.index("Tweet text")] = "text"
    cli_error(
        capsys, argv, "no column 'text'", "--text-column", "columns found: 'Tweet text', 'Label'"
    )


def test_empty_data_file(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("Tweet text,Label\n")
    cli_error(capsys, train_args(empty, tiny_model_dir, tmp_path / "out"), str(empty), "no rows")


def test_eval_data_label_not_in_training_labels(tmp_path, tiny_model_dir, demo_train, capsys):
    bad = tmp_path / "dev.csv"
    bad.write_text("Tweet text,Label\nok,complaint\nhmm,maybe\n")
    argv = train_args(demo_train, tiny_model_dir, tmp_path / "out", "--eval-data", str(bad))
    cli_error(capsys, argv, "--eval-data", "'maybe'")


def test_single_label_data(tmp_path, tiny_model_dir, capsys):
    one = tmp_path / "one.csv"
    one.write_text("Tweet text,Label\na,complaint\nb,complaint\n")
    cli_error(capsys, train_args(one, tiny_model_dir, tmp_path / "out"), "at least 2 labels")


def test_invalid_settings_reported_together(tmp_path, tiny_model_dir, demo_train, capsys):
    argv = train_args(demo_train, tiny_model_dir, tmp_path / "out")
    argv[argv.index("--epochs") + 1] = "0"
    line = cli_error(
        capsys, [*argv, "--lr", "-1", "--template", "no placeholder"], "invalid settings"
    )
    assert "--epochs must be at least 1 (got 0)" in line
    assert "--lr must be a positive number (got -1.0)" in line
    assert "--template" in line
    assert not (tmp_path / "out").exists()


def test_max_length_too_short(tmp_path, tiny_model_dir, demo_train, capsys):
    argv = train_args(demo_train, tiny_model_dir, tmp_path / "out", "--max-length", "8")
    cli_error(capsys, argv, "--max-length 8", "raise --max-length")


def test_lora_adapter_is_refused(run_copy, capsys):
    conf = json.loads((run_copy / "adapter_config.json").read_text())
    conf["peft_type"] = "LORA"
    (run_copy / "adapter_config.json").write_text(json.dumps(conf))
    cli_error(
        capsys, ["predict", str(run_copy), "hello", "--no-progress"], "'LORA'", "PROMPT_TUNING"
    )


def test_truncated_weights_are_reported_corrupt(run_copy, capsys):
    weights = run_copy / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    cli_error(capsys, ["predict", str(run_copy), "hello"], str(weights), "corrupt")


def test_nan_prompt_is_refused(run_copy, capsys):
    save_file(
        {"prompt_embeddings": torch.full((8, 32), float("nan"))},
        str(run_copy / "adapter_model.safetensors"),
    )
    cli_error(capsys, ["predict", str(run_copy), "hello"], "NaN")


def test_prompt_width_must_match_model(run_copy, tiny_model_dir, capsys):
    save_file(
        {"prompt_embeddings": torch.randn(8, 64)}, str(run_copy / "adapter_model.safetensors")
    )
    conf = json.loads((run_copy / "adapter_config.json").read_text())
    conf["token_dim"] = 64
    (run_copy / "adapter_config.json").write_text(json.dumps(conf))
    argv = ["predict", str(run_copy), "hello", "--model", str(tiny_model_dir), "--no-progress"]
    cli_error(capsys, argv, "prompt width 64", "hidden size 32")


def test_missing_adapter_folder(tmp_path, capsys):
    cli_error(capsys, ["predict", str(tmp_path / "no-run"), "hello"], "not found")


def test_folder_without_adapter_config(tmp_path, capsys):
    cli_error(capsys, ["predict", str(tmp_path), "hello"], "adapter_config.json")


def test_missing_model_folder(run_dir, tmp_path, capsys):
    cli_error(
        capsys,
        ["predict", str(run_dir), "hi", "--model", str(tmp_path / "no-model")],
        "no such folder",
    )


def test_an_interrupted_ensemble_keeps_its_finished_members(
    tmp_path, tiny_model_dir, demo_train, capsys, monkeypatch
):
    import importlib

    train_module = importlib.import_module(
        "softprompt.training.loop"
    )  # the ensemble calls loop.train
    real_train = train_module.train
    calls = []

    def fail_second(cfg, *a, **kw):
        calls.append(cfg.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(cfg, *a, **kw)

    monkeypatch.setattr(train_module, "train", fail_second)
    out = tmp_path / "ens"
    argv = train_args(demo_train, tiny_model_dir, out, "--epochs", "1", "--seeds", "3")
    assert main(argv) == 130
    assert json.loads((out / "ensemble.json").read_text())["members"] == ["seed-42"]
    capsys.readouterr()
    assert main(["predict", str(out), "my parcel never arrived", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in LABELS
    # the folder is a run: --overwrite replaces it
    monkeypatch.setattr(train_module, "train", real_train)
    assert main([*argv, "--overwrite"]) == 0
    assert len(json.loads((out / "ensemble.json").read_text())["members"]) == 3

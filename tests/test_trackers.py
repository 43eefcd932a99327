"""--report-to: per-epoch records through Accelerate's trackers (TensorBoard offline)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from softprompt.cli import main
from softprompt.config import TrainConfig, tracker_names
from softprompt.errors import SoftpromptError
from softprompt.training.trackers import flat_config, make_tracker
from test_cli import train_args

RECORDS = [
    {"epoch": 1, "train_loss": 2.5, "train_ppl": 12.18, "eval_macro_f1": 0.4, "epoch_seconds": 3},
    {"epoch": 2, "train_loss": 1.25, "train_ppl": 3.49, "eval_macro_f1": 0.75, "epoch_seconds": 2},
]


def test_tensorboard_logs_each_epoch_under_out_logs(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = asdict(TrainConfig(data="train.csv", extra={"preset": "guide"}))
    tracker = make_tracker("tensorboard", tmp_path, config)
    for epoch, record in enumerate(RECORDS, 1):
        tracker.on_epoch(None, SimpleNamespace(epoch=epoch, step=4 * epoch), record)
    tracker.on_train_end(None, SimpleNamespace(epoch=2, step=8))
    tracker.close()  # a second close does nothing

    acc = EventAccumulator(str(tmp_path / "logs"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {
        "train_loss",
        "train_ppl",
        "eval_macro_f1",
        "epoch_seconds",
    }
    for key in ("train_loss", "eval_macro_f1", "epoch_seconds"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in RECORDS])
    # the settings were stored once, as hyperparameters
    assert len(list((tmp_path / "logs").glob("*/hparams.yml"))) == 1


def test_train_reports_metrics_jsonl_to_tensorboard(tmp_path, tiny_model_dir, demo_train, one_thread):  # fmt: skip
    """`softprompt train --report-to tensorboard`: each epoch's metrics.jsonl record, as logged."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = train_args(demo_train, tiny_model_dir, out, "--epochs", "2")
    assert main([*argv, "--report-to", "tensorboard"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    for key in ("train_loss", "eval_loss", "eval_macro_f1", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["epoch"] for r in records]
        assert [e.value for e in events] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_none_and_other_processes_get_no_tracker(tmp_path, monkeypatch):
    assert make_tracker("none", tmp_path, {}) is None
    assert make_tracker(" none ", tmp_path, {}) is None
    monkeypatch.setenv("RANK", "1")  # a data-parallel process other than the main one
    assert make_tracker("tensorboard", tmp_path, {}) is None
    assert not (tmp_path / "logs").exists()


def test_missing_package_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(
        SoftpromptError, match=r"--report-to wandb needs the wandb package: pip install wandb"
    ):
        make_tracker("wandb", tmp_path, {})
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(SoftpromptError, match="pip install mlflow"):
        make_tracker("tensorboard,mlflow", tmp_path, {})
    assert not (tmp_path / "logs").exists()  # nothing started before the check


def test_names_are_checked(tmp_path):
    assert tracker_names("tensorboard, WandB,tensorboard") == ["tensorboard", "wandb"]
    assert tracker_names("none") == []
    with pytest.raises(SoftpromptError, match="unknown tracker 'comet'"):
        make_tracker("tensorboard,comet", tmp_path, {})
    problems = TrainConfig(data="x", report_to="tensorboard,comet").problems()
    assert any("--report-to" in p and "comet" in p for p in problems), problems
    assert TrainConfig(data="x", report_to="tensorboard,wandb").problems() == []
    assert TrainConfig(data="x").report_to == "none"


def test_flat_config():
    assert flat_config({"a": 1, "b": None, "extra": {"preset": "guide"}, "l": [1, 2]}) == {
        "a": 1,
        "b": None,
        "extra.preset": "guide",
        "l": "[1, 2]",
    }

"""Experiment trackers (--report-to): the per-epoch records of metrics.jsonl, sent to
TensorBoard, Weights & Biases or MLflow through Accelerate's tracker classes.

    tracker = make_tracker(cfg.report_to, out, config)   # None for "none"
    tracker.on_epoch(state, record)                       # after each epoch
    tracker.on_train_end(state)                           # once, at the end

No Accelerator object is needed: the tracker classes of `accelerate.tracking` are used as they
are. Like `Accelerator.init_trackers` / `Accelerator.log`, only the main process reports; the
others get None (WandBTracker would otherwise start a W&B run in every process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import TRACKERS, tracker_names
from ..errors import SoftpromptError
from .callbacks import Callback

PROJECT = "softprompt"
"""The W&B project (unless WANDB_PROJECT is set) and MLflow experiment (unless
MLFLOW_EXPERIMENT_NAME is set) that runs report to; the run is named after its --out folder."""

_NEEDS = {  # tracker -> (module it imports, what to install)
    "tensorboard": ("tensorboard", "pip install 'softprompt[track]' (or pip install tensorboard)"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}


class Trackers(Callback):
    """One or more started Accelerate trackers, fed each epoch's record."""

    def __init__(self, trackers: list) -> None:
        self.trackers = trackers
        self._finished = False

    def on_epoch(self, run, state, record: dict) -> None:
        """Log `record`'s numbers (train_loss, eval_macro_f1, ...) at step = record["epoch"]."""
        values = {
            k: v
            for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for t in self.trackers:
            t.log(values, step=int(record["epoch"]))

    def on_train_end(self, run, state) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close every tracker (a second call does nothing)."""
        if self._finished:
            return
        self._finished = True
        for t in self.trackers:
            t.finish()


def make_tracker(report_to: str, out: Path, config: dict) -> Trackers | None:
    """The trackers `report_to` names, started, with `config` (the run's settings) stored once
    as hyperparameters. None for "none", and on every process but the main one.

    tensorboard writes event files to out/logs (`tensorboard --logdir out/logs`); wandb and
    mlflow report to the project / experiment PROJECT (their own settings and environment
    variables decide where), the run named after the `out` folder. A tracker whose package is
    missing raises SoftpromptError naming what to install."""
    names = tracker_names(report_to)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise SoftpromptError(
            f"--report-to {report_to}: unknown tracker {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(TRACKERS)} (comma-separated for several)"
        )
    if not names or int(os.environ.get("RANK", "0")) != 0:
        return None
    for name in names:
        module, install = _NEEDS[name]
        try:
            __import__(module)
        except ImportError:
            raise SoftpromptError(
                f"--report-to {name} needs the {module} package: {install}"
            ) from None

    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    # the trackers log through Accelerate's logger, which needs its state: set up by train()
    # in a data-parallel run, a plain one-process state otherwise (no Accelerator needed)
    PartialState()
    out = Path(out)
    trackers = []
    for name in names:
        if name == "tensorboard":
            t = TensorBoardTracker("", out / "logs")  # run name "": the files go in out/logs
        elif name == "wandb":
            t = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=out.name)
        else:
            t = MLflowTracker(experiment_name=PROJECT, run_name=out.name)
        t.start()
        t.store_init_configuration(flat_config(config))
        trackers.append(t)
    return Trackers(trackers)


def flat_config(config: dict, prefix: str = "") -> dict:
    """Settings as trackers take hyperparameters: nested mappings flattened to dotted keys
    ({"extra": {"preset": "guide"}} -> {"extra.preset": "guide"}), lists as JSON text."""
    flat = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flat_config(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            flat[key] = v
        else:
            flat[key] = json.dumps(v, default=str)
    return flat

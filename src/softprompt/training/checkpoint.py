"""A run on disk: its folder, the training state and its checkpoint, and resuming it.

<out>/train_config.json      the settings (`config_record`)
<out>/checkpoint/state.pt    the last `TrainState` with the optimiser's, scheduler's and RNGs'
<out>/metrics.jsonl          one record per finished epoch
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..adapters import TASK_NAME
from ..config import TrainConfig
from ..ensembles import ENSEMBLE_NAME
from ..errors import SoftpromptError, first_line
from ..files import atomic_write_bytes

RUN_MARKERS = (TASK_NAME, "metrics.jsonl", "train_config.json", "cv.json", ENSEMBLE_NAME)
"""Files only softprompt writes: a folder holding one is a run (a bare PEFT adapter is not)."""

CHECKPOINT_FORMAT = 3
"""Version of checkpoint/state.pt; a run with another version cannot be resumed."""


@dataclass
class TrainState:
    """Everything the loop changes; with the optimiser's, scheduler's and RNGs' states it is
    the checkpoint, and a run resumed from it continues bit for bit."""

    epoch: int = 1
    """The epoch running (or, when `batches` is None, the one before the next)."""
    step: int = 0
    """Optimiser steps taken."""
    batches: list[list[int]] | None = None
    """This epoch's batch order (row indices); None: the next epoch draws its own."""
    done: int = 0
    """Batches of `batches` done."""
    total: float = 0.0
    """This epoch's batch losses so far, each times its row count."""
    count: int = 0
    """Rows in `total`."""
    history: list[dict] = field(default_factory=list)
    """One record per finished epoch (as in metrics.jsonl)."""
    best: dict | None = None
    """The best epoch's record (by eval macro-F1; the last one when there is no eval set)."""
    prompt: torch.Tensor | None = None
    """The prompt as saved: [P, H] (prompt) or [P, layers*2*kv] (prefix), float32."""
    head: Any = None
    """A copy of the classification head as saved (`--head`), or None: label words."""

    def checkpoint(self, encoder, optimizer, scheduler, rng) -> dict:
        """The state.pt dictionary."""
        return {
            "format": CHECKPOINT_FORMAT,
            "prompt": self.prompt.cpu(),
            "encoder": encoder.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "python_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            **dict(epoch=self.epoch, step=self.step, batches=self.batches, done=self.done),
            **dict(total=self.total, count=self.count, history=self.history, best=self.best),
        }

    @classmethod
    def restore(cls, ckpt: dict, encoder, optimizer, scheduler, rng) -> TrainState:
        """Load a state.pt dictionary into the objects; the state to go on from."""
        encoder.load_state_dict(ckpt["encoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        rng.setstate(ckpt["python_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = cls(
            **{f.name: ckpt[f.name] for f in fields(cls) if f.name not in ("prompt", "head")}
        )
        state.prompt = encoder.export()
        state.head = encoder.export_head()
        if state.batches is None:  # the checkpoint closed its epoch
            state.epoch += 1
        return state


def prepare_run_folder(out: str, overwrite: bool) -> Path:
    """Refuse to clobber an existing run unless --overwrite; never delete a folder that is not a run."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise SoftpromptError(f"--out {out} is a file; choose a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        is_run = any((folder / m).exists() for m in RUN_MARKERS)
        if not is_run:
            raise SoftpromptError(
                f"--out {out} is a non-empty folder that is not a softprompt run; choose another --out "
                "(softprompt will not delete files it did not write)"
            )
        if not overwrite:
            raise SoftpromptError(
                f"--out {out} already holds a run; pass --overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def config_record(cfg: TrainConfig, dtype_requested: str) -> dict:
    """train_config.json: the settings, `dtype` the type the model ran in, followed by
    `dtype_requested`, the --dtype asked for (e.g. "auto")."""
    record = {}
    for k, v in asdict(cfg).items():
        record[k] = v
        if k == "dtype":
            record["dtype_requested"] = dtype_requested
    return record


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write the training state (prompt, optimiser, scheduler, RNG states, epoch, step, this
    epoch's batch order and how much of it is done, history, best) atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(folder / "state.pt", buf.getvalue())


def resume_config(folder: str, **given) -> TrainConfig:
    """The saved settings of the run in `folder`, with `given` (flags passed again) on top.

    `train` refuses a given value that contradicts the saved one (see RESUME_MAY_CHANGE).
    """
    if given.get("overwrite"):
        raise SoftpromptError(
            f"--overwrite cannot be used with --resume {folder}: resume never deletes a run "
            "(to start over, drop --resume)"
        )
    if given.get("out") is not None and Path(given["out"]).resolve() != Path(folder).resolve():
        raise SoftpromptError(
            f"--out {given['out']} is not the resumed run {folder}; drop --out (resume writes in place)"
        )
    saved = _saved_config(Path(folder))
    known = {f.name for f in fields(TrainConfig)}
    merged = {k: v for k, v in saved.items() if k in known}
    merged.update({k: v for k, v in given.items() if k in known and k != "out"})
    merged.update(resume=str(folder), out=str(folder), overwrite=False)
    return TrainConfig(**merged)


RESUME_MAY_CHANGE = {
    "resume", "out", "overwrite", "progress", "extra", "device", "eval_batch_size", "save_steps",
    "fsdp", "report_to",
}  # fmt: skip
"""Settings a resumed run may change: they do not change the prompt it trains."""


def _saved_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise SoftpromptError(f"--resume {folder}: folder not found")
    path = folder / "train_config.json"
    if not path.is_file():
        raise SoftpromptError(
            f"--resume {folder}: no train_config.json, so this is not a softprompt run; "
            "give the --out folder of a run"
        )
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SoftpromptError(f"{path}: not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(saved, dict):
        raise SoftpromptError(f"{path}: not a settings object; the file is corrupt")
    return saved


def check_resume(cfg: TrainConfig) -> None:
    """Refuse settings that contradict the resumed run's, naming each flag."""
    saved = _saved_config(Path(cfg.resume))
    now = asdict(cfg)
    clash = [
        f"--{k.replace('_', '-')} {now[k]} (the run has {saved[k]})"
        for k in now
        if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]
    ]
    if clash:
        raise SoftpromptError(
            f"--resume {cfg.resume}: these flags contradict the run's train_config.json: "
            + "; ".join(clash)
            + ". Drop them to resume with the run's settings, or start a new run with another --out"
        )


def open_checkpoint(out: Path) -> dict:
    """Read a run's checkpoint to resume it; trim metrics.jsonl to the checkpoint's records and
    remove temp files a kill may have left."""
    path = out / "checkpoint" / "state.pt"
    if not path.is_file():
        raise SoftpromptError(
            f"--resume {out}: no checkpoint ({path}); the run stopped before its first one. "
            f"Start it again with --out {out} --overwrite (--save-steps N checkpoints within epochs)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise SoftpromptError(
            f"{path}: corrupt or truncated checkpoint ({first_line(e)}); "
            f"start the run again with --out {out} --overwrite"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SoftpromptError(
            f"{path}: written by another softprompt version; it cannot be resumed. "
            f"Start the run again with --out {out} --overwrite"
        )
    lines = "".join(json.dumps(r) + "\n" for r in state["history"])
    atomic_write_bytes(out / "metrics.jsonl", lines.encode())
    for folder in (out, out / "last", out / "checkpoint"):
        for tmp in folder.glob(".*.*"):  # atomic_write_bytes' temp files: .<name>.<random>
            if tmp.is_file() and tmp.name[1:].startswith(RUN_FILE_NAMES):
                tmp.unlink()
    return state


RUN_FILE_NAMES = (
    "adapter_model.safetensors", "adapter_config.json", TASK_NAME, "README.md", "state.pt",
    "metrics.jsonl",
)  # fmt: skip

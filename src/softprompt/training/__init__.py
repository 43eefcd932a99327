"""Training: the recipe (`loop`: `setup`, `step`, `evaluation`), its state and checkpoints
(`checkpoint`), data-parallel processes (`distributed`), hooks (`callbacks`, `trackers`),
ensembles (`ensemble`) and what a run leaves for people (`card`)."""

from .checkpoint import TrainState, prepare_run_folder, resume_config
from .distributed import end_processes
from .ensemble import train_ensemble
from .loop import Callback, Run, TrainResult, train

__all__ = [
    "Callback",
    "Run",
    "TrainResult",
    "TrainState",
    "end_processes",
    "prepare_run_folder",
    "resume_config",
    "train",
    "train_ensemble",
]

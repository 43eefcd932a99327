"""Hooks into training (`train(..., callbacks=[...])`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoint import TrainState
    from .loop import Run


class Callback:
    """Hooks into `train`: subclass and override the ones you need. `run` is what `train` set up
    (settings, task, model, rows, optimiser), `state` the `TrainState` (state.prompt is the
    prompt as saved). Every process calls them; `run.procs.main` tells the main one."""

    def on_step(self, run: Run, state: TrainState) -> None:
        """After each optimiser step (and its checkpoint, with --save-steps)."""

    def on_epoch(self, run: Run, state: TrainState, record: dict) -> None:
        """After each epoch, once its files and checkpoint are written; `record` is its line
        of metrics.jsonl."""

    def on_train_end(self, run: Run, state: TrainState) -> None:
        """After the last epoch."""

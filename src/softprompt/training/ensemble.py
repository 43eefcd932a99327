"""Several prompts, one per seed, saved as one ensemble folder."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..config import TrainConfig
from ..ensembles import write_ensemble
from ..errors import SoftpromptError
from ..log import ensure_visible, logger
from . import loop
from .checkpoint import prepare_run_folder
from .loop import TrainResult


def train_ensemble(cfg: TrainConfig, seeds: int, model=None, tokenizer=None) -> list[TrainResult]:
    """Train `seeds` prompts with seeds cfg.seed, cfg.seed + 1, ... into cfg.out/seed-<s>/ (each
    a complete run) and write cfg.out/ensemble.json naming them: one folder that eval, predict,
    `SoftPrompt.load` and the server use as one predictor (the mean of the members'
    probabilities). The manifest is written first (no members: the folder is marked as a run)
    and again after each member, so an interrupted run leaves an ensemble of the finished ones."""
    if seeds < 1:
        raise SoftpromptError(f"--seeds must be at least 1 (got {seeds})")
    if cfg.resume:
        raise SoftpromptError(
            "--seeds cannot be used with --resume; resume one member's run (RUN/seed-<s>), then "
            "train the rest"
        )
    cfg.validate()
    ensure_visible()
    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes the folder
    out = prepare_run_folder(cfg.out, cfg.overwrite) if main else Path(cfg.out)
    results, names = [], []
    if main:
        write_ensemble(out, names)
    for k in range(seeds):
        seed = cfg.seed + k
        name = f"seed-{seed}"
        logger.info(f"--- ensemble member {k + 1}/{seeds}: seed {seed} -> {out / name} ---")
        member = replace(cfg, seed=seed, out=str(out / name), overwrite=False)
        results.append(loop.train(member, model, tokenizer))
        names.append(name)
        if main:
            write_ensemble(out, names)
    return results

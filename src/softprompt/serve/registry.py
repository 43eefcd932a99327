"""The adapters a server holds: each sub-folder of the adapters folder that is an adapter or an
ensemble (ensemble.json) becomes a named `engine.Predictor`.

No web framework here: plain data, usable (and tested) without the serve extra.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..adapters import CONFIG_NAME
from ..engine import Engine
from ..ensembles import ENSEMBLE_NAME, load_members
from ..errors import SoftpromptError
from ..predictors import Predictor

log = logging.getLogger("softprompt.serve")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Adapter names: a folder name safe in URLs and metric labels."""


def load_predictor(path: Path, name: str, engine: Engine) -> Predictor:
    """The adapter or ensemble in `path`, served as `name` (SoftpromptError if it cannot be:
    a bad name, another model's adapter, ensemble members that disagree, a bad bias)."""
    if not NAME_RE.match(name):
        raise SoftpromptError(
            f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(at most 128, starting with a letter or digit)"
        )
    adapters, bias = load_members(path)
    return engine.predictor(adapters, name=name, bias=bias)


def is_servable(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() or (folder / ENSEMBLE_NAME).is_file()


def scan_folder(folder: Path, engine: Engine) -> tuple[dict[str, Predictor], dict[str, str]]:
    """Load every adapter or ensemble sub-folder of `folder` that fits the model.

    Returns (loaded by name, refused: name -> reason). Sub-folders that are neither are skipped
    silently.
    """
    loaded: dict[str, Predictor] = {}
    refused: dict[str, str] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not is_servable(sub):
            continue
        try:
            loaded[sub.name] = load_predictor(sub, sub.name, engine)
        except SoftpromptError as e:
            refused[sub.name] = str(e)
            log.warning("refused adapter %s: %s", sub.name, e)
        else:
            log.info("loaded adapter %s (%s)", sub.name, sub)
    return loaded, refused

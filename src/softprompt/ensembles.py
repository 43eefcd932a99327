"""Ensemble folders: `ensemble.json` ({"members": [sub-folders], "calibration"?: {"bias"}}) and
its member adapters, loaded and served under one name (`load_members`)."""

from __future__ import annotations

from pathlib import Path

from .adapters import CONFIG_NAME, Adapter, load_adapter
from .errors import SoftpromptError
from .files import atomic_write_json, read_json_object

ENSEMBLE_NAME = "ensemble.json"


def is_ensemble(path: str | Path) -> bool:
    return (Path(path).expanduser() / ENSEMBLE_NAME).is_file()


def write_ensemble(folder: str | Path, members: list[str], bias: list[float] | None = None) -> Path:
    """Write `folder`/ensemble.json naming its members (paths relative to `folder`)."""
    folder = Path(folder)
    manifest: dict = {"format": "softprompt-ensemble", "members": list(members)}
    if bias is not None:
        manifest["calibration"] = {"bias": list(bias)}
    atomic_write_json(folder / ENSEMBLE_NAME, manifest)
    return folder


def load_members(path: str | Path) -> tuple[list[Adapter], list[float] | None | str]:
    """The adapters a folder stands for, and the calibration bias to apply.

    A plain adapter folder: ([it], "saved", meaning its own saved bias, if any). An ensemble
    folder (ensemble.json): its members, in order, and the manifest's bias if it has one, else
    "saved" (the first member's)."""
    folder = Path(path).expanduser()
    manifest_path = folder / ENSEMBLE_NAME
    if not manifest_path.is_file():
        return [load_adapter(path)], "saved"
    manifest = read_json_object(manifest_path)
    members = manifest.get("members")
    if members == []:
        raise SoftpromptError(
            f"{manifest_path}: no finished member yet (the ensemble is training, or its first "
            "member was interrupted: train it again with --overwrite)"
        )
    if not members or not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise SoftpromptError(
            f'{manifest_path}: needs "members": a list of adapter folders (relative to it)'
        )
    root = folder.resolve()
    adapters = []
    for m in members:
        target = (root / m).resolve()
        if root != target and root not in target.parents:
            raise SoftpromptError(
                f"{manifest_path}: member {m!r} is outside the ensemble folder; keep members inside it"
            )
        if not (target / CONFIG_NAME).is_file():
            raise SoftpromptError(f"{manifest_path}: member {m!r} has no {CONFIG_NAME} at {target}")
        adapters.append(load_adapter(target))
    cal = manifest.get("calibration") or {}
    return adapters, cal.get("bias", "saved") if isinstance(cal, dict) else "saved"

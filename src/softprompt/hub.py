"""Uploading a run folder's adapter to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from .adapters import SUFFIX_PEFT_TYPE, load_adapter
from .ensembles import ENSEMBLE_NAME, is_ensemble
from .errors import SoftpromptError, first_line


def push_to_hub(
    folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload a run folder's adapter (not its checkpoints) to the Hub. Returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if is_ensemble(folder):
        raise SoftpromptError(
            f"{folder} is an ensemble ({ENSEMBLE_NAME}); push each member folder on its own"
        )
    adapter = load_adapter(folder)  # refuse to push something that does not load
    if adapter.task is not None and adapter.task.suffix_tokens:
        import logging

        logging.getLogger("softprompt").warning(
            "%s has %d suffix tokens: it loads in softprompt only (PEFT refuses its peft_type %s); "
            "its model card says so",
            folder,
            adapter.task.suffix_tokens,
            SUFFIX_PEFT_TYPE,
        )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            ignore_patterns=["checkpoint/**", "last/**", "epochs/**", "logs/**", ".*"],
            commit_message="Upload soft prompt (softprompt)",
        )
    except Exception as e:  # noqa: BLE001 - network, auth, permissions
        raise SoftpromptError(
            f"push to {repo_id} failed: {first_line(e)} (log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    return str(url)

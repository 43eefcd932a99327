"""The adapters a server holds, and the bounded cache of their prompts' keys/values.

No web framework here: plain data, usable (and tested) without the serve extra.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..adapters import CONFIG_NAME, Adapter, check_fits, load_adapter
from ..data import Task, input_budget, label_token_ids
from ..errors import SoftpromptError
from ..model import KV, prefix_kv

log = logging.getLogger("softprompt.serve")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""Adapter names: a folder name safe in URLs and metric labels."""

_ids = itertools.count()


@dataclass(eq=False)
class Entry:
    """One loaded adapter, with everything a request needs precomputed."""

    name: str
    adapter: Adapter
    task: Task
    prompt: Tensor
    """[P, H] float32 on the model's device."""
    label_ids: list[list[int]]
    """Each label's tokens plus the end token (what label scoring scores)."""
    budget: int
    """Input tokens allowed for classification (the training max_length minus the longest label)."""
    head: list[int] = field(default_factory=list)
    """The template's tokens before the text (e.g. `Tweet text :`): cached with the prompt's KV,
    so a classify row starts after them (completions have no template: empty for them)."""
    uid: int = field(default_factory=lambda: next(_ids))
    """Unique per load: an adapter unloaded and loaded again is a new entry (and new KV)."""
    unloaded: bool = False
    """Set on unload: requests already queued still finish, but its KV is no longer cached."""

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def prompt_bytes(self) -> int:
        return self.prompt.numel() * self.prompt.element_size()

    def describe(self) -> dict:
        return {
            "labels": list(self.task.label_names),
            "num_virtual_tokens": self.num_virtual_tokens,
            "template": self.task.template,
            "max_length": self.task.max_length,
            "base_model": self.adapter.base_model,
        }


def make_entry(name: str, adapter: Adapter, model, tokenizer) -> Entry:
    """Check the adapter fits the model (SoftpromptError if not) and precompute its labels."""
    check_fits(adapter, model)
    task = adapter.task or Task(text_column="text", label_names=[])
    if task.suffix_tokens:
        raise SoftpromptError(
            f"{adapter.path}: trained with --suffix-tokens {task.suffix_tokens} (soft tokens after "
            "the text), which `softprompt serve` does not run; use `softprompt predict` / `eval` "
            "or the Python API for it, or serve an adapter trained without --suffix-tokens"
        )
    device = model.get_input_embeddings().weight.device
    return Entry(
        name=name,
        adapter=adapter,
        task=task,
        prompt=adapter.prompt.to(device),
        label_ids=[label_token_ids(tokenizer, n) for n in task.label_names],
        budget=input_budget(tokenizer, task),
        head=list(tokenizer(task.head())["input_ids"]) if task.label_names else [],
    )


def load_entry(path: Path, name: str, model, tokenizer) -> Entry:
    if not NAME_RE.match(name):
        raise SoftpromptError(
            f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return make_entry(name, load_adapter(path), model, tokenizer)


def scan_folder(folder: Path, model, tokenizer) -> tuple[dict[str, Entry], dict[str, str]]:
    """Load every adapter sub-folder of `folder` that fits the model.

    Returns (loaded by name, refused: name -> reason). Sub-folders without adapter_config.json
    are not adapters and are skipped silently.
    """
    loaded: dict[str, Entry] = {}
    refused: dict[str, str] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not (sub / CONFIG_NAME).is_file():
            continue
        try:
            loaded[sub.name] = load_entry(sub, sub.name, model, tokenizer)
        except SoftpromptError as e:
            refused[sub.name] = str(e)
            log.warning("refused adapter %s: %s", sub.name, e)
        else:
            log.info("loaded adapter %s (%s)", sub.name, sub)
    return loaded, refused


def kv_bytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class KVCache:
    """Each adapter's prompt KV (with its template head after it, see Entry.head), computed once
    and kept, least recently used first out, within `max_bytes` (the entry in use is always
    kept, even alone over the budget).

    `get` runs on the model's worker thread; `discard` may come from another thread.
    """

    def __init__(self, model, max_bytes: int):
        self.model = model
        self.max_bytes = max_bytes
        self._kv: OrderedDict[int, KV] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, entry: Entry) -> KV:
        with self._lock:
            kv = self._kv.get(entry.uid)
            if kv is not None:
                self._kv.move_to_end(entry.uid)
                self.hits += 1
                return kv
        with torch.no_grad():
            head = torch.tensor(entry.head, dtype=torch.long) if entry.head else None
            kv = prefix_kv(self.model, entry.prompt, head)
        with self._lock:
            self.misses += 1
            if entry.unloaded:
                return kv
            self._kv[entry.uid] = kv
            self.bytes += kv_bytes(kv)
            while self.bytes > self.max_bytes and len(self._kv) > 1:
                _, old = self._kv.popitem(last=False)
                self.bytes -= kv_bytes(old)
        return kv

    def discard(self, entry: Entry) -> None:
        with self._lock:
            kv = self._kv.pop(entry.uid, None)
            if kv is not None:
                self.bytes -= kv_bytes(kv)

    def __len__(self) -> int:
        return len(self._kv)

"""Each prompt's keys/values, with its template's head after them, computed once and kept
(`KVCache`, least recently used out first): at inference a prompt's KV depends on the prompt
alone, so every request and row that uses it shares it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .forward.kv import KV, extend_kv, prefix_to_kv, prompt_kv, slice_kv
from .predictors import Member


def kv_bytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class KVCache:
    """Each member's prompt KV with its predictor's template head after it, computed once and
    kept, least recently used first out, within `max_bytes` (None: no bound; the member in use is
    always kept, even alone over the budget). `get` runs on the model's thread; `discard` may
    come from another."""

    def __init__(self, model, max_bytes: int | None = None):
        self.model = model
        self.max_bytes = max_bytes
        self._kv: OrderedDict[int, KV] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, member: Member, head: Sequence[int] = (), keep: bool = True) -> KV:
        with self._lock:
            kv = self._kv.get(member.uid)
            if kv is not None:
                self._kv.move_to_end(member.uid)
                self.hits += 1
                return kv
        with torch.no_grad():
            ids = torch.tensor(list(head), dtype=torch.long) if len(head) else None
            if member.kind == "prefix":  # a deep prompt is a KV already; the head runs after it
                kv = extend_kv(self.model, prefix_to_kv(self.model, member.prompt), head)
            elif member.front_length == 0 and ids is None:  # the base model: an empty KV
                kv = slice_kv(prompt_kv(self.model, member.prompt.new_zeros(1, member.prompt.shape[1])), 0)  # fmt: skip
            else:
                kv = prompt_kv(self.model, member.front, ids)
        with self._lock:
            self.misses += 1
            if not keep:
                return kv
            self._kv[member.uid] = kv
            self.bytes += kv_bytes(kv)
            while self.max_bytes is not None and self.bytes > self.max_bytes and len(self._kv) > 1:
                _, old = self._kv.popitem(last=False)
                self.bytes -= kv_bytes(old)
        return kv

    def discard(self, member: Member) -> None:
        with self._lock:
            kv = self._kv.pop(member.uid, None)
            if kv is not None:
                self.bytes -= kv_bytes(kv)

    def __len__(self) -> int:
        return len(self._kv)

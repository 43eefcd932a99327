"""The small public API for using a trained prompt: load it onto its base model, classify,
generate, evaluate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .adapters import Adapter, check_fits, load_adapter
from .data import DEFAULT_TEMPLATE, Task
from .errors import SoftpromptError
from .evaluate import classify, front, generate_texts, metrics
from .model import load_base, prefix_kv


class SoftPrompt:
    """A soft prompt on its frozen base model.

    >>> sp = SoftPrompt.load("runs/complaints")
    >>> sp.classify(["@nationalgridus I have no water and the bill is paid"])
    [{'label': 'complaint', 'probabilities': {'complaint': 0.93, 'no complaint': 0.07}}]
    """

    def __init__(self, adapter: Adapter, model, tokenizer, members: Sequence[Adapter] = ()):
        check_fits(adapter, model)
        self.adapter = adapter
        self.model = model
        self.tokenizer = tokenizer
        self.task = adapter.task or Task(
            text_column="text", label_names=[], template=DEFAULT_TEMPLATE
        )
        device = model.get_input_embeddings().weight.device
        self.prompt = adapter.prompt.to(device)
        """The prompt [P, H], or with ensemble members the stacked prompts [K, P, H]."""
        if members:
            for m in members:
                check_fits(m, model)
                _check_member(adapter, m)
            self.prompt = torch.stack([self.prompt, *(m.prompt.to(device) for m in members)])
        self._kv = None

    @property
    def ensemble_size(self) -> int:
        return 1 if self.prompt.dim() == 2 else self.prompt.shape[0]

    @property
    def kv(self):
        """The prompt's keys/values in every layer, computed once and reused by every call."""
        if self._kv is None:
            with torch.no_grad():
                self._kv = prefix_kv(self.model, front(self.prompt, self.task))
        return self._kv

    @classmethod
    def load(
        cls,
        path: str,
        model=None,
        tokenizer=None,
        *,
        base_model: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        labels: Sequence[str] | None = None,
        template: str | None = None,
        text_column: str | None = None,
        trust_remote_code: bool = False,
        ensemble: Sequence[str] = (),
    ) -> SoftPrompt:
        """Load an adapter folder (or Hub repo) and its base model (or use the one given).

        `ensemble`: more adapters for the same task; label probabilities are then the mean of
        all prompts' (each text runs once per prompt, all in the same batches)."""
        adapter = load_adapter(path)
        if model is None:
            name = base_model or adapter.base_model
            model, tokenizer, _ = load_base(
                name, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
        task = adapter.task or Task(text_column=text_column or "text", label_names=[])
        changes = {}
        if labels:
            changes["label_names"] = list(labels)
        if template:
            changes["template"] = template
        if text_column:
            changes["text_column"] = text_column
        adapter.task = replace(task, **changes)
        members = [load_adapter(p) for p in ensemble]
        for m in members:
            m.task = replace(m.task or task, **changes)
        return cls(adapter, model, tokenizer, members)

    def _need_labels(self) -> None:
        if not self.task.label_names:
            raise SoftpromptError(
                f"{self.adapter.path} has no label names (a plain PEFT adapter); pass them with --labels "
                "(e.g. --labels 'complaint,no complaint') or use --generate"
            )

    @property
    def bias(self) -> list[float] | None:
        """The decision bias saved with the adapter (`softprompt cv`), if any: see calibrate.py."""
        cal = self.task.extra.get("calibration") or {}
        bias = cal.get("bias")
        if bias is not None and len(bias) != len(self.task.label_names):
            raise SoftpromptError(
                f"{self.adapter.path}: the calibration bias has {len(bias)} entries for "
                f"{len(self.task.label_names)} labels; remove 'calibration' from softprompt.json"
            )
        return bias

    def classify(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        progress: bool = False,
        calibrated: bool = True,
    ) -> list[dict]:
        """Score every label after each text: [{'label', 'probabilities': {label: p}}].

        With `calibrated` (default) the adapter's saved decision bias, if any, is applied."""
        self._need_labels()
        pred, probs = classify(
            self.model,
            self.tokenizer,
            self.prompt,
            self.task,
            texts,
            batch_size=batch_size,
            progress=progress,
            kv=self.kv,
            bias=self.bias if calibrated else None,
        )
        names = self.task.label_names
        return [
            {"label": p, "probabilities": dict(zip(names, row.tolist(), strict=True))}
            for p, row in zip(pred, probs, strict=True)
        ]

    def generate(
        self,
        texts: Sequence[str],
        *,
        max_new_tokens: int = 6,
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[str]:
        """Free generation after each text (greedy), as in the PEFT guide."""
        if self.ensemble_size > 1:
            raise SoftpromptError(
                "generation uses one prompt; drop --ensemble (ensembles work with label scoring)"
            )
        return generate_texts(
            self.model,
            self.tokenizer,
            self.prompt,
            self.task,
            texts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            kv=self.kv,
        )

    def evaluate(
        self,
        texts: Sequence[str],
        gold: Sequence[str],
        *,
        generate: bool = False,
        max_new_tokens: int = 6,
        batch_size: int = 32,
        progress: bool = False,
        calibrated: bool = True,
    ) -> dict:
        """accuracy, macro_f1, per_class, confusion_matrix (and invalid outputs for generation)."""
        self._need_labels()
        if generate:
            pred = self.generate(
                texts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
            )
        else:
            pred = [
                r["label"]
                for r in self.classify(
                    texts, batch_size=batch_size, progress=progress, calibrated=calibrated
                )
            ]
        m = metrics(gold, pred, self.task.label_names)
        m["method"] = "generation" if generate else "label_scoring"
        if not generate:
            m["calibrated"] = bool(calibrated and self.bias is not None)
        return m


def _check_member(first: Adapter, other: Adapter) -> None:
    """Ensemble members must do the same task with prompts of the same shape."""
    what = []
    if other.prompt.shape != first.prompt.shape:
        what.append(
            f"prompt shape {tuple(other.prompt.shape)} (not {tuple(first.prompt.shape)}; "
            "use members trained with the same --num-virtual-tokens)"
        )
    a, b = first.task, other.task
    if a is not None and b is not None:
        if list(a.label_names) != list(b.label_names):
            what.append(f"labels {b.label_names} (not {a.label_names})")
        if a.template != b.template:
            what.append(f"template {b.template!r} (not {a.template!r})")
        if a.suffix_tokens != b.suffix_tokens:
            what.append(f"{b.suffix_tokens} suffix tokens (not {a.suffix_tokens})")
    if what:
        raise SoftpromptError(
            f"--ensemble {other.path} cannot join {first.path}: it has " + "; ".join(what)
        )

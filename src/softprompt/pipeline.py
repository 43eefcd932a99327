"""The small public API for using a trained prompt: load it onto its base model, classify,
generate, evaluate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .adapters import Adapter
from .data import Task, group_references
from .engine import Engine
from .ensembles import load_members
from .errors import SoftpromptError
from .metrics import generation_metrics, metrics, multilabel_metrics
from .modeling.load import load_base
from .predictors import Predictor, chosen_labels, make_predictor, need_labels


class SoftPrompt:
    """A soft prompt (or an ensemble of them) on its frozen base model; every call goes through
    the one inference engine (`engine.Engine`), as eval, predict and the server do.

    >>> sp = SoftPrompt.load("runs/complaints")
    >>> sp.classify(["@nationalgridus I have no water and the bill is paid"])
    [{'label': 'complaint', 'probabilities': {'complaint': 0.93, 'no complaint': 0.07}}]
    """

    def __init__(
        self,
        adapter: Adapter,
        model,
        tokenizer,
        members: Sequence[Adapter] = (),
        *,
        bias: Sequence[float] | None | str = "saved",
        engine: Engine | None = None,
    ):
        self.adapter = adapter
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine or Engine(model, tokenizer)
        self.predictor: Predictor = make_predictor(
            model, tokenizer, [adapter, *members], name=str(adapter.path), bias=bias
        )

    @property
    def task(self) -> Task:
        return self.predictor.task

    @property
    def prompt(self):
        """The prompt [P+S, H]; for an ensemble whose prompts have one shape, [K, P+S, H]."""
        prompts = [m.prompt for m in self.predictor.members]
        return prompts[0] if len(prompts) == 1 else torch.stack(prompts)

    @property
    def ensemble_size(self) -> int:
        return len(self.predictor.members)

    @property
    def bias(self) -> list[float] | None:
        """The decision bias applied (`softprompt cv`, or an ensemble's manifest), if any."""
        return self.predictor.bias

    @property
    def thresholds(self) -> list[float] | None:
        """A multilabel adapter's per-label thresholds (`softprompt cv`), if any (else 0.5)."""
        return self.predictor.thresholds

    @classmethod
    def load(
        cls,
        path: str,
        model=None,
        tokenizer=None,
        *,
        base_model: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        labels: Sequence[str] | None = None,
        template: str | None = None,
        text_column: str | None = None,
        trust_remote_code: bool = False,
        ensemble: Sequence[str] = (),
    ) -> SoftPrompt:
        """Load an adapter folder, an ensemble folder (ensemble.json) or a Hub repo, and its
        base model (or use the one given).

        `dtype` (for a base model loaded here): "auto" is bfloat16 where the device has bfloat16
        hardware, else float32 (`modeling.load.resolve_dtype`); or float32, bfloat16, float16.
        `ensemble`: more adapters for the same task; label probabilities are then the mean of
        all prompts' (each text runs once per prompt, all in the same batches)."""
        adapters, bias = load_members(path)
        for extra in ensemble:
            adapters += load_members(extra)[0]
        if model is None:
            name = base_model or adapters[0].base_model
            model, tokenizer, _ = load_base(
                name, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
        changes = {}
        if labels:
            changes["label_names"] = list(labels)
        if template:
            changes["template"] = template
        if text_column:
            changes["text_column"] = text_column
        for a in adapters:
            task = a.task or Task(text_column=text_column or "text", label_names=[])
            a.task = replace(task, **changes)
        return cls(adapters[0], model, tokenizer, adapters[1:], bias=bias)

    def _need_labels(self) -> None:
        need_labels(self.predictor)

    def classify(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        progress: bool = False,
        calibrated: bool = True,
    ) -> list[dict]:
        """Score every label after each text: [{'label', 'probabilities': {label: p}}]; a
        multilabel adapter: [{'labels': [...], 'probabilities': {label: p}}], each label's own
        probability, the labels those reaching their thresholds.

        With `calibrated` (default) the adapter's saved decision bias (multilabel: thresholds),
        if any, is applied; else the raw probabilities (multilabel: every threshold 0.5)."""
        probs = self.engine.classify(
            self.predictor, texts, batch_size=batch_size, progress=progress, calibrated=calibrated
        )
        names = self.task.label_names
        if self.task.multilabel:
            chosen = chosen_labels(self.predictor, probs, calibrated)
            return [
                {"labels": labels, "probabilities": dict(zip(names, row.tolist(), strict=True))}
                for labels, row in zip(chosen, probs, strict=True)
            ]
        return [
            {
                "label": names[int(row.argmax())],
                "probabilities": dict(zip(names, row.tolist(), strict=True)),
            }
            for row in probs
        ]

    def generate(
        self,
        texts: Sequence[str],
        *,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        stop: Sequence[str] = (),
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[str]:
        """Each text rendered with the template and written on: greedy, or beam search with
        `num_beams`; up to `max_new_tokens` (default: a generation adapter's own, else 6, as in
        the PEFT guide), ending at the end token or before the first of `stop`."""
        if self.ensemble_size > 1:
            raise SoftpromptError(
                "generation uses one prompt; drop --ensemble (ensembles work with label scoring)"
            )
        return self.engine.generate(
            self.predictor,
            texts,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            stop=stop,
            batch_size=batch_size,
            progress=progress,
        )

    def evaluate(
        self,
        texts: Sequence[str],
        gold: Sequence[str],
        *,
        generate: bool = False,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        stop: Sequence[str] = (),
        batch_size: int = 32,
        progress: bool = False,
        calibrated: bool = True,
        outputs: list | None = None,
    ) -> dict:
        """Classification: accuracy, macro_f1, per_class, confusion_matrix (and invalid outputs
        with `generate`). Multilabel: micro_f1, macro_f1, subset_accuracy, hamming_loss,
        per_label (`metrics.multilabel_metrics`), each gold a list of labels (or a text joined
        by the adapter's label separator). A generation adapter: rows with the same text are one input and
        their golds its references; each input is written out once (`generate`'s options) and
        scored by `metrics.generation_metrics` (bleu, chrf, rouge_l, exact_match). `outputs`, a
        list, receives one {text, output, references} per input."""
        if self.task.generates:
            inputs, refs = group_references(texts, gold)
            pred = self.generate(
                inputs,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                length_penalty=length_penalty,
                stop=stop,
                batch_size=batch_size,
                progress=progress,
            )
            if outputs is not None:
                outputs += [
                    {"text": t, "output": o, "references": r}
                    for t, o, r in zip(inputs, pred, refs, strict=True)
                ]
            m = generation_metrics(pred, refs)
            m["decoding"] = {
                "num_beams": num_beams,
                "length_penalty": length_penalty,
                "max_new_tokens": max_new_tokens or self.task.max_new_tokens,
                "stop": list(stop),
            }
            return m
        self._need_labels()
        if self.task.multilabel and not generate:
            return self._evaluate_multilabel(texts, gold, batch_size, progress, calibrated, outputs)
        if generate:
            pred = self.generate(
                texts,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
                stop=stop,
            )
        else:
            pred = [
                r["label"]
                for r in self.classify(
                    texts, batch_size=batch_size, progress=progress, calibrated=calibrated
                )
            ]
        if outputs is not None:
            outputs += [{"text": t, "output": o, "gold": g} for t, o, g in zip(texts, pred, gold, strict=True)]  # fmt: skip
        m = metrics(gold, pred, self.task.label_names)
        head = self.predictor.describe()["head"]
        # how the labels were read: written out, scored through the label words, or a head's
        m["method"] = "generation" if generate else "label_scoring" if head == "none" else "head"
        m["head"] = head
        if not generate:
            m["calibrated"] = bool(calibrated and self.bias is not None)
        return m

    def _evaluate_multilabel(self, texts, gold, batch_size, progress, calibrated, outputs) -> dict:
        sep = self.task.label_separator or ","
        gold = [
            [n.strip() for n in g.split(sep) if n.strip()] if isinstance(g, str) else list(g)
            for g in gold
        ]
        pred = [
            r["labels"]
            for r in self.classify(
                texts, batch_size=batch_size, progress=progress, calibrated=calibrated
            )
        ]
        if outputs is not None:
            outputs += [{"text": t, "output": o, "gold": g} for t, o, g in zip(texts, pred, gold, strict=True)]  # fmt: skip
        m = multilabel_metrics(gold, pred, self.task.label_names)
        m["method"] = "head"
        m["head"] = self.predictor.describe()["head"]
        m["calibrated"] = bool(calibrated and self.thresholds is not None)
        m["thresholds"] = (
            self.thresholds
            if calibrated and self.thresholds
            else [0.5] * len(self.task.label_names)
        )
        return m

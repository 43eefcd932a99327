"""`POST /v1/classify`: each label's probability, through the adapter's label words or its
classification head, the numbers `SoftPrompt.classify` and `softprompt predict` give; each
input rendered with the adapter's template and cut as in training (or 413 with strict). A
multilabel adapter answers each label's own probability and the labels that reach their
thresholds."""

from __future__ import annotations

import torch
from fastapi import Request

from ..predictors import ClassifyRow, chosen_labels
from .errors import ApiError
from .metrics import note_adapter
from .protocol import ClassifyRequest, ClassifyResponse, ClassifyResult
from .state import ServerState


async def classify(req: ClassifyRequest, request: Request, state: ServerState) -> ClassifyResponse:
    entry = state.get(req.adapter)
    note_adapter(request, entry.name)
    if not req.inputs:
        raise ApiError(400, "inputs is empty; give at least one text")
    limit = state.config.max_inputs
    if len(req.inputs) > limit:
        raise ApiError(413, f"{len(req.inputs)} inputs, more than the {limit} allowed")
    if entry is state.base:
        raise ApiError(
            400,
            f"{entry.name!r} is the base model (no soft prompt): it has no labels to score; "
            "name an adapter with labels in 'adapter', or use /v1/completions",
            param="adapter",
        )
    if entry.task.generates:
        raise ApiError(
            400,
            f"adapter {entry.name!r} is a generation adapter (--task generation): it writes "
            "text rather than choosing a label; use /v1/completions or /v1/chat/completions",
            param="adapter",
        )
    if not entry.task.label_names:
        raise ApiError(
            400,
            f"adapter {entry.name!r} has no label names (a plain PEFT adapter without "
            "softprompt.json); use /v1/completions",
        )
    rows, warnings, cut = [], [], []
    for i, text in enumerate(req.inputs):
        ids, truncated = state.encode(entry.task, text, entry.budget, req.strict, f"input {i}")
        rows.append(ClassifyRow(entry, ids))
        cut.append(truncated)
        if truncated:
            warnings.append(
                f"input {i} was cut to fit {entry.budget} tokens (the adapter's max_length "
                f"{entry.task.max_length} minus its longest label), as in training"
            )
    state.metrics.truncated.inc(sum(cut))
    probs = await state.run(rows, request)
    state.metrics.on_tokens(entry.name, sum(len(r.ids) for r in rows))
    names = entry.task.label_names
    if entry.task.multilabel:  # each label's own probability; those reaching its threshold
        chosen = chosen_labels(entry, torch.tensor(probs))
        results = [
            ClassifyResult(labels=c, probabilities=dict(zip(names, p, strict=True)), truncated=t)
            for c, p, t in zip(chosen, probs, cut, strict=True)
        ]
        return ClassifyResponse(
            adapter=entry.name,
            calibrated=entry.thresholds is not None,
            thresholds=entry.thresholds or [0.5] * len(names),
            results=results,
            warnings=warnings or None,
        )
    results = [
        ClassifyResult(
            label=names[max(range(len(p)), key=p.__getitem__)],
            probabilities=dict(zip(names, p, strict=True)),
            truncated=t,
        )
        for p, t in zip(probs, cut, strict=True)
    ]
    return ClassifyResponse(
        adapter=entry.name,
        calibrated=entry.bias is not None,
        results=results,
        warnings=warnings or None,
    )

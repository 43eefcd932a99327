"""`POST /v1/completions` (OpenAI's): each prompt's raw text right after the soft prompt (no
template; the adapter's suffix tokens after it), with stop strings, streaming, log-probabilities
of new tokens, and `echo` (the prompt's own tokens scored: lm-eval-harness's log-likelihood).
A generation adapter's prompt is rendered with its template instead, as `predict` does
(`Engine.encode_generation`), and its max_tokens defaults to the adapter's max_new_tokens."""

from __future__ import annotations

import functools
import sys

from fastapi import Request
from sse_starlette import EventSourceResponse

from ..data import input_token_ids
from ..predictors import Predictor, PromptLogprobRow, raw_task
from .errors import ApiError
from .protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from .serving import OpenAIServing
from .text import TextStream, token_text


class ServingCompletion(OpenAIServing):
    """One generate row per prompt (a request may send several), and with echo + logprobs a
    prompt-scoring row per prompt in the same job."""

    id_prefix = "cmpl-"

    async def respond(
        self, req: CompletionRequest, request: Request, entry: Predictor, stops: list[str]
    ) -> CompletionResponse | EventSourceResponse:
        for flag, bad, what in (
            ("echo", req.echo and req.stream, "echo is not supported with stream"),
            ("best_of", req.best_of not in (None, 1), "best_of must be 1"),
            ("suffix", req.suffix is not None, "suffix is not supported"),
        ):
            if bad:
                raise ApiError(400, what, param=flag)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        limit = self.state.config.max_inputs
        if len(prompts) > limit:
            raise ApiError(413, f"{len(prompts)} prompts, more than the {limit} allowed")
        rows, streams, warnings = self._rows(entry, req, prompts, stops)
        head = self.head(entry)
        if req.stream:
            return await self._stream(req, request, head, rows, streams, warnings)
        scored = []
        if req.echo and req.logprobs is not None:  # the prompts' own tokens, scored
            scored = [PromptLogprobRow(entry, r.ids, req.logprobs) for r in rows]
        done = await self.answer(rows, streams, request, extra=scored)
        choices = []
        for i, d in enumerate(done[: len(rows)]):
            lead, lead_infos = "", []
            if req.echo:
                ids = [t for t in rows[i].ids if t >= 0]
                plain = not warnings and not entry.task.generates  # else: what the model saw
                lead = prompts[i] if plain else self.state.tokenizer.decode(ids)
                if scored:
                    lead_infos = self._prompt_infos(ids, done[len(rows) + i])
            logprobs = None
            if req.logprobs is not None:
                logprobs = _logprobs(lead_infos + d.infos)
            choices.append(CompletionChoice(text=lead + d.text, index=i, logprobs=logprobs, finish_reason=d.finish_reason))  # fmt: skip
        usage = self.usage(rows, [len(d.tokens) for d in done[: len(rows)]])
        return CompletionResponse(**head, choices=choices, usage=usage, warnings=warnings or None)

    def _rows(self, entry: Predictor, req: CompletionRequest, prompts: list[str], stops):
        """A generate row per prompt, its prompt cut at the end to fit the context (a warning)
        or 413 with strict."""
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = (entry.task.generates and entry.task.max_new_tokens) or 16
        task = raw_task(entry.task)
        budget = self.state.context - entry.num_virtual_tokens - entry.task.suffix_tokens - max_tokens  # fmt: skip
        if budget < 1:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} leaves no room in the model's context of "
                f"{self.state.context} tokens ({entry.num_virtual_tokens} virtual tokens)",
                param="max_tokens",
            )
        rows, streams, warnings = [], [], []
        for i, text in enumerate(prompts):
            if entry.task.generates:
                ids, warning = self._templated(entry, text, budget, req.strict, f"prompt {i}")
            else:
                ids, truncated = self.state.encode(task, text, budget, req.strict, f"prompt {i}")
                warning = (
                    f"prompt {i} was cut at the end to fit {budget} tokens" if truncated else None
                )
            if warning:
                self.state.metrics.truncated.inc()
                warnings.append(warning)
            if not ids:  # as OpenAI: an empty prompt is the end-of-text token
                ids = [self.state.tokenizer.eos_token_id]
            streams.append(TextStream(self.state.tokenizer, stops, logprobs=req.logprobs))
            rows.append(self.row(entry, ids, req, max_tokens, streams[-1]))
        return rows, streams, warnings

    def _templated(
        self, entry: Predictor, text: str, budget: int, strict: bool, what: str
    ) -> tuple[list[int], str | None]:
        """A generation adapter's prompt: the ids `predict` writes on (`encode_generation`: the
        text in the adapter's template, cut to its max_length), cut further to `budget` tokens
        when the context (less max_tokens) is shorter; and a warning when the text was cut
        (413 instead with strict)."""
        state, task = self.state, entry.task
        ids = state.engine.encode_generation(entry, text)
        if len(ids) - task.suffix_tokens > budget:
            ids, _ = state.encode(task, text, budget, strict, what)
            return ids, f"{what} was cut at the end to fit {budget} tokens"
        if len(ids) == len(input_token_ids(state.tokenizer, task, text, sys.maxsize)):
            return ids, None
        if strict:
            raise ApiError(
                413,
                f"{what} does not fit adapter {entry.name!r}'s max_length of {task.max_length} "
                "tokens in its template; shorten it, or leave strict off to have it cut as "
                "predict does",
                "input_too_long",
            )
        return ids, f"{what} was cut at the end to fit the adapter's max_length {task.max_length}, as predict does"  # fmt: skip

    async def _stream(self, req, request, head, rows, streams, warnings):
        offsets = [0] * len(rows)
        told = [not warnings]

        def first(choice: CompletionChoice, **extra) -> CompletionStreamResponse:
            """The stream's first event carries the warnings (prompts that were cut)."""
            if not told[0]:
                told[0] = True
                extra["warnings"] = warnings
            return CompletionStreamResponse(**head, choices=[choice], **extra)

        def chunk(i: int, piece: str, infos: list[dict]) -> CompletionStreamResponse:
            logprobs = None
            if req.logprobs is not None:
                logprobs = _logprobs(infos, offsets[i])
                offsets[i] += sum(len(x["token"]) for x in infos)
            return first(CompletionChoice(text=piece, index=i, logprobs=logprobs))

        def final(i: int, why: str) -> CompletionStreamResponse:
            return first(CompletionChoice(text="", index=i, finish_reason=why))

        def usage(u) -> CompletionStreamResponse:
            return CompletionStreamResponse(**head, choices=[], usage=u)

        include = req.stream_options is not None and req.stream_options.include_usage
        return await self.stream(rows, streams, request, chunk, final, usage if include else None)

    def _prompt_infos(self, ids: list[int], scores) -> list[dict]:
        """Token infos (as TextStream keeps them) of a prompt's tokens; the first has none."""
        picked, top_ids, top_lp = scores
        dec = functools.partial(token_text, self.state.tokenizer)
        out = [{"token": dec(ids[0]), "logprob": None, "top": None}]
        for t, lp, ti, tl in zip(ids[1:], picked.tolist(), top_ids.tolist(), top_lp.tolist(), strict=True):  # fmt: skip
            out.append({"token": dec(t), "logprob": lp, "top": {dec(a): b for a, b in zip(ti, tl, strict=True)}})  # fmt: skip
        return out


def _logprobs(infos: list[dict], offset: int = 0) -> CompletionLogprobs:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets = []
    for x in infos:
        offsets.append(offset)
        offset += len(x["token"])
    return CompletionLogprobs(
        tokens=[x["token"] for x in infos],
        token_logprobs=[x["logprob"] for x in infos],
        top_logprobs=[x["top"] for x in infos],
        text_offset=offsets,
    )

"""The HTTP API's shapes: a pydantic model for every request, response and stream chunk, so that
`/docs` documents them. OpenAI's shapes for completions, chat and models; softprompt's own for
classify, adapters and health. A field that is left out of a response when it has nothing to
say (`warnings`, a stream chunk's `usage`) is declared with `Omitted`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def _none(value) -> bool:
    return value is None


def Omitted(description: str = ""):  # noqa: N802 - used like pydantic's Field
    """A field that is left out of the JSON when it is None."""
    return Field(None, exclude_if=_none, description=description)


FinishReason = Literal["stop", "length"]


class Request(BaseModel):
    """A request body: unknown fields are ignored (OpenAI clients send many)."""

    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    message: str
    type: str
    param: str | None = Omitted("The request field at fault.")
    code: str | None = Omitted()


class ErrorResponse(BaseModel):
    """Every error: `{"error": {"message", "type", ...}}` (OpenAI's shape)."""

    error: ErrorInfo


# --------------------------------------------------------------------------- classify


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    inputs: list[str]
    strict: bool = False
    """True: an input longer than the adapter allows gets 413 instead of being cut."""


class ClassifyResult(BaseModel):
    label: str | None = Omitted("The most likely label (a single-label adapter).")
    labels: list[str] | None = Omitted(
        "A multilabel adapter's answer: every label whose probability reaches its threshold."
    )
    probabilities: dict[str, float]
    """Each label's probability (label scoring; calibrated when the adapter has a bias); a
    multilabel adapter's are each label's own (they need not sum to 1)."""
    truncated: bool


class ClassifyResponse(BaseModel):
    adapter: str
    calibrated: bool
    """Whether the adapter's calibration bias (multilabel: its fitted thresholds) applied."""
    thresholds: list[float] | None = Omitted(
        "A multilabel adapter's per-label thresholds, in its labels' order (0.5 unless fitted)."
    )
    results: list[ClassifyResult]
    warnings: list[str] | None = Omitted("Inputs that were cut to fit, as in training.")


# --------------------------------------------------------------------------- completions


class StreamOptions(Request):
    include_usage: bool = False
    """A last chunk with the usage (and no choices)."""


class CompletionRequest(Request):
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=0)
    """None: a generation adapter's own max_new_tokens, else 16. 0 (with echo and logprobs):
    only score the prompt, as lm-eval-harness does."""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    echo: bool = False
    """The prompt in front of the text (and with logprobs, its tokens' log-probabilities)."""
    logprobs: int | None = Field(None, ge=0, le=20)
    """Each new token's log-probability and the `logprobs` most likely tokens at its place."""
    best_of: int | None = None
    suffix: str | None = None
    strict: bool = False
    stream_options: StreamOptions | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Envelope(BaseModel):
    """What every completion or chat response, and every chunk of their streams, starts with."""

    id: str
    object: str
    created: int
    model: str


class CompletionResponse(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo
    warnings: list[str] | None = Omitted("Prompts that were cut to fit the context.")


class CompletionStreamResponse(Envelope):
    """One server-sent event of a streamed completion (then `data: [DONE]`)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = Omitted("Only in the last chunk, with include_usage.")
    warnings: list[str] | None = Omitted("Only in the first chunk.")


# --------------------------------------------------------------------------- chat


class ChatMessage(Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    """Text, or a list of text parts ({type: "text", text})."""


class ChatRequest(Request):
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    """None: what fits in the context after the messages, at most 256 (at most a generation
    adapter's own max_new_tokens)."""
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    content: str | None = Omitted()
    role: Literal["assistant"] | None = Omitted("Only in the first chunk.")


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionStreamResponse(Envelope):
    """One server-sent event of a streamed chat answer (then `data: [DONE]`)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = Omitted("Only in the last chunk, with include_usage.")


# --------------------------------------------------------------------------- models, admin


class AdapterInfo(BaseModel):
    """What softprompt knows of a model: an adapter, or the base model (`base`)."""

    model_config = ConfigDict(extra="allow")
    task: str
    """classification (labels, or the base model's plain completions), multilabel (any number
    of labels per text, each with its own probability) or generation (trained with --task
    generation: completions and chat write on the text rendered with its template;
    softprompt.json's `kind`, as saved)."""
    labels: list[str]
    head: str | list[str]
    """How it reads the label: none (label words), linear or pooled (a classification head);
    an ensemble whose members differ lists theirs."""
    can_generate: bool
    """False with a classification head: it answers /v1/classify only."""
    num_virtual_tokens: int
    suffix_tokens: int
    method: str
    template: str
    max_length: int
    max_new_tokens: int | None
    """A generation adapter's default max_tokens (None for classification)."""
    base_model: str | None
    calibration_bias: list[float] | None
    thresholds: list[float] | None = None
    """A multilabel adapter's fitted per-label thresholds (None: 0.5 each)."""
    ensemble: list[str] | None
    """The members' folders, for an ensemble."""
    base: bool
    """The base model itself, with no soft prompt."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "softprompt"
    softprompt: AdapterInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    """A folder under the adapters folder (relative to it, or absolute)."""
    name: str | None = None
    """Default: the folder's name."""


class LoadResponse(ModelCard):
    loaded: str


class DeleteResponse(BaseModel):
    deleted: str


class KVCacheInfo(BaseModel):
    entries: int
    bytes: int


class Health(BaseModel):
    status: Literal["ok", "loading", "draining"]
    model: str
    adapters: list[str]
    refused: dict[str, str]
    """Adapter folders that were not loaded, and why."""
    queue_depth: int
    kv_cache: KVCacheInfo
    in_flight: int

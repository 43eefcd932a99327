"""`POST /v1/chat/completions` (OpenAI's): the messages rendered with the base tokenizer's chat
template, the assistant's turn opened, the adapter's soft prompt in front and its suffix tokens
after. Messages are never cut: those that do not fit get 413. A generation adapter writes on the
last user message's text in its own template instead, as `predict` does
(`Engine.encode_generation`)."""

from __future__ import annotations

from fastapi import Request
from sse_starlette import EventSourceResponse

from ..data import suffix_placeholders
from ..predictors import Predictor
from .errors import ApiError
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatRequest,
    ChatStreamChoice,
    DeltaMessage,
)
from .serving import OpenAIServing
from .text import TextStream


class ServingChat(OpenAIServing):
    """One generate row per request: the rendered messages, greedy or sampled."""

    id_prefix = "chatcmpl-"

    async def respond(
        self, req: ChatRequest, request: Request, entry: Predictor, stops: list[str]
    ) -> ChatCompletionResponse | EventSourceResponse:
        max_tokens = req.max_completion_tokens or req.max_tokens
        generates = entry.task.generates
        ids = self._templated(entry, req.messages) if generates else self._ids(entry, req.messages)
        left = self.state.context - entry.num_virtual_tokens - len(ids)
        if max_tokens is None:
            max_tokens = min((generates and entry.task.max_new_tokens) or 256, left)
        if left < max(max_tokens, 1):
            raise ApiError(
                413,
                f"the rendered messages are {len(ids)} tokens: with max_tokens {max_tokens} "
                f"and {entry.num_virtual_tokens} virtual tokens they do not fit the model's "
                f"context of {self.state.context}; send fewer or shorter messages or lower max_tokens",
                "input_too_long",
                param="messages",
            )
        stream = TextStream(self.state.tokenizer, stops)
        rows = [self.row(entry, ids, req, max_tokens, stream)]
        head = self.head(entry)
        if req.stream:
            started = [False]

            def chunk(i: int, piece: str, infos: list[dict]) -> ChatCompletionStreamResponse:
                delta = DeltaMessage(content=piece, role=None if started[0] else "assistant")
                started[0] = True
                return ChatCompletionStreamResponse(**head, choices=[ChatStreamChoice(index=0, delta=delta)])  # fmt: skip

            def final(i: int, why: str) -> ChatCompletionStreamResponse:
                choice = ChatStreamChoice(index=0, delta=DeltaMessage(), finish_reason=why)
                return ChatCompletionStreamResponse(**head, choices=[choice])

            def usage(u) -> ChatCompletionStreamResponse:
                return ChatCompletionStreamResponse(**head, choices=[], usage=u)

            include = req.stream_options is not None and req.stream_options.include_usage
            return await self.stream(rows, [stream], request, chunk, final, usage if include else None)  # fmt: skip
        (done,) = await self.answer(rows, [stream], request)
        message = AssistantMessage(content=done.text)
        choice = ChatChoice(index=0, message=message, finish_reason=done.finish_reason)
        usage = self.usage(rows, [len(done.tokens)])
        return ChatCompletionResponse(**head, choices=[choice], usage=usage)

    def _ids(self, entry: Predictor, messages: list[ChatMessage]) -> list[int]:
        """The messages rendered with the base tokenizer's chat template (and the assistant's
        turn opened), tokenised; the adapter's suffix placeholders after them, if it has any."""
        tok = self.state.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(
                400,
                f"the base model {self.state.model_name!r} has no chat template in its tokenizer, "
                "so messages cannot be rendered; use /v1/completions with a prompt",
                param="messages",
            )
        if not messages:
            raise ApiError(400, "messages is empty; give at least one message", param="messages")
        plain = [{"role": m.role, "content": _content(i, m)} for i, m in enumerate(messages)]
        try:
            text = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template's own error (e.g. roles out of order)
            raise ApiError(
                400, f"the chat template refused the messages: {e}", param="messages"
            ) from None
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        return ids + suffix_placeholders(entry.task.suffix_tokens)

    def _templated(self, entry: Predictor, messages: list[ChatMessage]) -> list[int]:
        """A generation adapter's input: the last user message's text rendered with the
        adapter's template and cut to its max_length, the ids `predict` writes on (the other
        messages are not read)."""
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users:
            raise ApiError(
                400,
                f"messages has no user message: {entry.name!r} is a generation adapter, it "
                "writes on the last user message's text",
                param="messages",
            )
        text = _content(users[-1], messages[users[-1]])
        return self.state.engine.encode_generation(entry, text)


def _content(i: int, message: ChatMessage) -> str:
    """A message's text: its content, or its text parts joined (400 for other parts)."""
    if not isinstance(message.content, list):
        return message.content or ""
    texts = [p.get("text") for p in message.content if isinstance(p, dict)]
    if any(p.get("type") != "text" for p in message.content) or None in texts:
        raise ApiError(
            400,
            f"messages[{i}].content: only text parts ({{type: 'text', text}}) are supported",
            param=f"messages[{i}].content",
        )
    return "".join(texts)

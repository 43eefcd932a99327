"""One generated row's tokens as text: stop strings and the pieces a stream sends.

No web framework here: `app.py` gives each generate row a `TextStream` as its `on_token`, for
streaming and non-streaming answers alike (one path).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class TextStream:
    """Decodes a row's new tokens as they come, on the model's thread.

    The text never includes a stop string: when one appears the row ends (`on_token` returns
    True) and the text ends right before it. A piece is held back while it could still be the
    start of a stop string, or ends in an incomplete character. `on_piece(text, token_info)` (if
    given) gets each new piece as soon as it is safe to send (from the model's thread).
    With `logprobs` = k, each token's log-probability and the k most likely tokens are kept.
    """

    def __init__(
        self,
        tokenizer,
        stops: Sequence[str] = (),
        *,
        logprobs: int | None = None,
        on_piece: Callable[[str, list[dict]], None] | None = None,
    ):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.logprobs = logprobs
        self.on_piece = on_piece
        self.ids: list[int] = []
        self.text = ""
        """The text so far, up to (not including) a stop string once one appeared."""
        self.sent = 0
        """Characters of `text` already handed out as pieces."""
        self.stopped = False
        """A stop string ended the row."""
        self.cancelled = threading.Event()
        """Set from any thread (a client that left): the row ends at its next token."""
        self.tokens: list[dict] = []
        """Per token (with `logprobs`): {token, logprob, top: {token: logprob}}."""
        self._unsent: list[dict] = []

    def on_token(self, token: int, logits: Tensor) -> bool:
        """`engine.GenerateRow.on_token`: True ends the row."""
        if self.stopped:
            return True
        self.ids.append(token)
        if self.logprobs is not None:
            info = token_logprobs(self.tokenizer, logits, token, self.logprobs)
            self.tokens.append(info)
            self._unsent.append(info)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            self.text = text[: max(min(found), self.sent)]
            self._emit(len(self.text))
            return True
        self.text = text
        self._emit(self._safe_end(text))
        return self.cancelled.is_set()

    def finish(self) -> tuple[str, list[dict]]:
        """What was held back when the row ended (without a stop string): (piece, token infos).
        Not given to `on_piece`: the caller sends it after the row's last piece."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        infos, self._unsent = self._unsent, []
        return piece, infos

    def _safe_end(self, text: str) -> int:
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete character
            end -= 1
        hold = 0  # the longest tail of the text that could begin a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if s.startswith(text[end - k : end]):
                    hold = k
                    break
        return end - hold

    def _emit(self, end: int) -> None:
        if end <= self.sent:
            return
        piece, self.sent = self.text[self.sent : end], end
        infos, self._unsent = self._unsent, []
        if self.on_piece is not None:
            self.on_piece(piece, infos)


def token_text(tokenizer, token: int) -> str:
    """A token's text; a token that is only part of a character (its text would be the
    replacement character, the same for many tokens) is named by its vocabulary entry instead,
    so top-k keys stay distinct."""
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        return str(tokenizer.convert_ids_to_tokens(token))
    return text


def token_logprobs(tokenizer, logits: Tensor, token: int, k: int) -> dict:
    """{token: its text, logprob, top: the k most likely tokens' texts -> log-probability}
    from the logits [V] the token was chosen from."""
    logp = torch.log_softmax(logits.float(), -1)
    out = {"token": token_text(tokenizer, token), "logprob": float(logp[token]), "top": {}}
    if k > 0:
        values, ids = logp.topk(min(k, logp.shape[-1]))
        out["top"] = {
            token_text(tokenizer, int(i)): float(v) for v, i in zip(values, ids, strict=True)
        }
    return out

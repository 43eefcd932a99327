"""Recording the outputs of chosen decoder layers during a forward pass (`capture`), and ending
the pass after the last of them when nothing later is needed (`run_capturing(stop=True)`): a
pooled classification head reads middle layers only (`readouts.head`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import Tensor


class _Stop(Exception):
    """Raised by `capture`'s hook after the last layer a pooled head needs."""


@contextlib.contextmanager
def capture(model, layers: Sequence[int], *, stop: bool = False) -> Iterator[dict[int, Tensor]]:
    """Record the outputs of the decoder layers at hidden-state indices `layers` (1 = the first
    layer's output) while the model runs inside the block: {index: [B, T, H]}. With `stop`, the
    forward pass ends after the last of them (`stopped` raises nothing: run it through
    `run_capturing`)."""
    from ..modeling.load import decoder_layers

    blocks = decoder_layers(model)
    got: dict[int, Tensor] = {}
    last = max(layers, default=0)

    def hook_for(i: int):
        def hook(module, args, output):
            got[i] = output[0] if isinstance(output, tuple) else output
            if stop and i == last:
                raise _Stop

        return hook

    handles = [blocks[i - 1].register_forward_hook(hook_for(i)) for i in layers]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def run_capturing(fn, model, layers: Sequence[int], *, stop: bool):
    """(fn()'s result or None if stopped early, {layer index: output}) with the layers recorded."""
    with capture(model, layers, stop=stop) as got:
        try:
            result = fn()
        except _Stop:
            result = None
    return result, got

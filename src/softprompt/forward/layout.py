"""How rows are laid out: several rows share a lane of the batch, each token seeing only its own
row and its own prompt (a 4D additive mask, `packed_mask`; placement by `pack_rows` and
`lane_width`), and which models can run them so (`packed_problem`, `packed_fits`; the others
take the padded layout, announced once by `note_path`)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import SoftpromptError


def bloom_slopes(model):
    """BLOOM's ALiBi slope function when `model` is a BLOOM model (its packed path builds the
    bias itself), else None."""
    if getattr(model.config, "model_type", None) != "bloom":
        return None
    try:
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
    except ImportError:  # pragma: no cover - a transformers release that moved it
        return None
    return _get_alibi_slopes


def packed_problem(model) -> str | None:
    """Why the packed path (rows packed into lanes after a prompt, with a 4D attention mask and
    each token's position in its own row) cannot run this model, or None when it can.

    Such a model runs on the padded path instead: each row after its own copy of the prompt,
    a 2D padding mask, no KV cache in training and scoring (`label_loss(shared_prefix=False)`,
    `engine.full_label_scores`): the reference computation, slower but exact."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return (
            f"its attention implementation {impl!r} takes no custom 4D mask; load it with "
            "attn_implementation='sdpa' for the packed path"
        )
    if bloom_slopes(model) is not None:
        return None  # ALiBi rebuilt from per-row positions (`_bloom_packed`)
    if getattr(model.config, "alibi", False):
        return "it builds its ALiBi position bias from a 2D padding mask"
    decoder = model.get_decoder()
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return "its decoder takes no position ids, which packed rows need"
    return None


def sliding_window(model) -> int | None:
    """The attention window of the model's sliding-window layers, or None if it has none.
    A packed 4D mask replaces the window, so the packed path is exact only while a prompt and
    its row fit in the window (`packed_fits`)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def packed_fits(model, span: int) -> bool:
    """Whether sequences of up to `span` positions (prompt, row and label) can run packed; when
    they cannot, the padded path is announced once with the reason (`note_path`)."""
    reason = packed_problem(model)
    window = sliding_window(model)
    if reason is None and window is not None and span > window:
        reason = (
            f"a prompt and its row exceed the model's sliding attention window ({window} "
            "positions), which a packed mask cannot apply"
        )
    if reason is not None:
        note_path(model, reason)
    return reason is None


_NOTED: set[tuple[int, str]] = set()


def note_path(model, reason: str | None = None) -> str | None:
    """Say once per model (a log line on stderr) that it runs on the padded path and why;
    returns the line (None when the model takes the packed path)."""
    import logging

    reason = reason or packed_problem(model)
    if reason is None:
        return None
    line = f"{type(model).__name__} runs on the padded path (exact, slower): {reason}"
    if (id(model), reason) not in _NOTED:
        _NOTED.add((id(model), reason))
        logging.getLogger("softprompt").warning("softprompt: %s", line)
    return line


def require_packed(model) -> None:
    """Refuse (one line) a packed layout for a model that cannot run it (`packed_problem`)."""
    reason = packed_problem(model)
    if reason is not None:
        raise SoftpromptError(
            f"{type(model).__name__} cannot run packed rows: {reason} (softprompt's engine and "
            "training switch to the padded path by themselves)"
        )


def pack_rows(
    lengths: Sequence[int], width: int | None = None
) -> tuple[int, list[tuple[int, int]]]:
    """Place rows of these lengths into lanes `width` wide (default: about the widest that pays,
    see `lane_width`) by first-fit decreasing: (number of lanes, each row's (lane, offset)).

    Packed rather than padded, a batch runs close to its real tokens while its matrix products
    keep their size (what a CPU core's throughput depends on: splitting a batch into smaller
    length-sorted ones pads less but runs each product slower).
    """
    if width is None:
        width = lane_width(lengths)
    width = max(max(lengths, default=0), width)
    free: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        lane = next((k for k, f in enumerate(free) if f >= n), None)
        if lane is None:
            lane = len(free)
            free.append(width)
        places[i] = (lane, width - free[lane])
        free[lane] -= n
    return max(len(free), 1), places


ATTENTION_TOKENS = 1024
"""Lane width at which attention costs about as much per token as the rest of a layer (a rough
figure for small models on a CPU; it only steers the choice of lane width)."""


def lane_width(lengths: Sequence[int], prefix: int = 0) -> int:
    """The lane width (for the rows, not counting `prefix`) that runs the fewest token slots,
    attention's share (growing with the width) counted: 1, 1.5, 2 or 3 times the longest row, or
    every row in one lane. `prefix` positions (a prompt run inside each lane, as training does)
    come before each lane's rows and are paid once per lane."""
    longest = max(lengths, default=0)
    best, best_cost = longest, float("inf")
    for w in sorted(
        {max(int(longest * k), longest) for k in (1.0, 1.5, 2.0, 3.0)} | {sum(lengths)}
    ):
        lanes, _ = pack_rows(lengths, w)
        cost = lanes * (prefix + w) * (1 + (prefix + w) / ATTENTION_TOKENS)
        if cost < best_cost:
            best, best_cost = w, cost
    return best


def packed_mask(
    seg: Tensor,
    index: Tensor,
    past: Tensor,
    dtype: torch.dtype,
    node: Tensor | None = None,
    ancestors: Tensor | None = None,
) -> Tensor:
    """Additive 4D attention mask [lanes, 1, W, past+W] for rows packed into lanes.

    Per position [lanes, W]: `seg` its row (-1: unused), `index` its place in the row's input
    (-1: not an input token), `node` its label-trie node (-1: none; see `_continuation_trie`).
    `past` [lanes, W, N] says which cached positions (prompts) it sees. Within the lane a token
    sees its own row only: an input token the earlier input tokens, a trie token the whole
    input and its `ancestors` [K, K] (itself included). An unused position sees the past only.
    """
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    q_in, k_in = index[:, :, None] >= 0, index[:, None, :] >= 0
    own = q_in & k_in & (index[:, None, :] <= index[:, :, None])
    if node is not None and ancestors is not None and ancestors.numel():
        nq, nk = node[:, :, None], node[:, None, :]
        in_trie = (nq >= 0) & (nk >= 0)
        anc = ancestors[nq.clamp(min=0), nk.clamp(min=0)] & in_trie
        own = own | ((nq >= 0) & k_in) | anc
    see = torch.cat([past, same & own], 2)
    mask = torch.zeros(see.shape, dtype=dtype, device=seg.device)
    return mask.masked_fill_(~see, torch.finfo(dtype).min)[:, None]

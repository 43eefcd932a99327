"""A prompt's keys/values (KV). With causal attention the virtual tokens never see the input, so
their keys/values depend on the prompt alone: the prompt runs once (`prompt_kv`), its KV is
cached and broadcast or picked per lane (`cache_from`). Also a deep prompt's layout
(`prefix_to_kv`, `kv_to_prefix`, `prefix_dims`), extending, slicing and stacking KVs, and the
glue to transformers' caches."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import SoftpromptError

KV = tuple[tuple[Tensor, Tensor], ...]
"""A prompt's keys/values: per layer (k, v), each [N, heads, P, head_dim]."""


def cache_kw(module) -> str:
    """transformers 5 calls the cache argument `cache`; older releases `past_key_values`."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def prompt_kv(model, prompts: Tensor, head_ids: Tensor | None = None) -> KV:
    """Keys/values of prompts [N, P, H] (or [P, H]) in every layer: ((k, v), ...) [N, heads, P, d].

    `head_ids` [h] are tokens every row starts with (e.g. the template's text before `{text}`):
    they run after the prompt in the same pass (positions P..P+h-1), and the KV then covers
    P+h positions, so the rows can start after them.
    """
    if prompts.dim() == 2:
        prompts = prompts[None]
    decoder = model.get_decoder()
    emb = model.get_input_embeddings()
    embeds = prompts.to(emb.weight.dtype)
    if head_ids is not None and head_ids.numel():
        head = emb(head_ids.to(prompts.device))[None].expand(embeds.shape[0], -1, -1)
        embeds = torch.cat([embeds, head], 1)
    n = embeds.shape[1]
    pos = torch.arange(n, device=prompts.device)[None].expand(embeds.shape[0], -1)
    out = decoder(inputs_embeds=embeds, position_ids=pos, use_cache=True)
    return tuple((layer.keys, layer.values) for layer in out_cache(out).layers)


def prefix_dims(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's KV cache: a deep prompt (prefix) of P
    positions holds layers x 2 x heads x head dim numbers per position (PEFT's PREFIX_TUNING
    `num_layers`, `num_attention_heads`, `token_dim // num_attention_heads`). Read off one
    forward of a single position, so grouped-query and multi-query attention count right."""
    dims = getattr(model, "_softprompt_kv_dims", None)  # kept on the model: an id can be reused
    if dims is None:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight[:1]
            kv = prompt_kv(model, emb.float())
        shapes = {(k.shape[1], k.shape[3], v.shape[1], v.shape[3]) for k, v in kv}
        if len(shapes) != 1:
            raise SoftpromptError(
                f"{type(model).__name__} has layers of different key/value shapes {sorted(shapes)}; "
                "a deep prompt (--method prefix) needs one shape in every layer: use --method prompt"
            )
        heads, d, _, _ = shapes.pop()
        dims = (len(kv), heads, d)
        model._softprompt_kv_dims = dims
    return dims


def prefix_to_kv(model, prefix: Tensor) -> KV:
    """A deep prompt in PEFT's PREFIX_TUNING layout [P, layers*2*heads*d] (or [N, P, ...]) as
    per-layer keys/values ((k, v), ...) [N, heads, P, d] in the model's dtype. Differentiable:
    training optimises `prefix` itself."""
    L, heads, d = prefix_dims(model)
    x = prefix if prefix.dim() == 3 else prefix[None]
    N, P, width = x.shape
    if width != L * 2 * heads * d:
        raise SoftpromptError(
            f"a deep prompt of width {width} does not fit {type(model).__name__}: it needs "
            f"{L} layers x 2 x {heads} heads x {d} = {L * 2 * heads * d}"
        )
    dtype = model.get_input_embeddings().weight.dtype
    x = x.to(dtype).view(N, P, L, 2, heads, d).permute(2, 3, 0, 4, 1, 5)  # [L, 2, N, heads, P, d]
    return tuple((x[i, 0], x[i, 1]) for i in range(L))


def kv_to_prefix(kv: KV) -> Tensor:
    """Keys/values [N, heads, P, d] per layer as a deep prompt [N, P, layers*2*heads*d] in
    float32 (PEFT's PREFIX_TUNING layout; the inverse of `prefix_to_kv`)."""
    x = torch.stack([torch.stack([k, v]) for k, v in kv])  # [L, 2, N, heads, P, d]
    L, _, N, heads, P, d = x.shape
    return x.permute(2, 4, 0, 1, 3, 5).reshape(N, P, L * 2 * heads * d).float()


def extend_kv(model, kv: KV, ids: Sequence[int]) -> KV:
    """kv (N prompts, length P) followed by the same tokens `ids` [h] for every prompt: a KV of
    length P+h. Exact (causal attention): those tokens' keys/values depend only on what is before."""
    if not len(ids):
        return kv
    from .batch import padded
    from .run import run

    N = kv[0][0].shape[0]
    batch = padded([list(ids)] * N, 0, kv[0][0].device)
    cache = run(model, batch, kv=kv, use_cache=True).cache
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def slice_kv(kv: KV, length: int) -> KV:
    """The first `length` positions of kv (exact: a position's KV never depends on later ones)."""
    if kv[0][0].shape[2] == length:
        return kv
    return tuple((k[:, :, :length], v[:, :, :length]) for k, v in kv)


def stack_kv(kvs: Sequence[KV]) -> KV:
    """Several prompts' KV (each from `prompt_kv`, all with the same P) as one KV of N prompts.

    With `rows` [B] indexing into the result, each row of a batch runs after its own prompt
    (one forward pass for many prompts). kvs: N tuples of per-layer (k, v) [n_i, heads, P, d].
    """
    if len(kvs) == 1:
        return kvs[0]
    P = {kv[0][0].shape[2] for kv in kvs}
    assert len(P) == 1, f"prompts of different lengths {sorted(P)} cannot share a batch"
    return tuple(
        (torch.cat([kv[i][0] for kv in kvs]), torch.cat([kv[i][1] for kv in kvs]))
        for i in range(len(kvs[0]))
    )


def cache_from(kv: KV, rows: Tensor | int):
    """A fresh DynamicCache for a batch. `rows` is the batch size (one shared prompt), an index
    tensor [B] choosing each row's prompt out of kv's N prompts, or [B, M] choosing M prompts
    per row, laid one after the other (M*P cached positions; packed lanes, see `packed_mask`)."""
    from transformers import DynamicCache

    def pick(t: Tensor) -> Tensor:
        if isinstance(rows, int):
            return t.expand(rows, -1, -1, -1)
        if rows.dim() == 1:
            return t[rows]
        g = t[rows]  # [B, M, heads, P, d]
        return g.transpose(1, 2).reshape(g.shape[0], t.shape[1], -1, t.shape[3])

    return DynamicCache(ddp_cache_data=[(pick(k), pick(v)) for k, v in kv])


GROW_ROOM = 64
"""Positions a decoding buffer holds beyond what it has (`decode_cache`)."""


def decode_cache(kv: KV):
    """The cache of one decoding step of a running batch (kv: its rows' keys/values, per layer
    [B, heads, L, d]). transformers' DynamicCache copies each layer's keys/values twice a step
    (filling a new cache, then concatenating the new position); here they live in buffers with
    room for GROW_ROOM more positions and a step writes its position in place (a new buffer
    when one is full, or when kv is not such a buffer's head). Only a running `Decoding` holds
    these views, and it drops the old ones every step, so no one sees a buffer's tail change."""
    from transformers import DynamicCache

    layer = _grow_layer()
    cache = DynamicCache()
    cache.layers = [layer(k, v) for k, v in kv]
    return cache


@functools.cache
def _grow_layer():
    """A transformers cache layer holding given keys/values that grows them with `_grow`
    (made once: transformers is imported lazily, and decoding asks for it every step)."""
    from transformers.cache_utils import DynamicLayer

    class GrowLayer(DynamicLayer):
        def __init__(self, keys: Tensor, values: Tensor):
            super().__init__()
            self.keys, self.values, self.device = keys, values, keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys = _grow(self.keys, key_states)
            self.values = _grow(self.values, value_states)
            return self.keys, self.values

    return GrowLayer


def _grow(t: Tensor, new: Tensor) -> Tensor:
    """t [B, heads, n, d] followed by new [B, heads, m, d] along positions: written in place
    when t is the head of a buffer `_grow` made with room left, else into a new such buffer."""
    n, m = t.shape[2], new.shape[2]
    base = t._base
    if (
        base is not None
        and getattr(base, "_softprompt_decode", False)
        and base.shape[2] >= n + m
        and base.shape[:2] == t.shape[:2]
        and t.data_ptr() == base.data_ptr()
        and t.stride() == base.stride()
    ):
        base[:, :, n : n + m].copy_(new)
        return base[:, :, : n + m]
    B, H, _, d = t.shape
    buf = new.new_empty(B, H, n + m + GROW_ROOM, d)
    buf[:, :, :n].copy_(t)
    buf[:, :, n : n + m].copy_(new)
    buf._softprompt_decode = True
    return buf[:, :, : n + m]

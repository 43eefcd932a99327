"""The frozen causal LM and how soft prompts combine with its input.

Two ways to run a prompt [P, H] in front of input tokens [B, T]:
- `concat_forward`: the reference (what PEFT does): concatenate prompt and token embeddings
  and run the whole model on [B, P+T].
- the shared-prefix path: with causal attention the virtual tokens never see the input, so
  their keys/values depend on the prompt alone. At inference (`prefix_kv` + `run_after_prefix`)
  the prompt runs once, its KV is cached and broadcast to the rows. In training (`label_loss`)
  the prompt runs once per lane in the same pass as the rows packed after it, each row seeing
  the prompt and itself. Both equal the reference up to float rounding.

The rows of a batch run packed, not padded: several rows share a lane of the batch, each token
seeing only its own row and its own prompt (a 4D attention mask, `pack_rows` / `packed_mask`).
Label scoring also runs every label's tokens in the same pass, as a trie after each row.

This module never imports training or CLI code.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Generator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SoftpromptError, first_line

KV = tuple[tuple[Tensor, Tensor], ...]
"""A prompt's keys/values: per layer (k, v), each [N, heads, P, head_dim]."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
"""What --dtype takes: "auto" (see `resolve_dtype`) or one of DTYPES."""


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else CUDA, then MPS, then CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where
    there is no such file (macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def bf16_hardware(device: torch.device) -> str | None:
    """What gives `device` bfloat16 arithmetic in hardware, in words ("the CPU has AMX bf16"),
    or None where bfloat16 would only be emulated (then it runs slower than float32).

    CUDA: `torch.cuda.is_bf16_supported` without emulation (Ampere and later). CPU: AMX bf16 or
    AVX512-BF16 (x86), BF16 (Arm), as torch's own probes say where it has them, else the
    flags in /proc/cpuinfo. MPS and anything else: None.
    """
    if device.type == "cuda":
        on = (
            torch.cuda.device(device.index)
            if device.index is not None
            else contextlib.nullcontext()
        )
        with on:  # is_bf16_supported asks about the current device
            try:
                ok = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch without the argument
                ok = torch.cuda.is_bf16_supported()
            return f"the GPU ({torch.cuda.get_device_name(device)}) has bfloat16" if ok else None
    if device.type != "cpu":
        return None
    probes = torch._C._cpu  # present in some torch releases only
    if getattr(probes, "_is_amx_tile_supported", lambda: False)():
        return "the CPU has AMX bf16"
    if getattr(probes, "_is_avx512_bf16_supported", lambda: False)():
        return "the CPU has AVX512-BF16"
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "the CPU has AMX bf16"
    if "avx512_bf16" in flags:
        return "the CPU has AVX512-BF16"
    if "bf16" in flags:  # Arm (e.g. Neoverse V1, Graviton3)
        return "the CPU has Arm BF16"
    return None


def resolve_dtype(dtype: str, device: torch.device | str | None = None) -> str:
    """The dtype to load the base model in: `dtype` itself, or for "auto" bfloat16 where
    `device` (default: `pick_device()`) has bfloat16 hardware (`bf16_hardware`) and float32
    elsewhere. The prompt and its optimiser state stay float32 either way."""
    if dtype not in DTYPE_CHOICES:
        raise SoftpromptError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if dtype != "auto":
        return dtype
    dev = device if isinstance(device, torch.device) else pick_device(device)
    return "bfloat16" if bf16_hardware(dev) else "float32"


def dtype_name(dtype: torch.dtype) -> str:
    """The --dtype spelling of a torch dtype: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def dtype_line(dtype: str, device: torch.device | str | None = None) -> str:
    """One line saying which dtype `dtype` gives on `device` and why:
    "dtype: bfloat16 (auto: the CPU has AMX bf16)", "dtype: float32 (--dtype float32)"."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    resolved = resolve_dtype(dtype, dev)
    if dtype != "auto":
        return f"dtype: {resolved} (--dtype {dtype})"
    why = bf16_hardware(dev) or f"no bfloat16 hardware found on {dev.type}"
    return f"dtype: {resolved} (auto: {why})"


def load_base(
    name: str | None = None,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a frozen causal LM and its tokenizer.

    `name` is a Hugging Face model id, a local folder, or None/`default` for the built-in
    SmolLM2-135M-Instruct. Returns (model, tokenizer, resolved_name); every parameter of the
    model has requires_grad=False and the model is in eval mode (no dropout). `dtype` "auto"
    is bfloat16 where the device has bfloat16 hardware, else float32 (`resolve_dtype`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .defaults import default_model_dir, is_default_model

    target = pick_device(device)
    dtype = resolve_dtype(dtype, target)
    source = str(default_model_dir()) if is_default_model(name) else name
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().is_dir():
        raise SoftpromptError(
            f"--model {name}: no such folder; pass a Hugging Face model id or a local model folder"
        )
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SoftpromptError(
            f"could not load model {name!r}: {first_line(e)} (check the id or folder, your network, "
            "or pass --trust-remote-code for models with custom code)"
        ) from e
    if getattr(config, "is_encoder_decoder", False):
        raise SoftpromptError(
            f"--model {name}: {config.model_type} is an encoder-decoder model; softprompt tunes "
            "prompts for decoder-only causal LMs (Llama, Qwen, Mistral, Gemma, BLOOM, GPT-2, ...)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise SoftpromptError(
            f"could not load model {name!r}: {first_line(e)} (check the id or folder, your network, "
            "or pass --trust-remote-code for models with custom code)"
        ) from e
    check_model(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    model.to(target)
    return model, tokenizer, "default" if is_default_model(name) else name


def set_gradient_checkpointing(model, enable: bool = True) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (less
    memory, about a third more compute). Non-reentrant, so inputs need not require grad.

    Hugging Face checkpoints a layer only while that layer is in train mode: only the layer
    modules themselves are switched to train mode; everything inside them (attention, dropout)
    stays in eval mode, so dropout stays off and the loss equals the one without checkpointing.
    A checkpointed layer runs without a KV cache: train with `label_loss(..., shared_prefix=False)`.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.eval()
    if not enable:
        off = getattr(model, "activation_checkpointing_disable", None)
        (off or model.gradient_checkpointing_disable)()
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SoftpromptError(
            f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing"
        )
    on = getattr(model, "activation_checkpointing_enable", None)
    if on is not None:  # transformers >= 5.x
        on(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()  # the prompt requires grad; the embeddings need not
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m.training = True


def decoder_layers(model) -> list:
    """The model's decoder layers (Hugging Face's GradientCheckpointingLayer blocks)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def shard_model(model, device: torch.device) -> tuple[int, int]:
    """Shard the frozen model's weights over the processes of torch.distributed (FSDP2,
    `fully_shard`): each decoder layer is its own unit, gathered only while it runs (forward and
    backward) and resharded after. The rest (embeddings, final norm, LM head: softprompt calls
    them directly) forms the root unit; `gather_root` must be called before each step.

    Train with `label_loss(..., shared_prefix=False)` and score with `evaluate.full_label_scores`: a
    cached prompt KV would outlive its layer's gathered weights. Every process must run the same
    sequence of forward (and backward) calls. Returns (weights this process holds, all weights).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not isinstance(model, FSDPModule):  # a model passed in again is sharded already
        layers = decoder_layers(model)
        if not layers:
            raise SoftpromptError(
                f"--fsdp: found no decoder layers in {type(model).__name__} to shard; drop --fsdp"
            )
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    total = sum(p.numel() for p in model.parameters())
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    gather_root(model)
    return local, total


def gather_root(model) -> None:
    """Gather the root unit's weights of a sharded model (no-op for a plain model, or when they
    are gathered already). FSDP reshards them after each backward."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.unshard()


def hidden_size(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


def _cache_kw(module) -> str:
    """transformers 5 calls the cache argument `cache`; older releases `past_key_values`."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def count_parameters(model, prompt_params: int) -> tuple[int, int]:
    """(trainable, all) parameters of prompt + frozen model, as PEFT counts them."""
    total = sum(p.numel() for p in model.parameters()) + prompt_params
    return prompt_params, total


def format_trainable(trainable: int, total: int) -> str:
    """The PEFT guide's `print_trainable_parameters` line."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def concat_forward(model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Reference forward: prompt [P, H] (or [B, P, H]) before input_ids [B, T].

    Returns logits [B, P+T, V]. Position ids are 0..P+T-1 as in PEFT (right padding keeps
    every real token at the same position as in an unpadded run). With suffix placeholders in
    the rows (see `embed_ids`), the prompt's last vectors run there instead of in front, and
    P counts only the vectors in front (`prefix_length`).
    """
    embeds, mask = _concat_inputs(model, prompt, input_ids, attention_mask)
    return model(inputs_embeds=embeds, attention_mask=mask).logits


def suffix_count(input_ids: Tensor) -> int:
    """How many suffix soft tokens the rows carry: their placeholders are -n .. -1
    (`data.suffix_placeholders`); 0 when there are none."""
    low = int(input_ids.min()) if input_ids.numel() else 0
    return -low if low < 0 else 0


def prefix_length(prompt: Tensor, input_ids: Tensor) -> int:
    """How many of the prompt's vectors run in front of the rows (the rest are suffix tokens)."""
    P = prompt.shape[-2] - suffix_count(input_ids)
    if P < 0:
        raise SoftpromptError(
            f"the rows hold {suffix_count(input_ids)} suffix placeholders but the prompt has only "
            f"{prompt.shape[-2]} vectors"
        )
    return P


def embed_ids(
    model, ids: Tensor, prompts: Tensor | None = None, which: Tensor | None = None
) -> Tensor:
    """Input embeddings of token ids [..., T]. A suffix placeholder -k takes the prompt's k-th
    vector from the end: from `prompts` [N, H], or with `prompts` [K, N, H] from prompt
    `which` [..., T] of that position. Gradients flow into those vectors."""
    emb = model.get_input_embeddings()
    out = emb(ids.clamp(min=0))
    neg = ids < 0
    if not bool(neg.any()):
        return out
    if prompts is None:
        raise SoftpromptError("the rows hold suffix placeholders, but no prompt was given for them")
    n = prompts.shape[-2]
    slot = (ids + n).clamp(0, n - 1)
    vec = prompts[slot] if prompts.dim() == 2 else prompts[which, slot]
    return torch.where(neg[..., None], vec.to(out.dtype), out)


def _concat_inputs(
    model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """(embeddings [B, P+T, H], attention mask [B, P+T]) of prompt [P, H] (or [B, P, H])
    placed before input_ids [B, T] (its last vectors in the rows' suffix placeholders, if any)."""
    B = input_ids.shape[0]
    P = prefix_length(prompt, input_ids)
    which = None
    if prompt.dim() == 3:
        which = torch.arange(B, device=input_ids.device)[:, None].expand_as(input_ids)
    emb = embed_ids(model, input_ids, prompt, which)
    prompts = prompt.expand(B, -1, -1) if prompt.dim() == 2 else prompt
    embeds = torch.cat([prompts[:, :P].to(emb.dtype), emb], dim=1)
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
    return embeds, mask


def prefix_kv(model, prompts: Tensor, head_ids: Tensor | None = None) -> KV:
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
    return tuple((layer.keys, layer.values) for layer in _out_cache(out).layers)


_DIMS: dict[int, tuple[int, int, int]] = {}


def prefix_dims(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's KV cache: a deep prompt (prefix) of P
    positions holds layers x 2 x heads x head dim numbers per position (PEFT's PREFIX_TUNING
    `num_layers`, `num_attention_heads`, `token_dim // num_attention_heads`). Read off one
    forward of a single position, so grouped-query and multi-query attention count right."""
    key = id(model)
    if key not in _DIMS:
        with torch.no_grad():
            emb = model.get_input_embeddings().weight[:1]
            kv = prefix_kv(model, emb.float())
        shapes = {(k.shape[1], k.shape[3], v.shape[1], v.shape[3]) for k, v in kv}
        if len(shapes) != 1:
            raise SoftpromptError(
                f"{type(model).__name__} has layers of different key/value shapes {sorted(shapes)}; "
                "a deep prompt (--method prefix) needs one shape in every layer: use --method prompt"
            )
        heads, d, _, _ = shapes.pop()
        _DIMS[key] = (len(kv), heads, d)
    return _DIMS[key]


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
    N = kv[0][0].shape[0]
    device = kv[0][0].device
    x = torch.tensor([list(ids)], device=device).expand(N, -1)
    rows = torch.arange(N, device=device)
    _, cache = run_after_prefix(model, kv, x, torch.ones_like(x), rows, use_cache=True)
    return tuple((layer.keys, layer.values) for layer in cache.layers)


def slice_kv(kv: KV, length: int) -> KV:
    """The first `length` positions of kv (exact: a position's KV never depends on later ones)."""
    if kv[0][0].shape[2] == length:
        return kv
    return tuple((k[:, :, :length], v[:, :, :length]) for k, v in kv)


def common_prefix_length(seqs: Sequence[Sequence[int]], head: Sequence[int], keep: int = 1) -> int:
    """How many leading tokens of `head` every sequence starts with, leaving each sequence at
    least `keep` tokens of its own. Checked per row, so a row whose tokenisation merged across
    the template boundary (BPE) simply shortens the shared part."""
    n = len(head)
    for s in seqs:
        n = min(n, len(s) - keep)
        i = 0
        while i < n and s[i] == head[i]:
            i += 1
        n = i
        if n <= 0:
            return 0
    return max(n, 0)


def stack_kv(kvs: Sequence[KV]) -> KV:
    """Several prompts' KV (each from `prefix_kv`, all with the same P) as one KV of N prompts.

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


def _cache_from(kv: KV, rows: Tensor | int):
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


def positions_after(prefix_len: int | Tensor, attention_mask: Tensor) -> Tensor:
    """Position ids [B, T] for tokens after a prefix, skipping padding (left or right)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return (pos.clamp(min=0) + prefix_len).to(attention_mask.device)


def run_after_prefix(
    model,
    kv: KV,
    input_ids: Tensor,
    attention_mask: Tensor,
    rows: Tensor | None = None,
    *,
    past_mask: Tensor | None = None,
    use_cache: bool = False,
    prompts: Tensor | None = None,
):
    """Run input_ids [B, T] after a prompt's KV. Returns (hidden [B, T, H], cache or None).

    `rows` [B] picks each row's prompt from kv (default: all rows use prompt 0, broadcast).
    `past_mask` [B, P] marks the valid prefix positions (default: all valid).
    `prompts` ([P+S, H], or [N, P+S, H] indexed by `rows`) fill suffix placeholders (`embed_ids`).
    """
    B = input_ids.shape[0]
    P = kv[0][0].shape[2]
    cache = _cache_from(kv, B if rows is None else rows)
    if past_mask is None:
        past_mask = attention_mask.new_ones(B, P)
    full_mask = torch.cat([past_mask, attention_mask], dim=1)
    pos = positions_after(past_mask.long().sum(-1, keepdim=True), attention_mask)
    decoder = model.get_decoder()
    out = decoder(
        **_ids_or_embeds(model, input_ids, prompts, rows),
        attention_mask=full_mask,
        position_ids=pos,
        use_cache=use_cache,
        **{_cache_kw(decoder): cache},
    )
    return out.last_hidden_state, (_out_cache(out) if use_cache else None)


def _ids_or_embeds(model, ids: Tensor, prompts: Tensor | None, which: Tensor | None) -> dict:
    """The decoder's input: the ids, or with suffix placeholders among them their embeddings
    (`which`: each position's prompt when `prompts` is [N, P+S, H]; a [B] tensor is per row)."""
    if not suffix_count(ids):
        return {"input_ids": ids}
    if prompts is not None and prompts.dim() == 3:
        if which is None:
            which = torch.zeros_like(ids)
        elif which.dim() == 1:
            which = which[:, None].expand_as(ids)
    return {"inputs_embeds": embed_ids(model, ids, prompts, which)}


def check_model(model) -> None:
    """Refuse, before any work, a model softprompt cannot put a prompt in front of: an
    encoder-decoder, or one with no input embeddings or no decoder stack to run them through."""
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False):
        raise SoftpromptError(
            f"{name} is an encoder-decoder model: softprompt tunes prompts for decoder-only "
            "causal LMs (Llama, Qwen, Mistral, Gemma, BLOOM, GPT-2, ...); pick one with --model"
        )
    try:
        emb = model.get_input_embeddings()
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        emb = decoder = None
    if not isinstance(emb, torch.nn.Embedding) or decoder is None or decoder is model:
        raise SoftpromptError(
            f"{name} exposes no input embeddings and decoder stack (get_input_embeddings / "
            "get_decoder): softprompt cannot place a soft prompt in front of its input; pick a "
            "causal LM from transformers with --model"
        )


def _bloom_slopes(model):
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
    if _bloom_slopes(model) is not None:
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


def _require_packed(model) -> None:
    reason = packed_problem(model)
    if reason is not None:
        raise SoftpromptError(
            f"{type(model).__name__} cannot run packed rows: {reason} (softprompt's engine and "
            "training switch to the padded path by themselves)"
        )


def run_packed(
    model,
    inputs: dict,
    attention_mask: Tensor,
    position_ids: Tensor,
    cache=None,
    past_positions: Tensor | None = None,
) -> Tensor:
    """The decoder over packed lanes: `inputs` {input_ids or inputs_embeds} [B, T(, H)],
    `attention_mask` additive [B, 1, T, past+T] (`packed_mask`), `position_ids` [B, T] (each
    token's place in its own sequence), `cache` the lanes' past [B, heads, past, d] whose keys
    sit at `past_positions` [past] (default 0..past-1). Returns the hidden states [B, T, H]."""
    decoder = model.get_decoder()
    slopes = _bloom_slopes(model)
    if slopes is None:
        extra = {} if cache is None else {_cache_kw(decoder): cache}
        out = decoder(
            **inputs,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        return out.last_hidden_state
    return _bloom_packed(
        decoder, slopes, inputs, attention_mask, position_ids, cache, past_positions
    )


def _bloom_packed(decoder, slopes, inputs, mask, pos, cache, past_positions) -> Tensor:
    """BLOOM's decoder over packed lanes. ALiBi adds slope x (key position) to every score; with
    a query seeing only its own row and prompt, each key's position in its own sequence gives
    the same softmax as BLOOM's bias over a 2D mask (a shift by the query's position cancels).
    So the bias is built from the packed positions and the blocks run with the 4D mask."""
    embeds = inputs.get("inputs_embeds")
    if embeds is None:
        embeds = decoder.word_embeddings(inputs["input_ids"])
    hidden = decoder.word_embeddings_layernorm(embeds)
    B = pos.shape[0]
    keys = pos
    if cache is not None:
        past = cache.get_seq_length()
        if past_positions is None:
            past_positions = torch.arange(past, device=pos.device)
        keys = torch.cat([past_positions.to(pos.device).expand(B, -1), pos], 1)
    heads = decoder.num_heads
    alibi = slopes(heads, pos.device)[None, :, None] * keys[:, None, :].to(torch.float32)
    alibi = alibi.reshape(B * heads, 1, -1).to(hidden.dtype)  # [B*heads, 1, keys]
    for block in decoder.h:
        hidden = block(hidden, alibi=alibi, attention_mask=mask, layer_past=cache)[0]
    return decoder.ln_f(hidden)


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
    come before each lane's rows and are paid once per lane. Eight RAFT tweets padded to the
    longest take ~1.46x their tokens; packed into lanes twice as wide, ~1.1x; in one lane, 1x."""
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


def label_loss(
    model,
    prompt: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    reduction: str = "mean",
    shared_prefix: bool = True,
    share_head: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over label tokens (labels [B, T], -100 elsewhere): their mean, or their sum
    with reduction="sum" (a data-parallel shard divides the sum by the global token count), or
    with reduction="none" (and no weights) each label token's, in row-major order.
    `weights` [B] weighs each row's tokens (the mean is then sum(w * loss) / sum(w)).

    Inputs are right-padded [B, T]. The LM head is applied only where a label token is
    predicted, and the loss equals `reference_loss` (and PEFT's loss) up to float rounding.

    shared_prefix=True: the prompt [P, H] runs once per lane, at the start of the lane, and the
    rows packed after it in the same forward pass all see it (one lane for a batch of 8 tweets:
    the weights are read once per step, not once for a small prompt pass and again for the rows).
    With `share_head` the leading tokens every row has in common (the template's head, e.g.
    `Tweet text :`) run once with the prompt instead of once per row, and the last column
    (only ever a target) is not run at all.
    shared_prefix=False: prompt and tokens run concatenated through the model with no KV cache,
    which is what gradient checkpointing needs (a checkpointed layer runs without a cache).
    """
    h = 0
    if shared_prefix and not packed_fits(model, prompt.shape[-2] + input_ids.shape[1]):
        shared_prefix = False
    if shared_prefix:
        if share_head:
            # the token before the first label token must stay in the rows (its output is used)
            first_label = int((labels != -100).long().argmax(-1).min())
            same = (input_ids == input_ids[:1]).all(0)[: max(first_label - 1, 0)]
            h = int(same.long().cumprod(0).sum())
        if prompt.dim() != 2:
            raise SoftpromptError(
                f"label_loss(shared_prefix=True) takes one prompt [P, H], got shape "
                f"{tuple(prompt.shape)}: for one prompt per row pass shared_prefix=False"
            )
        dtype = model.get_input_embeddings().weight.dtype
        P = prefix_length(prompt, input_ids)  # the rest are suffix tokens, inside the rows
        head = embed_ids(model, input_ids[0, :h], prompt)
        prefix = torch.cat([prompt[:P].to(dtype), head])  # [Q, H]
        Q = prefix.shape[0]
        ids, target, row_of, index = _pack_label_rows(input_ids, attention_mask, labels, h, Q)
        lanes, width = ids.shape
        device = input_ids.device
        # The prefix sees itself causally; a row sees the whole prefix and its own earlier
        # tokens (`packed_mask` with the prefix as every position's past).
        rows_mask = packed_mask(
            row_of, index, torch.ones((lanes, width, Q), dtype=torch.bool, device=device), dtype
        )
        head_mask = torch.full((Q, Q + width), torch.finfo(dtype).min, dtype=dtype, device=device)
        head_mask[:, :Q].triu_(1)
        hidden = run_packed(
            model,
            {
                "inputs_embeds": torch.cat(
                    [prefix.expand(lanes, -1, -1), embed_ids(model, ids, prompt)], 1
                )
            },
            torch.cat([head_mask.expand(lanes, 1, -1, -1), rows_mask], 2),
            torch.cat(
                [torch.arange(Q, device=device).expand(lanes, -1), index.clamp(min=0) + Q], 1
            ),
        )[:, Q:]
        return _packed_loss(model, hidden, target, row_of, index, weights, reduction)
    embeds, mask = _concat_inputs(model, prompt, input_ids, attention_mask)
    hidden = model.get_decoder()(
        inputs_embeds=embeds, attention_mask=mask, use_cache=False
    ).last_hidden_state[:, embeds.shape[1] - input_ids.shape[1] :]  # after the prompt
    return _padded_loss(model, hidden, labels, weights, reduction)


def _pack_label_rows(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, h: int, prefix: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded training rows [B, T] packed into lanes (`pack_rows`), each row from its
    token h (the first h are shared and run elsewhere) up to its last but one (the last is only
    ever a target); `prefix` positions come before each lane (for the lane width's cost).
    Returns (ids, target, row_of, index), each [lanes, width]: the token, the label it predicts
    (-100: none), its row (-1: unused) and its place among its row's packed tokens."""
    lengths = [max(int(n) - 1 - h, 0) for n in attention_mask.sum(-1).tolist()]
    width = lane_width(lengths, prefix)
    lanes, places = pack_rows(lengths, width)
    device = input_ids.device
    ids = input_ids.new_full((lanes, width), max(int(input_ids[0, 0]), 0))
    target = labels.new_full((lanes, width), -100)
    row_of = torch.full((lanes, width), -1, dtype=torch.long, device=device)
    index = torch.full((lanes, width), -1, dtype=torch.long, device=device)
    for b, (lane, off) in enumerate(places):
        n = lengths[b]
        ids[lane, off : off + n] = input_ids[b, h : h + n]
        target[lane, off : off + n] = labels[b, h + 1 : h + 1 + n]
        row_of[lane, off : off + n] = b
        index[lane, off : off + n] = torch.arange(n, device=device)
    return ids, target, row_of, index


def _packed_loss(model, hidden, target, row_of, index, weights, reduction) -> Tensor:
    """The loss of packed lanes' hidden states [lanes, width, H]: the LM head only where a label
    is predicted; token losses put back in row-major order, as the padded layout gives them."""
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[keep])
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    rows = row_of[keep]
    order = torch.argsort(rows * (int(index.max()) + 2) + index[keep])
    return _reduce(tok[order], rows[order], weights, reduction)


def _padded_loss(model, hidden, labels, weights, reduction) -> Tensor:
    """The loss of right-padded rows' hidden states [B, T, H] aligned with `labels` [B, T]."""
    target = labels[:, 1:]
    keep = target != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    return _reduce(tok, keep.nonzero()[:, 0], weights, reduction)


def _reduce(tok: Tensor, rows: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    """Label tokens' losses `tok` (of rows `rows`, row-major) reduced as `label_loss` says."""
    if weights is None:
        if reduction == "none":
            return tok
        return tok.sum() if reduction == "sum" else tok.mean()
    w = weights.to(tok.device, torch.float32)[rows]
    tok = tok * w
    return tok.sum() if reduction == "sum" else tok.sum() / w.sum()


def prefix_label_loss(
    model,
    prefix: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    reduction: str = "mean",
    weights: Tensor | None = None,
    packed: bool = True,
) -> Tensor:
    """`label_loss` for a deep prompt `prefix` [P, layers*2*heads*d] (`prefix_to_kv`): the rows
    run after its keys/values in every layer, at positions P.. (as PEFT's prefix tuning runs
    them). The prefix needs no forward pass of its own: packed, the rows share lanes after it
    (each seeing the whole prefix and its own earlier tokens); with packed=False (or a model that
    cannot run packed rows) each right-padded row runs after its own copy, with a 2D mask."""
    kv = prefix_to_kv(model, prefix)
    P = kv[0][0].shape[2]
    if packed and not packed_fits(model, P + input_ids.shape[1]):
        packed = False
    if not packed:
        hidden, _ = run_after_prefix(model, kv, input_ids, attention_mask)
        return _padded_loss(model, hidden, labels, weights, reduction)
    ids, target, row_of, index = _pack_label_rows(input_ids, attention_mask, labels, 0, 0)
    lanes, width = ids.shape
    dtype = model.get_input_embeddings().weight.dtype
    past = torch.ones((lanes, width, P), dtype=torch.bool, device=ids.device)
    hidden = run_packed(
        model,
        {"input_ids": ids},
        packed_mask(row_of, index, past, dtype),
        index.clamp(min=0) + P,
        _cache_from(kv, lanes),
    )
    return _packed_loss(model, hidden, target, row_of, index, weights, reduction)


def reference_loss(
    model, prompt: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> Tensor:
    """The same loss through `concat_forward` (full logits everywhere)."""
    P = prefix_length(prompt, input_ids)
    logits = concat_forward(model, prompt, input_ids, attention_mask)[:, P:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


def _continuation_trie(
    continuations: Sequence[Sequence[int]],
) -> tuple[list[int], list[int], list[int], list[list[tuple[int, int]]]]:
    """The continuations' proper prefixes as a trie, for scoring them all in one pass.

    Returns (tokens, parents, depths, reads): trie node k (a distinct prefix c[:j], 1 <= j <
    len(c)) holds token c[j-1], its parent node (-1 for the input's last position) and its depth
    j; reads[i] lists (node, token) for continuation i: the token scored at that node's output
    (node -1 = the input's last position). "complaint" + eos and "no complaint" + eos need 3
    nodes, not 2 rows of 2 columns after a copy of the row's cache.
    """
    nodes: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    reads: list[list[tuple[int, int]]] = []
    for c in continuations:
        c = [int(t) for t in c]
        if not c:
            raise ValueError("a continuation has no tokens")
        for j in range(1, len(c)):
            key = tuple(c[:j])
            if key not in nodes:
                nodes[key] = len(tokens)
                tokens.append(c[j - 1])
                parents.append(nodes[key[:-1]] if j > 1 else -1)
                depths.append(j)
        reads.append([(nodes[tuple(c[:j])] if j else -1, c[j]) for j in range(len(c))])
    return tokens, parents, depths, reads


def score_continuations(
    model,
    kv: KV,
    input_ids: Tensor,
    attention_mask: Tensor,
    continuations: Sequence[Sequence[int]],
    rows: Tensor | None = None,
    prompts: Tensor | None = None,
) -> Tensor:
    """Log-probability of each continuation after each row: [B, L].

    input_ids [B, T] with attention_mask (any padding: only real tokens run). One forward pass
    per batch: the continuations' prefixes (a trie, shared tokens once) run after each row's
    input in the same pass, each trie token attending to the prompt, the row's real input and
    its own ancestors only; rows are packed into lanes, not padded (`pack_rows`, `packed_mask`;
    exact: each token sees what it would see run alone after its prompt). `rows` [B] picks each
    row's prompt out of kv's N. The LM head runs only at each row's last input token and trie.
    `prompts` (the whole prompts, [P+S, H] or [N, P+S, H]) fill the rows' suffix placeholders.
    A model that cannot run packed rows (`packed_problem`) is refused: use `engine.full_label_scores`.
    """
    _require_packed(model)
    B = input_ids.shape[0]
    device = input_ids.device
    tokens, parents, depths, reads = _continuation_trie(continuations)
    K = len(tokens)
    P = kv[0][0].shape[2]
    prompt_of = [0] * B if rows is None else [int(r) for r in rows.tolist()]
    real = attention_mask.bool()
    n_in = real.sum(-1).tolist()
    # Each row (its real input, then the trie) packed into lanes; a lane's cached past holds
    # the prompts of its rows, each row seeing its own (one pass, little padding, large matrix
    # products, several adapters per lane).
    lanes, places = pack_rows([n + K for n in n_in])
    slots: list[list[int]] = [[] for _ in range(lanes)]
    for b, (lane, _) in enumerate(places):
        if prompt_of[b] not in slots[lane]:
            slots[lane].append(prompt_of[b])
    M = max(len(x) for x in slots)
    gidx = torch.tensor([x + [x[0]] * (M - len(x)) for x in slots], device=device)
    width = max(off + n + K for (_, off), n in zip(places, n_in, strict=True))
    ids = input_ids.new_zeros(lanes, width)
    seg = torch.full((lanes, width), -1, dtype=torch.long, device=device)
    index = torch.full_like(seg, -1)
    node = torch.full_like(seg, -1)
    pos = torch.zeros_like(seg)
    slot = torch.zeros_like(seg)
    which = torch.zeros_like(seg)  # each position's prompt (for suffix placeholders)
    at = torch.zeros(B, 1 + K, dtype=torch.long, device=device)  # flat places the LM head reads
    trie_ids = torch.tensor(tokens, dtype=input_ids.dtype, device=device)
    trie_pos = torch.tensor(depths, dtype=torch.long, device=device)
    for b, (lane, off) in enumerate(places):
        n = n_in[b]
        ids[lane, off : off + n] = input_ids[b][real[b]]
        ids[lane, off + n : off + n + K] = trie_ids
        seg[lane, off : off + n + K] = b
        index[lane, off : off + n] = torch.arange(n, device=device)
        node[lane, off + n : off + n + K] = torch.arange(K, device=device)
        pos[lane, off : off + n] = torch.arange(P, P + n, device=device)
        pos[lane, off + n : off + n + K] = P + n - 1 + trie_pos
        slot[lane, off : off + n + K] = slots[lane].index(prompt_of[b])
        which[lane, off : off + n + K] = prompt_of[b]
        at[b] = lane * width + off + n - 1 + torch.arange(1 + K, device=device)
    anc = torch.zeros(K, K, dtype=torch.bool, device=device)
    for k in range(K):
        a = k
        while a >= 0:
            anc[k, a] = True
            a = parents[a]
    past = (slot[:, :, None] == torch.arange(M, device=device)).repeat_interleave(P, -1)
    dtype = model.get_input_embeddings().weight.dtype
    hidden = run_packed(
        model,
        _ids_or_embeds(model, ids, prompts, which),
        packed_mask(seg, index, past, dtype, node, anc),
        pos,
        _cache_from(kv, gidx),
        torch.arange(P, device=device).repeat(M),
    )
    # [B*(1+K), H]: each row's last input position, then its trie nodes (2D and contiguous: a
    # strided 3D input sends the LM head to a batched matmul over a broadcast weight, 10x slower)
    hidden = hidden.reshape(lanes * width, -1)[at.view(-1)]
    logp = torch.log_softmax(model.get_output_embeddings()(hidden).float(), -1).view(B, 1 + K, -1)
    C = max(len(r) for r in reads)
    L = len(reads)
    col = torch.zeros(L, C, dtype=torch.long, device=device)
    tok = torch.zeros(L, C, dtype=torch.long, device=device)
    on = torch.zeros(L, C, dtype=logp.dtype, device=device)
    for i, r in enumerate(reads):
        for j, (nd, t) in enumerate(r):
            col[i, j], tok[i, j], on[i, j] = nd + 1, t, 1.0
    picked = logp[:, col.view(-1), tok.view(-1)].view(B, L, C)  # [B, L, C]
    return (picked * on).sum(-1)


def decode_steps(
    model,
    kv: KV,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    rows: Tensor | None = None,
    prompts: Tensor | None = None,
) -> Generator[Tensor, Tensor, None]:
    """Step-wise decoding after prompt + input (left-padded [B, T]), reusing the KV cache.

    Yields the next token's logits [B, V] (float32); send back the tokens chosen [B] to get the
    next step's. Stop by closing it. `rows` and `prompts` as in `run_after_prefix`.
    """
    B = input_ids.shape[0]
    P = kv[0][0].shape[2]
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    with torch.no_grad():
        hidden, cache = run_after_prefix(
            model, kv, input_ids, attention_mask, rows, use_cache=True, prompts=prompts
        )
    mask = torch.cat([attention_mask.new_ones(B, P), attention_mask], 1)
    while True:
        with torch.no_grad():
            logits = head(hidden[:, -1]).float()
        nxt = yield logits
        with torch.no_grad():
            pos = mask.sum(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            out = decoder(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{_cache_kw(decoder): cache},
            )
        hidden, cache = out.last_hidden_state, _out_cache(out)


@torch.no_grad()
def decode_next(model, kv: KV, mask: Tensor, tokens: Tensor) -> tuple[Tensor, KV, Tensor]:
    """One token more for each row: tokens [B] after keys/values kv [B, heads, L, d] whose
    valid positions are mask [B, L] (padding anywhere; each row's position is its count of
    valid ones). Returns (the next token's logits [B, V] float32, kv [B, heads, L+1, d], mask
    [B, L+1])."""
    decoder = model.get_decoder()
    pos = mask.sum(-1, keepdim=True)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    out = decoder(
        input_ids=tokens[:, None],
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **{_cache_kw(decoder): _cache_from(kv, mask.shape[0])},
    )
    logits = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
    return logits, tuple((layer.keys, layer.values) for layer in _out_cache(out).layers), mask


@torch.no_grad()
def generate(
    model,
    kv: KV,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    rows: Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    prompts: Tensor | None = None,
) -> list[list[int]]:
    """Decode after prompt + input (left-padded [B, T]), reusing the KV cache every step
    (`decode_steps`).

    temperature 0 is greedy. Returns each row's new tokens, up to and excluding eos.
    `prompts` fill the inputs' suffix placeholders (see `run_after_prefix`).
    """
    B = input_ids.shape[0]
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens < 1:
        return out_tokens
    steps = decode_steps(model, kv, input_ids, attention_mask, rows=rows, prompts=prompts)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    logits = next(steps)
    for step in range(max_new_tokens):
        nxt = choose_tokens(logits, temperature, top_p, generator)
        for b in range(B):
            if not done[b]:
                if eos_token_id is not None and int(nxt[b]) == eos_token_id:
                    done[b] = True
                else:
                    out_tokens[b].append(int(nxt[b]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = steps.send(nxt)
    steps.close()
    return out_tokens


def choose_tokens(logits: Tensor, temperature: float, top_p: float, generator=None) -> Tensor:
    """Next token per row from logits [B, V]: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

"""Spreading a frozen model over processes and memory: FSDP2 sharding of its weights
(`shard_model`, `gather_root`) and the gradient checkpointing switch."""

from __future__ import annotations

import torch

from ..errors import SoftpromptError
from .load import decoder_layers


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

"""Tiny random configs of common causal LM families (docs/models.md's family table is tested on
these). `family_model(name, vocab)` builds one; sizes are keywords so `bench/families.py` can
build larger ones of the same shape."""

from __future__ import annotations

import torch

FAMILIES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt_neox",
    "opt",
    "gpt2",
    "falcon",
    "olmo2",
    "granite",
    "smollm3",
    "bloom",
    "falcon_alibi",
)
"""Every family in the table; `falcon_alibi` (Falcon with ALiBi) is the one that cannot run
packed rows and runs on the padded path."""


def family_config(name: str, vocab: int, *, hidden: int = 32, layers: int = 2, heads: int = 4):
    """A random-init config of family `name` (ids 0 for bos/eos/pad, inside any vocab)."""
    import transformers as T

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    kv = max(heads // 2, 1)
    llama_like = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        **ids,
    }
    head_dim = {"head_dim": hidden // heads}
    if name == "llama":
        return T.LlamaConfig(**llama_like)
    if name == "qwen2":
        return T.Qwen2Config(**llama_like)
    if name == "qwen3":
        return T.Qwen3Config(**llama_like, **head_dim)
    if name == "mistral":
        return T.MistralConfig(**llama_like)
    if name == "gemma2":
        return T.Gemma2Config(**llama_like, **head_dim)
    if name == "gemma3":
        return T.Gemma3TextConfig(**llama_like, **head_dim)
    if name == "phi3":
        return T.Phi3Config(**llama_like)
    if name == "olmo2":
        return T.Olmo2Config(**llama_like)
    if name == "granite":
        return T.GraniteConfig(**llama_like)
    if name == "smollm3":
        return T.SmolLM3Config(**llama_like)
    if name == "gpt_neox":
        return T.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=512,
            **ids,
        )
    if name == "opt":
        return T.OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=512,
            word_embed_proj_dim=hidden,
            **ids,
        )
    if name == "gpt2":
        return T.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **ids
        )
    if name in ("falcon", "falcon_alibi"):
        alibi = name == "falcon_alibi"
        return T.FalconConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_kv_heads=kv,
            new_decoder_architecture=not alibi,
            alibi=alibi,
            **ids,
        )
    if name == "bloom":
        return T.BloomConfig(
            vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads, **ids
        )
    raise ValueError(f"unknown family {name!r}")


def family_model(name: str, vocab: int, seed: int = 0, **size):
    """A frozen, eval-mode random model of family `name`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, vocab, **size))
    model.requires_grad_(False)
    return model.eval()

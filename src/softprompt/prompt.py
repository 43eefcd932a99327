"""Soft-prompt parameters and their initialisations. (Combining a prompt with the input is
the job of `forward`.)"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .config import INIT_METHODS, REPARAM_METHODS
from .errors import SoftpromptError
from .readouts.head import ClassifierHead


def task_init_text(
    label_names: Sequence[str], generation: tuple[str, str] | None = None, multilabel: bool = False
) -> str:
    """The default `--init-text`, built from the task's own labels so that no task starts from
    another's instruction: "Classify the text as complaint or no complaint:"; for a generation
    task (`generation`: its input and target columns) "Given the mr, write the ref:"; for a
    multilabel task "Tag the text with any of billing, delivery and praise:"."""
    if generation is not None:
        return f"Given the {generation[0]}, write the {generation[1]}:"
    names = [str(n) for n in label_names]
    if not names:
        return "Classify the text:"
    if multilabel:
        said = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"Tag the text with any of {said}:"
    said = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return f"Classify the text as {said}:"


PEFT_INIT_NAMES = {"text": "TEXT", "vocab": "SAMPLE_VOCAB", "random": "RANDOM", "labels": "RANDOM"}
"""How each init is named in PEFT's adapter_config.json (PEFT has no label init)."""


def text_token_ids(tokenizer, text: str, num_virtual_tokens: int) -> list[int]:
    """The init text's token ids cut or repeated to num_virtual_tokens, exactly as PEFT does."""
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise SoftpromptError(
            "--init-text is empty after tokenisation; give some words or use --init random"
        )
    reps = math.ceil(num_virtual_tokens / len(ids))
    return (ids * reps)[:num_virtual_tokens]


@torch.no_grad()
def init_prompt(
    model,
    tokenizer,
    num_virtual_tokens: int,
    method: str = "text",
    *,
    text: str | None = None,
    label_names: Sequence[str] = (),
    seed: int = 0,
) -> Tensor:
    """A new prompt [P, H] in float32 (whatever the base model's dtype). `text` (for the text
    init) defaults to `task_init_text(label_names)`."""
    if num_virtual_tokens < 1:
        raise SoftpromptError(f"--num-virtual-tokens must be at least 1, got {num_virtual_tokens}")
    emb = model.get_input_embeddings().weight.detach()
    V, H = emb.shape
    gen = torch.Generator().manual_seed(seed)
    if method == "text":
        text = text if text is not None else task_init_text(label_names)
        ids = torch.tensor(text_token_ids(tokenizer, text, num_virtual_tokens))
        return emb[ids.to(emb.device)].float().clone()
    if method == "vocab":
        ids = torch.randint(0, V, (num_virtual_tokens,), generator=gen)
        return emb[ids.to(emb.device)].float().clone()
    if method == "labels":
        if not label_names:
            raise SoftpromptError(
                "--init labels needs the class labels; none were found in the data"
            )
        rows = []
        for name in label_names[:num_virtual_tokens]:
            ids = tokenizer(name, add_special_tokens=False)["input_ids"]
            rows.append(emb[torch.tensor(ids, device=emb.device)].float().mean(0))
        # Lester et al.: fill the rest with embeddings of common tokens (low BPE ids ~ frequent).
        rest = num_virtual_tokens - len(rows)
        if rest:
            ids = torch.randint(0, min(V, 5000), (rest,), generator=gen)
            rows.extend(emb[ids.to(emb.device)].float())
        return torch.stack(rows).clone()
    if method == "random":
        std = emb.float().std().item()
        return (torch.randn(num_virtual_tokens, H, generator=gen) * std).to(emb.device)
    raise SoftpromptError(f"--init {method!r} is not one of {', '.join(INIT_METHODS)}")


@torch.no_grad()
def init_prefix(
    model,
    tokenizer,
    num_virtual_tokens: int,
    method: str = "text",
    *,
    text: str | None = None,
    label_names: Sequence[str] = (),
    seed: int = 0,
    start: Tensor | None = None,
) -> Tensor:
    """A new deep prompt [P, layers*2*heads*d] in float32: the real keys/values, in every layer,
    of a prompt from `init_prompt` (the init text, labels, vocabulary or random vectors run
    through the model), or of `start` [P, H], a trained prompt (`--init-from`)."""
    from .forward.kv import kv_to_prefix, prompt_kv

    if start is None:
        start = init_prompt(
            model,
            tokenizer,
            num_virtual_tokens,
            method,
            text=text,
            label_names=label_names,
            seed=seed,
        )
    return kv_to_prefix(prompt_kv(model, start))[0]


"""`--reparam` choices: none (train the embeddings directly) or mlp (P-tuning's encoder)."""


class PromptEncoder(torch.nn.Module):
    """What training optimises: the prompt embeddings E [P, H], optionally reparameterised as
    E + MLP(E) (a residual two-layer MLP, as P-tuning / residual prompt tuning do).

    `forward()` gives the prompt [P, H] that enters the model; that tensor is what gets saved,
    so the adapter stays a plain PEFT prompt whatever the encoder. The MLP's last layer starts
    at zero: the encoded prompt equals the init at step 0. `head`, a classification head
    (`--head`), trains with the prompt (its own learning rate: `param_groups`).
    """

    def __init__(
        self,
        init: Tensor,
        reparam: str = "none",
        hidden: int = 256,
        head: ClassifierHead | None = None,
    ):
        super().__init__()
        self.head = head
        if reparam not in REPARAM_METHODS:
            raise SoftpromptError(
                f"--reparam must be one of {', '.join(REPARAM_METHODS)} (got {reparam!r})"
            )
        self.embedding = torch.nn.Parameter(init.float().clone())
        self.mlp = None
        if reparam == "mlp":
            H = init.shape[-1]
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(H, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, H)
            ).to(init.device)
            torch.nn.init.zeros_(self.mlp[2].weight)
            torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self) -> Tensor:
        if self.mlp is None:
            return self.embedding
        return self.embedding + self.mlp(self.embedding)

    @torch.no_grad()
    def export(self) -> Tensor:
        """The prompt [P, H] as it enters the model, detached (what an adapter stores)."""
        return self().detach().clone()

    def export_head(self) -> ClassifierHead | None:
        """A detached copy of the classification head (None without one)."""
        return None if self.head is None else self.head.copy()

    def param_groups(self, lr: float, head_lr: float) -> list[dict]:
        """AdamW parameter groups: the prompt (and its encoder) at `lr`, the head at `head_lr`."""
        head = set(id(p) for p in self.head.parameters()) if self.head is not None else set()
        groups = [{"params": [p for p in self.parameters() if id(p) not in head], "lr": lr}]
        if self.head is not None:
            groups.append({"params": list(self.head.parameters()), "lr": head_lr})
        return groups

"""What "the same answer" means in each base-model dtype, for tests that compare two doors or two
training set-ups run in the type `--dtype auto` resolves to (conftest.py `auto_dtype`).

Parity of algorithms (fast path against PEFT and the reference forward) is not here: those
tests pin float32 and keep 1e-5.

bfloat16 keeps 8 bits of mantissa. Two doors that run a text in batches of the same make-up give
bit-identical probabilities in either type (measured: `softprompt predict` / the API against one
`/v1/classify` request, 0.0 in all 20 seeds below). A batch of another make-up (rows of several
adapters mixed, concurrent requests sharing a batch) packs the row into a lane of another width
and composition; the float32 sums inside then differ in their last bits, and in bfloat16 such a
difference moves a rounding by one step (2^-8 relative) often enough to show. That difference
is inherent to bfloat16: it is bounded, not removed. Measured with
`python bench/bf16_bounds.py doors --seeds 20` (docs/models.md, "Precision").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DOOR_PROB_FLOAT32 = 1e-5
"""Label probabilities, door against door, float32: largest difference seen 9.8e-7 (a server
batch mixing 4 adapter kinds against the API; 20 seeds x tiny Llama and GPT-2)."""

DOOR_PROB_BFLOAT16 = 1e-3
"""Label probabilities, door against door, bfloat16: largest difference seen 2.6e-4 (the same
mixed batch, 20 seeds x tiny Llama and GPT-2 x plain / suffix / calibrated / ensemble / deep
prompt; every family of tests/families.py: 0.0 between predict and one request), so 3.8x
margin. A label can only differ between doors where its two probabilities are closer than
twice this: on the tests' models (seed 0) they are at least 0.033 apart in tests/test_doors.py
and 0.0038 (tiny GPT-NeoX) in tests/test_families.py."""


def door_tolerance(dtype: torch.dtype) -> float:
    """The largest difference allowed between two doors' label probabilities in `dtype`."""
    return DOOR_PROB_FLOAT32 if dtype == torch.float32 else DOOR_PROB_BFLOAT16


@dataclass(frozen=True)
class TrainBounds:
    """Two training set-ups that compute the same thing (one process or two, checkpointed layers
    or not), compared after the test's epochs."""

    prompt: float | None
    """Largest |difference| of the saved prompts' entries; None: not compared entry by entry."""
    loss: float
    """Largest |difference| of an epoch's train or eval loss."""
    eval_rows: int
    """How many evaluation rows may change their label (eval accuracy x rows)."""
    head: float = 1e-5
    """Largest |difference| of a classification head's saved numbers (`--head`)."""


TRAIN_FLOAT32 = TrainBounds(prompt=1e-5, loss=1e-5, eval_rows=0)
"""float32: the same prompt and metrics up to float rounding (what the tests always asked)."""

TRAIN_BFLOAT16 = TrainBounds(prompt=0.06, loss=3e-4, eval_rows=1)
"""bfloat16: the two set-ups round differently (2 processes: each runs half of the batch, in
lanes of another make-up; FSDP and checkpointed layers: the concatenated forward instead of the
shared-prefix one), and AdamW turns a changed rounding of a near-zero gradient entry into a
whole step of that entry (lr 0.03 here). `python bench/bf16_bounds.py train --seeds 5`
(seeds 42, 1-4; tiny Llama, the tests' settings, 2 epochs; checkpointing 1 epoch), 15 pairs:
prompt entries at most 2.2e-2 apart (2.1% of the distance the prompt moved; most pairs ~1e-3),
losses at most 6.7e-5, at most 1 evaluation row labelled differently (6 of 15 pairs). Bounds:
prompt 0.06 (2.7x), losses 3e-4 (4.5x), 1 row."""


TRAIN_BFLOAT16_HEAD = TrainBounds(prompt=None, loss=1e-2, eval_rows=2, head=1e-2)
"""bfloat16 with a classification head (`--head linear` or `pooled`): the loss flows through the
head, and on the tests' tiny random models the prompt's gradient is nearly flat, so AdamW turns
rounding into whole steps of many prompt entries: `python bench/bf16_bounds.py train --seeds 5
--heads linear,pooled` (the same 15 pairs per head), prompt entries up to 0.42 apart where the
prompt moved 0.19-0.38 from its init (entry by entry the prompt is not a contract here), while
what the prompt and head compute agrees: losses at most 3.7e-3, head entries at most 3.1e-3
apart (|entries| up to 0.31; the pooled head's feature scaling, fitted before training, at most
5e-8), at most 1 evaluation row labelled differently (1 pair of 30). Bounds: losses 1e-2
(2.7x), head 1e-2 (3.2x), 2 rows."""


def train_bounds(
    dtype: torch.dtype, float32_prompt: float | None = None, head: bool = False
) -> TrainBounds:
    """The bounds for training set-ups compared in `dtype`; `float32_prompt` overrides the
    float32 prompt bound where a test always allowed more; `head`: the runs train a
    classification head (in float32 the same bounds, the head's within 1e-5)."""
    if dtype != torch.float32:
        return TRAIN_BFLOAT16_HEAD if head else TRAIN_BFLOAT16
    if float32_prompt is None:
        return TRAIN_FLOAT32
    return TrainBounds(float32_prompt, TRAIN_FLOAT32.loss, TRAIN_FLOAT32.eval_rows)

"""Training speed per model family and method: softprompt's loss step against PEFT's.

For each family (tests/families.py, at a small size: random weights, so only speed means
anything here; or `default`, the built-in SmolLM2-135M-Instruct), one epoch over the project's
demo tweets in batches of 8 is timed three ways: softprompt's loss on the path it picks for the
model (packed, or padded where the family cannot run packed rows), the same loss forced onto
the padded path, and PEFT's forward with labels (`PromptTuningConfig`, or `PrefixTuningConfig`
with `--method prefix`). Each step is loss, backward and an AdamW step on the prompt. The
table prints seconds per epoch (median of the timed epochs) and PEFT / softprompt.

    python bench/families.py                      # bloom llama falcon_alibi, hidden 256, 4 layers
    python bench/families.py --families bloom --hidden 512 --layers 8 --epochs 3
    python bench/families.py --families default --method prefix --tokens 8
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from common import TEXT_COLUMN, tweet_task  # noqa: E402

from conftest import DEMO, make_tokenizer  # noqa: E402
from families import FAMILIES, family_model  # noqa: E402
from softprompt.data import collate_train, encode_rows  # noqa: E402
from softprompt.forward.layout import packed_problem  # noqa: E402
from softprompt.modeling.load import load_base  # noqa: E402
from softprompt.prompt import init_prefix  # noqa: E402
from softprompt.readouts.words import label_loss  # noqa: E402


def _batches(tok, batch_size: int) -> list[dict]:
    with open(DEMO / "complaints_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    texts, labels = [r[TEXT_COLUMN] for r in rows], [r["Label"] for r in rows]
    enc = encode_rows(tok, tweet_task(), texts, labels)
    return [
        collate_train(enc[s : s + batch_size], tok.pad_token_id)
        for s in range(0, len(enc), batch_size)
    ]


def _epoch_seconds(step, params, batches, epochs: int) -> float:
    """Median seconds per epoch of `step(batch)` + backward + AdamW, after a warm-up batch."""
    opt = torch.optim.AdamW(params, lr=1e-3)

    def run(batch):
        opt.zero_grad(set_to_none=True)
        step(batch).backward()
        opt.step()

    run(batches[0])
    times = []
    for _ in range(epochs):
        t = time.perf_counter()
        for b in batches:
            run(b)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_family(name: str, tok, batches, *, P: int, epochs: int, method: str, **size) -> dict:
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    if name == "default":
        model, tok, _ = load_base(None)
        batches = _batches(tok, len(batches[0]["input_ids"]))
    else:
        model = family_model(name, len(tok), **size)
    if method == "prefix":
        start = init_prefix(model, tok, P, "vocab")
        loss, fast, slow = (
            label_loss,
            {"kind": "prefix"},
            {"kind": "prefix", "shared_prefix": False},
        )
        conf = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P)
    else:
        start = torch.randn(P, model.config.hidden_size) * 0.02
        loss, fast, slow = label_loss, {}, {"shared_prefix": False}
        conf = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P)
    times = {}
    for how, kw in (("softprompt_s", fast), ("padded_s", slow)):
        x = start.clone().requires_grad_(True)
        times[how] = _epoch_seconds(lambda b, x=x, kw=kw: loss(model, x, **b, **kw), [x], batches, epochs)  # fmt: skip
    pm = get_peft_model(copy.deepcopy(model), conf)
    weight = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(start)
    times["peft_s"] = _epoch_seconds(lambda b: pm(**b).loss, [weight], batches, epochs)
    return {"family": name, "path": "padded" if packed_problem(model) else "packed", **times}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["bloom", "llama", "falcon_alibi"], choices=[*FAMILIES, "default"])  # fmt: skip
    ap.add_argument("--method", choices=["prompt", "prefix"], default="prompt")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8, help="virtual tokens P")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs (median reported)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = make_tokenizer()
    batches = _batches(tok, args.batch_size)
    size = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads}
    print(
        f"--method {args.method}; hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"(random families), P={args.tokens}, "
        f"{len(batches)} batches of {args.batch_size}, {torch.get_num_threads()} threads"
    )
    print("| family | path | softprompt s/epoch | padded path s/epoch | PEFT s/epoch | PEFT / softprompt |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in args.families:
        r = bench_family(name, tok, batches, P=args.tokens, epochs=args.epochs, method=args.method, **size)  # fmt: skip
        print(
            f"| {r['family']} | {r['path']} | {r['softprompt_s']:.2f} | {r['padded_s']:.2f} | "
            f"{r['peft_s']:.2f} | {r['peft_s'] / r['softprompt_s']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()

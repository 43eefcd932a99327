"""Serving cost of deep-prompt (prefix) adapters against prompt-tuning adapters, in process.

`softprompt serve` batches rows of many adapters through one `Engine`; this times the engine
itself on the same batches for both kinds, with no HTTP or client noise, so the two can be
compared within a few percent. Each round scores the same `--batches` batches of `--batch-size`
demo tweets (adapter chosen at random per row, as in bench/serve.py) once with 16 prompt adapters
and once with 16 prefix adapters, alternating which kind goes first. The adapters are those of
bench/serve.py (`make_adapters`: untrained, the serving cost is the same); every adapter's KV is
cached after a warm-up, as in a running server. By hand, on an otherwise idle machine:

    python bench/serve_methods.py --threads 1
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from serve import DEMO, adapter_paths, make_adapters  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--num-virtual-tokens", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20, help="batches per kind per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from softprompt.adapters import load_adapter
    from softprompt.engine import ClassifyRow, Engine
    from softprompt.modeling.load import load_base

    torch.set_num_threads(args.threads)
    model, tok, _ = load_base(None)
    engine = Engine(model, tok)
    with open(DEMO, newline="") as f:
        texts = [row["Tweet text"] for row in csv.DictReader(f)]
    kinds = {}
    for method in ("prompt", "prefix"):
        suffix = "" if method == "prompt" else "_prefix"
        folder = ROOT / "bench" / "results" / f"serve_adapters{suffix}"
        names = make_adapters(folder, args.adapters, args.num_virtual_tokens, 0, method)
        paths = adapter_paths(folder, names)
        kinds[method] = [engine.predictor([load_adapter(x)]) for x in paths]

    rng = random.Random(args.seed)
    plan = [
        [(rng.randrange(args.adapters), rng.choice(texts)) for _ in range(args.batch_size)]
        for _ in range(args.batches)
    ]

    def batches(method: str) -> list[list[ClassifyRow]]:
        preds = kinds[method]
        return [[ClassifyRow(preds[a], engine.encode(preds[a], t)[0]) for a, t in b] for b in plan]

    work = {m: batches(m) for m in kinds}
    with torch.inference_mode():
        for m in kinds:  # warm-up: every adapter's KV into the cache
            for b in work[m][:3]:
                engine.label_probabilities(b)
        seconds: dict[str, list[float]] = {m: [] for m in kinds}
        for r in range(args.rounds):
            order = list(kinds) if r % 2 == 0 else list(reversed(list(kinds)))
            for m in order:
                t = time.perf_counter()
                for b in work[m]:
                    engine.label_probabilities(b)
                seconds[m].append(time.perf_counter() - t)
    rows = args.batches * args.batch_size
    print(
        f"{args.adapters} adapters x {args.num_virtual_tokens} virtual tokens, {args.batches} "
        f"batches of {args.batch_size} rows per round, {args.rounds} rounds, "
        f"{args.threads} thread(s)"
    )
    rate = {m: [rows / s for s in seconds[m]] for m in kinds}
    for m in kinds:
        per = " / ".join(f"{x:.1f}" for x in rate[m])
        print(f"{m}: rows/s per round {per}; mean {statistics.mean(rate[m]):.1f}")
    ratio = statistics.mean(rate["prefix"]) / statistics.mean(rate["prompt"])
    print(f"prefix / prompt throughput: {ratio:.3f}x")


if __name__ == "__main__":
    main()

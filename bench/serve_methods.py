"""Serving cost of each kind of adapter against prompt-tuning adapters read through their label
words, in process: deep prompts (prefix), and prompts with a classification head (linear,
pooled).

`softprompt serve` batches rows of many adapters through one `Engine`; this times the engine
itself on the same batches for every kind, with no HTTP or client noise, so they can be
compared within a few percent. Each round scores the same `--batches` batches of `--batch-size`
demo tweets (adapter chosen at random per row, as in bench/serve.py) once per kind, 16 adapters
of that kind, the order of the kinds rotating from round to round. The adapters are those of
bench/serve.py (`make_adapters`: untrained, the serving cost is the same; the heads are the
label words' rows (linear) and a probe on random features (pooled)); every adapter's KV is
cached after a warm-up, as in a running server. By hand, on an otherwise idle machine:

    python bench/serve_methods.py --threads 1 --kinds words,prefix,linear,pooled
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
    p.add_argument("--kinds", default="words,prefix", help="words, prefix, linear, pooled")
    args = p.parse_args()

    from dataclasses import replace

    import torch

    from softprompt.adapters import load_adapter
    from softprompt.engine import Engine
    from softprompt.modeling.load import load_base
    from softprompt.predictors import ClassifyRow
    from softprompt.readouts.head import fit_pooled_head, label_word_head, pooled_layers

    torch.set_num_threads(args.threads)
    model, tok, _ = load_base(None)
    engine = Engine(model, tok)
    with open(DEMO, newline="") as f:
        texts = [row["Tweet text"] for row in csv.DictReader(f)]
    wanted = args.kinds.split(",")
    kinds = {}
    for kind in ["words", *[k for k in wanted if k != "words"]]:
        method = "prefix" if kind == "prefix" else "prompt"
        suffix = "" if method == "prompt" else "_prefix"
        folder = ROOT / "bench" / "results" / f"serve_adapters{suffix}"
        names = make_adapters(folder, args.adapters, args.num_virtual_tokens, 0, method)
        adapters = [load_adapter(x) for x in adapter_paths(folder, names)]
        if kind == "linear":
            head = label_word_head(model, tok, adapters[0].task.label_names)
            adapters = [replace(a, head=head) for a in adapters]
        elif kind == "pooled":
            g = torch.Generator().manual_seed(args.seed)
            x = torch.randn(20, model.config.hidden_size, generator=g)
            layers = pooled_layers(model)
            head = fit_pooled_head({i: x for i in layers}, [i % 2 for i in range(20)], 2, layers)
            adapters = [replace(a, head=head) for a in adapters]
        kinds[kind] = [engine.predictor([a]) for a in adapters]

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
            shift = r % len(kinds)
            order = list(kinds)[shift:] + list(kinds)[:shift]
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
    for m in kinds:
        if m != "words":
            ratio = statistics.mean(rate[m]) / statistics.mean(rate["words"])
            print(f"{m} / words throughput: {ratio:.3f}x")


if __name__ == "__main__":
    main()

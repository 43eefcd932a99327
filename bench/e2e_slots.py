"""How much of each E2E input the generated texts carry: the share of the inputs' `name`, `near`,
`food` and `area` values that appear word for word (case-insensitive) in the output, per method,
seed and decoding, from the `*_outputs.jsonl` files `bench/generation.py` writes (or the rows
`softprompt eval --outputs X.jsonl` writes, one run a file).

    python bench/e2e_slots.py bench/results/e2e_gemma_prefix_outputs.jsonl \
        bench/results/e2e_anchors_outputs.jsonl bench/results/e2e_prefix_outputs.jsonl

A value written another way ("city center" for `area[city centre]`) counts as missing, the
same for every model, so the figure compares outputs; it is not a semantic error rate.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from common import markdown_table

SLOTS = ("name", "near", "food", "area")
ATTRIBUTE = re.compile(r"(\w+)\[([^\]]*)\]")


def values(mr: str) -> list[str]:
    """The checked slots' values of one E2E meaning representation, lowercased."""
    return [v.lower() for k, v in ATTRIBUTE.findall(mr) if k in SLOTS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "outputs", nargs="+", type=Path, help="generation.py's *_outputs.jsonl or eval's --outputs"
    )
    args = ap.parse_args()
    counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])  # inputs, values, found
    for path in args.outputs:
        if not path.is_file():
            raise SystemExit(
                f"{path}: no such file (bench/generation.py --out X.json writes X_outputs.jsonl)"
            )
        for line in path.read_text().splitlines():
            row = json.loads(line)
            # `softprompt eval --outputs` rows carry text/output/references and no run names
            key = (path.name, *(row.get(k, "-") for k in ("method", "seed", "decoding")))
            mr = row["input"] if "input" in row else row["text"]
            found = [v in row["output"].lower() for v in values(mr)]
            c = counts[key]
            c[0], c[1], c[2] = c[0] + 1, c[1] + len(found), c[2] + sum(found)
    rows = [
        [*key, n, total, f"{100 * hit / total:.1f}%" if total else "-"]
        for key, (n, total, hit) in sorted(counts.items(), key=lambda kv: str(kv[0]))
    ]
    head = ["file", "method", "seed", "decoding", "inputs", "values", "found word for word"]
    print(markdown_table(head, rows))


if __name__ == "__main__":
    main()

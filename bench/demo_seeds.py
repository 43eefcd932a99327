"""The README's main job over seeds and float roundings: how much its outcome depends on the
seed and on the machine.

Machines round differently: torch picks its kernels by the CPU's instruction set (AVX2, AVX-512,
...), so the same seed trains a different prompt. `--roundings` runs each seed under each of
them: `native` is this machine's choice, `default` forces torch's plain (non-vectorised)
kernels through ATEN_CPU_CAPABILITY (any value torch accepts there may be given). Thread counts
are not enough: on one AVX2 machine 1 and 2 threads gave bit-identical losses and gradients.

For each (rounding, seed): `softprompt train` with the demo's training flags (one prompt and head) on
the demo tweets, then `predict` the held-out demo tweets and the two example tweets. Prints one
JSON line per run, then mean ± std of macro-F1 per rounding and over all runs, and in how many
runs both examples were labelled right; then the same for the ensembles `train --seeds K --seed
s` makes (seeds s .. s+K-1, consecutive in `--seeds`), from the members' probabilities (an
ensemble's are their mean). By hand (2-4 minutes a run on one core):

    . .venv/bin/activate
    python bench/demo_seeds.py --seeds 1 2 3 4 5 --roundings native default --ensemble 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "softprompt" / "demo"
DEMO_FLAGS = ["--epochs", "5"]
"""scripts/demo.sh's training flags beside the data and columns (the rest are the defaults)."""
LABELS = ["complaint", "no complaint"]
EXAMPLES = {
    "@ZephyrMobile third day without signal and your chat keeps disconnecting me": "complaint",
    "@NorthRailUK thanks, the new timetable looks great": "no complaint",
}


def cli(args: list[str], rounding: str, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if rounding != "native":
        env["ATEN_CPU_CAPABILITY"] = rounding
    cmd = [sys.executable, "-m", "softprompt.cli", *args, "--no-progress"]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout


def test_table() -> tuple[list[str], list[str]]:
    with open(DEMO / "complaints_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["Tweet text"] for r in rows], [r["Label"] for r in rows]


def scored(p_test: list[float], p_examples: list[float]) -> dict:
    """macro-F1 and accuracy of P(complaint) on the demo test set; the examples' verdict."""
    from softprompt.metrics import metrics

    def label(p: float) -> str:
        return LABELS[0] if p > 0.5 else LABELS[1]

    _, gold = test_table()
    m = metrics(gold, [label(p) for p in p_test], LABELS)
    right = [label(p) for p in p_examples] == list(EXAMPLES.values())
    return {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4),
            "examples_right": right}  # fmt: skip


def one_run(seed: int, rounding: str, threads: int, folder: Path, flags: list[str]) -> dict:
    out = folder / f"{rounding}-s{seed}"
    t0 = time.perf_counter()
    cli(["train", "--data", str(DEMO / "complaints_train.csv"), "--text-column", "Tweet text",
         "--label-column", "Label", "--out", str(out), "--overwrite", "--seed", str(seed), *flags],
        rounding, threads)  # fmt: skip
    train_s = time.perf_counter() - t0
    texts, _ = test_table()
    lines = cli(["predict", str(out), *texts, *EXAMPLES], rounding, threads).splitlines()
    p = [json.loads(x)["p(complaint)"] for x in lines]
    p_test, p_examples = p[: len(texts)], p[len(texts) :]
    return {
        "seed": seed,
        "rounding": rounding,
        "threads": threads,
        **scored(p_test, p_examples),
        "p_examples": [round(x, 3) for x in p_examples],
        "train_s": round(train_s, 1),
        "p_test": p_test,
    }


def ensembles(runs: list[dict], seeds: list[int], k: int) -> list[dict]:
    """The ensembles of k consecutive seeds (as `--seeds k` makes them), per rounding."""
    out = []
    for rounding in sorted({r["rounding"] for r in runs}):
        by_seed = {r["seed"]: r for r in runs if r["rounding"] == rounding}
        for i in range(len(seeds) - k + 1):
            members = [by_seed[s] for s in seeds[i : i + k] if s in by_seed]
            if len(members) < k:
                continue
            p_test = [statistics.mean(x) for x in zip(*(m["p_test"] for m in members), strict=True)]  # fmt: skip
            p_ex = [statistics.mean(x) for x in zip(*(m["p_examples"] for m in members), strict=True)]  # fmt: skip
            out.append({"seeds": seeds[i : i + k], "rounding": rounding, **scored(p_test, p_ex),
                        "p_examples": [round(x, 3) for x in p_ex]})  # fmt: skip
    return out


def summary(runs: list[dict], what: str) -> str:
    def stat(rs: list[dict]) -> str:
        f1 = [r["macro_f1"] for r in rs]
        sd = statistics.stdev(f1) if len(f1) > 1 else 0.0
        return f"{statistics.mean(f1):.3f} ± {sd:.3f} (min {min(f1):.3f}, max {max(f1):.3f}, n={len(f1)})"

    lines = [f"{what}, rounding {x}: macro-F1 {stat([r for r in runs if r['rounding'] == x])}"
             for x in sorted({r["rounding"] for r in runs})]  # fmt: skip
    lines.append(f"{what}, all: macro-F1 {stat(runs)}")
    right = sum(r["examples_right"] for r in runs)
    lines.append(f"{what}: both examples right in {right} of {len(runs)}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--roundings", nargs="+", default=["native", "default"],
                   help="native, or an ATEN_CPU_CAPABILITY value (default, avx2, avx512)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads per run [1]")
    p.add_argument("--ensemble", type=int, default=3, help="ensemble size K to report [3]")
    p.add_argument("--flags", default=" ".join(DEMO_FLAGS), help="training flags [demo.sh's]")
    p.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_seeds.jsonl")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as tmp:
        folder = args.keep or Path(tmp)
        for rounding in args.roundings:
            for seed in args.seeds:
                r = one_run(seed, rounding, args.threads, folder, args.flags.split())
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "p_test"}), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(r) + "\n")
    print(summary(runs, "one prompt"))
    if args.ensemble > 1:
        ens = ensembles(runs, args.seeds, args.ensemble)
        for e in ens:
            print(json.dumps(e))
        if ens:
            print(summary(ens, f"{args.ensemble}-seed ensemble"))


if __name__ == "__main__":
    main()

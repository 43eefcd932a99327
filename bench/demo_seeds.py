"""The README's main job over seeds and thread counts: how much its outcome depends on the seed
and on float rounding (1 thread and 2 threads round differently).

For each (threads, seed): `softprompt train` with the demo's flags on the demo tweets, `eval` on
the held-out demo tweets, `predict` the two example tweets. Prints one JSON line per run, then
mean ± std of macro-F1 per thread count and over all runs, and whether every run labelled both
examples right. By hand (about 8 minutes a run on one core):

    . .venv/bin/activate
    python bench/demo_seeds.py --seeds 1 2 3 4 5 42 --threads 1 2 --out bench/results/demo_seeds.jsonl
"""

from __future__ import annotations

import argparse
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
EXAMPLES = {
    "@ZephyrMobile third day without signal and your chat keeps disconnecting me": "complaint",
    "@NorthRailUK thanks, the new timetable looks great": "no complaint",
}


def cli(args: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "softprompt.cli", *args, "--no-progress"]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout


def one_run(seed: int, threads: int, folder: Path, flags: list[str]) -> dict:
    out = folder / f"t{threads}-s{seed}"
    t0 = time.perf_counter()
    cli(["train", "--data", str(DEMO / "complaints_train.csv"), "--text-column", "Tweet text",
         "--label-column", "Label", "--out", str(out), "--overwrite", "--seed", str(seed), *flags],
        threads)  # fmt: skip
    train_s = time.perf_counter() - t0
    m = json.loads(cli(["eval", str(out), "--data", str(DEMO / "complaints_test.csv")], threads))
    preds = [json.loads(x) for x in cli(["predict", str(out), *EXAMPLES], threads).splitlines()]
    return {
        "seed": seed,
        "threads": threads,
        "macro_f1": round(m["macro_f1"], 4),
        "accuracy": round(m["accuracy"], 4),
        "examples_right": all(p["label"] == EXAMPLES[p["text"]] for p in preds),
        "p_complaint": [round(p["p(complaint)"], 3) for p in preds],
        "train_s": round(train_s, 1),
    }


def summary(runs: list[dict]) -> str:
    def stat(rs: list[dict]) -> str:
        f1 = [r["macro_f1"] for r in rs]
        sd = statistics.stdev(f1) if len(f1) > 1 else 0.0
        return f"{statistics.mean(f1):.3f} ± {sd:.3f} (min {min(f1):.3f}, max {max(f1):.3f}, n={len(f1)})"

    lines = [f"threads {t}: macro-F1 {stat([r for r in runs if r['threads'] == t])}"
             for t in sorted({r["threads"] for r in runs})]  # fmt: skip
    lines.append(f"all runs: macro-F1 {stat(runs)}")
    lines.append(
        f"both examples right in {sum(r['examples_right'] for r in runs)} of {len(runs)} runs"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 42])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--flags", default=" ".join(DEMO_FLAGS), help="training flags [demo.sh's]")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_seeds.jsonl")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="demo-seeds-") as tmp:
        for threads in args.threads:
            for seed in args.seeds:
                r = one_run(seed, threads, Path(tmp), args.flags.split())
                runs.append(r)
                print(json.dumps(r), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(r) + "\n")
    print(summary(runs))


if __name__ == "__main__":
    main()

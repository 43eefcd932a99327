"""Accuracy grid: train several recipes over seeds with the library and score each on a dev file.

Run by hand (it trains one prompt per recipe and seed, then an ensemble of each recipe's seeds):

    python bench/accuracy_grid.py --data-dir ../shared/data/raft_twitter_complaints \
        --recipe "s32:suffix_tokens=32" --recipe "s64:suffix_tokens=64,epochs=20" \
        --seeds 42 1 2 --out bench/results/accuracy_grid.jsonl

Every recipe starts from the cross-validated one (`--balance --epochs 15 --eval-fraction 0`)
and changes the TrainConfig fields it names. Nothing is trained on the dev file; each result
line (JSON) is appended as soon as it is known, so an interrupted grid keeps what it finished.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt import SoftPrompt, TrainConfig, load_base, load_table, train  # noqa: E402
from softprompt.config import GUIDE_INIT_TEXT  # noqa: E402
from softprompt.metrics import metrics  # noqa: E402

# the base the grid's recipes change: the recommended recipe without suffix tokens, with the guide's
# init text (what docs/accuracy.md's grid measured around)
BASE = dict(
    head="none",
    balance=True,
    epochs=15,
    eval_fraction=0.0,
    suffix_tokens=0,
    init_text=GUIDE_INIT_TEXT,
    progress=False,
    overwrite=True,
)


def parse_recipe(spec: str) -> tuple[str, dict]:
    """'name:field=value,field=value' -> (name, {field: value}); values are Python literals."""
    name, _, body = spec.partition(":")
    fields = {}
    for part in filter(None, body.split(",")):
        key, _, value = part.partition("=")
        try:
            fields[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            fields[key.strip()] = value.strip()
    unknown = set(fields) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise SystemExit(f"--recipe {spec!r}: no TrainConfig field {sorted(unknown)}")
    return name, fields


def auc(scores: list[float], positive: list[bool]) -> float:
    """ROC AUC (scikit-learn's): how well `scores` rank positives first; nan with one class."""
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(positive, scores) if len(set(positive)) == 2 else float("nan")


def score(sp: SoftPrompt, texts, gold, batch_size: int) -> dict:
    rows = sp.classify(texts, batch_size=batch_size, calibrated=False)
    pred = [r["label"] for r in rows]
    first = sp.task.label_names[0]
    m = metrics(gold, pred, sp.task.label_names)
    return {
        "macro_f1": round(m["macro_f1"], 4),
        "accuracy": round(m["accuracy"], 4),
        "auc": round(auc([r["probabilities"][first] for r in rows], [g == first for g in gold]), 4),
        f"predicted_{first}": round(sum(p == first for p in pred) / len(pred), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with train.csv and dev.csv")
    ap.add_argument("--text-column", default="Tweet text")
    ap.add_argument("--label-column", default="Label")
    ap.add_argument("--recipe", action="append", required=True, help="name:field=value,...")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--device", default=None)
    ap.add_argument("--model", default=None, help="base model (default: the built-in one)")
    ap.add_argument("--dtype", default="auto", help="base model dtype (default: auto)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--dev-rows", type=int, default=0, help="score only the first N dev rows")
    ap.add_argument("--runs", default=None, help="folder for the run folders (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/accuracy_grid.jsonl")
    args = ap.parse_args()

    data = Path(args.data_dir)
    dev = load_table(str(data / "dev.csv"), args.text_column, args.label_column, flag="--data-dir")
    texts, gold = dev.texts, dev.labels
    if args.dev_rows:
        texts, gold = texts[: args.dev_rows], gold[: args.dev_rows]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_base(args.model, device=args.device, dtype=args.dtype)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="accuracy-grid-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    for spec in args.recipe:
        name, fields = parse_recipe(spec)
        folders, f1s = [], []
        for seed in args.seeds:
            folder = runs / f"{name}_{seed}"
            # "{runs}" and "{seed}" in a text value name this grid's folder and seed, e.g.
            # init_from='{runs}/prompt_{seed}' (a two-stage recipe: an earlier recipe's run)
            mine = {
                k: v.format(runs=runs, seed=seed) if isinstance(v, str) else v
                for k, v in fields.items()
            }
            cfg = TrainConfig(
                data=str(data / "train.csv"),
                text_column=args.text_column,
                label_column=args.label_column,
                out=str(folder),
                seed=seed,
                device=args.device,
                model=args.model,
                **{**BASE, **mine},
            )
            t0 = time.perf_counter()
            result = train(cfg, model, tokenizer)
            train_s = time.perf_counter() - t0
            sp = SoftPrompt.load(str(folder), model, tokenizer)
            r = score(sp, texts, gold, args.eval_batch_size)
            r.update(
                recipe=name,
                fields=fields,
                seed=seed,
                train_s=round(train_s, 1),
                train_loss=round(result.history[-1]["train_loss"], 4),
                dev_rows=len(texts),
            )
            emit(r)
            folders.append(str(folder))
            f1s.append(r["macro_f1"])
        summary = {"recipe": name, "fields": fields, "seeds": args.seeds}
        if len(f1s) > 1:
            summary.update(
                mean_macro_f1=round(statistics.mean(f1s), 4),
                std_macro_f1=round(statistics.stdev(f1s), 4),
            )
            ens = SoftPrompt.load(folders[0], model, tokenizer, ensemble=folders[1:])
            summary["ensemble"] = score(ens, texts, gold, args.eval_batch_size)
        emit(summary)


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 on GPUs, as on the CPU
    main()

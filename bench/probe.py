"""What a frozen model's features give without any prompt: the ceiling a trained readout works
under (docs/accuracy.md, "What limits the score").

Each training and dev text is put in the task's template (`{text_column} : {text} Label : `)
and run once through the base model (transformers, `output_hidden_states`, no soft prompt). A
scikit-learn logistic regression (balanced classes, `--C`) is fitted on the training rows'
features, standardised with the training rows' mean and std, and scored on dev (macro-F1 and,
with two labels, ROC AUC). Features, each its own row of the output:

- `layer L`: layer L's states averaged over the text's tokens (the template after `{text}`
  included, the part before it not);
- `band`: the pooled head's (`--head pooled`) input: layers round(0.4 L) .. round(0.7 L) of
  L, each standardised over the training rows, then averaged;
- `last token, last layer`: what the label words and PEFT's SEQ_CLS head read.
- `band + last token`: both of the above side by side (each standardised), one probe.
- `bands`: windows as wide as the default band at other depths (starting at 0.1 L .. 0.6 L, the
  last layer never read): each window's k-fold cross-validated macro-F1 on the training rows
  alone (stratified, k = min(5, smallest class)) and its dev macro-F1; then the window that
  cross-validation picks and its dev score, against the default band's. A window picked this
  way uses no dev answer, so it is what a readout could choose per task at training time.

This shares no code with softprompt's head (only the template and the model loader), so it
checks the head's figures as much as it bounds them. By hand, one thread, float32:

    python bench/probe.py --data-dir ../shared/data/raft_twitter_complaints
    python bench/probe.py --model gemma3-270m --data-dir bench/data/support \\
        --text-column text --label-column label
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt import Task, load_base  # noqa: E402


def read(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (text_column, label_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(
                f"{path}: no column {missing} (columns: {reader.fieldnames}); "
                "pass --text-column / --label-column"
            )
        rows = list(reader)
    return [r[text_column] for r in rows], [r[label_column] for r in rows]


@torch.no_grad()
def features(model, tokenizer, task: Task, texts: list[str], max_tokens: int) -> dict:
    """Per text: every layer's mean over the text's tokens [layers+1, H] and the last layer's
    last-token state [H]."""
    before = len(tokenizer(task.head())["input_ids"])  # the template before the text
    means, last = [], []
    for text in texts:
        ids = tokenizer(task.render(text))["input_ids"][:max_tokens]
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        states = torch.stack(out.hidden_states)[:, 0].float()  # [layers+1, T, H]
        means.append(states[:, min(before, len(ids) - 1) :].mean(1).numpy())
        last.append(states[-1, -1].numpy())
    return {"means": np.stack(means), "last": np.stack(last)}


def probe(train_x, train_y, dev_x, dev_y, labels: list[str], C: float) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, roc_auc_score

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
    clf.fit((train_x - mu) / sd, train_y)
    z = (dev_x - mu) / sd
    r = {"macro_f1": round(f1_score(dev_y, clf.predict(z), average="macro"), 4)}
    if len(labels) == 2:
        p = clf.predict_proba(z)[:, list(clf.classes_).index(labels[0])]
        r["auc"] = round(roc_auc_score([y == labels[0] for y in dev_y], p), 4)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in model")
    ap.add_argument("--data-dir", required=True, help="a folder with train.csv and dev.csv")
    ap.add_argument("--text-column", default="Tweet text")
    ap.add_argument("--label-column", default="Label")
    ap.add_argument("--C", type=float, default=0.1, help="inverse regularisation strength")
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    train_t, train_y = read(data / "train.csv", args.text_column, args.label_column)
    dev_t, dev_y = read(data / "dev.csv", args.text_column, args.label_column)
    model, tokenizer, _ = load_base(args.model, dtype="float32")
    labels = sorted(set(train_y), key=lambda y: (y.startswith("no "), y))
    task = Task(text_column=args.text_column, label_names=labels)
    base = model.get_decoder()
    tr = features(base, tokenizer, task, train_t, args.max_tokens)
    dv = features(base, tokenizer, task, dev_t, args.max_tokens)
    L = tr["means"].shape[1] - 1

    def emit(name: str, r: dict) -> None:
        print(json.dumps({"features": name, **r}), flush=True)

    for layer in range(1, L + 1):
        emit(f"layer {layer}", probe(tr["means"][:, layer], train_y, dv["means"][:, layer], dev_y, labels, args.C))  # fmt: skip
    band = list(range(round(0.4 * L), round(0.7 * L) + 1))
    band = [b for b in band if b < L]  # the pooled head never reads the last layer

    def banded(x):  # each layer standardised with the training rows' statistics, then averaged
        mu, sd = tr["means"][:, band].mean(0), tr["means"][:, band].std(0) + 1e-6
        return ((x[:, band] - mu) / sd).mean(1)

    emit(f"band {band[0]}-{band[-1]}", probe(banded(tr["means"]), train_y, banded(dv["means"]), dev_y, labels, args.C))  # fmt: skip
    emit("last token, last layer", probe(tr["last"], train_y, dv["last"], dev_y, labels, args.C))
    mu, sd = tr["last"].mean(0), tr["last"].std(0) + 1e-6
    both = [np.concatenate([banded(x["means"]), (x["last"] - mu) / sd], 1) for x in (tr, dv)]
    emit("band + last token", probe(both[0], train_y, both[1], dev_y, labels, args.C))
    bands(tr["means"], train_y, dv["means"], dev_y, labels, args.C, band, emit)


def window(L: int, start: float, width: float) -> list[int]:
    lo = max(1, round(start * L))
    return list(range(lo, min(L - 1, round((start + width) * L)) + 1))


def bands(tr, train_y, dv, dev_y, labels, C, default: list[int], emit) -> None:
    """Windows of the default band's width at other depths, each standardised per layer and
    averaged as the pooled head does: cross-validated on the training rows, scored on dev."""
    from sklearn.model_selection import StratifiedKFold

    L = tr.shape[1] - 1
    width = (default[-1] - default[0]) / L
    k = min(5, min(train_y.count(y) for y in set(train_y)))
    y = np.array(train_y)

    def averaged(x, rows, band):
        mu, sd = tr[rows][:, band].mean(0), tr[rows][:, band].std(0) + 1e-6
        return ((x[:, band] - mu) / sd).mean(1)

    found = {}
    for start in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        band = window(L, start, width)
        if tuple(band) in found or not band:
            continue
        cv = []
        for fit, held in StratifiedKFold(k, shuffle=True, random_state=0).split(tr, y):
            r = probe(averaged(tr[fit], fit, band), list(y[fit]), averaged(tr[held], fit, band), list(y[held]), labels, C)  # fmt: skip
            cv.append(r["macro_f1"])
        every = np.arange(len(train_y))
        dev = probe(averaged(tr, every, band), train_y, averaged(dv, every, band), dev_y, labels, C)
        found[tuple(band)] = (float(np.mean(cv)), dev["macro_f1"])
        emit(f"band {band[0]}-{band[-1]}", {"cv_macro_f1": round(float(np.mean(cv)), 4), **dev})
    picked = max(found, key=lambda b: found[b][0])
    emit(
        "bands picked",
        {
            "default": f"{default[0]}-{default[-1]}",
            "default_dev": found.get(tuple(default), (None, None))[1],
            "cv_pick": f"{picked[0]}-{picked[-1]}",
            "cv_pick_dev": found[picked][1],
            "dev_best": max(v[1] for v in found.values()),
        },
    )


if __name__ == "__main__":
    main()

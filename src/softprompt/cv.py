"""k-fold cross-validation on a training file: how many epochs generalise, and a fitted
decision bias, chosen from out-of-fold predictions instead of a fixed recipe.

    out/cv.json           per-epoch out-of-fold metrics, the chosen epoch and bias
    out/folds/<i>/        fold i's run (trained on the other folds, evaluated on fold i)
    out/final/            (unless --no-retrain) a run on all rows for the chosen number of
                          epochs, with the fitted bias in softprompt.json; use it like any run

With --task generation the folds are by input (all the references of one input text in one
fold), the epoch is chosen by the folds' mean held-out loss (or, with --select-by a metric, by
the score of the pooled out-of-fold greedy outputs), and no bias is fitted.

With --task multilabel the folds are stratified by each row's rarest label (every label with at
least k rows is held out in every fold), the epoch is chosen by out-of-fold macro-F1 at 0.5,
and instead of a bias each label gets a threshold (`calibrate.fit_thresholds`) on those
out-of-fold probabilities.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .adapters import TASK_NAME
from .calibrate import apply_bias, choose_labels, fit_bias, fit_thresholds
from .config import TrainConfig
from .data import Table, group_references, label_set, load_table, stratified_folds
from .engine import Engine
from .errors import SoftpromptError
from .files import atomic_write_json
from .log import ensure_visible, logger
from .metrics import generation_metrics, metrics, multilabel_metrics
from .modeling.load import dtype_line, load_base
from .predictors import predictor_for_prompt
from .training import Callback, TrainResult, prepare_run_folder, train


@dataclass
class CVResult:
    out: Path
    best_epoch: int
    bias: list[float]
    """The fitted decision bias ([] for --task generation: no labels, no bias)."""
    epochs: list[dict]
    """Per epoch: out-of-fold accuracy, macro-F1, log-loss; mean and spread of fold macro-F1.
    --task generation: the folds' held-out loss (mean, spread, each fold's) and, with
    --select-by a metric, the pooled out-of-fold outputs' scores. --task multilabel:
    out-of-fold micro- and macro-F1, subset accuracy and log-loss; fold macro-F1."""
    final: TrainResult | None
    thresholds: list[float] = field(default_factory=list)
    """--task multilabel: each label's fitted threshold ([] for the other kinds)."""


class _OutOfFold(Callback):
    """After each epoch of a fold's run: the held-out rows' label probabilities with that
    epoch's prompt, into oof[epoch - 1, held]."""

    def __init__(self, engine: Engine, oof: torch.Tensor, held: list[int], texts: list[str]):
        self.engine, self.oof, self.held, self.texts = engine, oof, held, texts

    def on_epoch(self, run, state, record) -> None:
        prompt = state.prompt.detach()
        predictor = predictor_for_prompt(
            run.model, run.tokenizer, prompt, run.task, kind=run.kind, head=state.head
        )
        self.oof[state.epoch - 1, self.held] = self.engine.classify(predictor, self.texts)


class _HeldOutGeneration(Callback):
    """After each epoch of a generation fold's run: its held-out loss (the run's own eval_loss)
    into loss[epoch - 1][fold] and, given `outputs`, the held-out inputs written out greedily
    with that epoch's prompt (as training's evaluation does) into outputs[epoch - 1][input]."""

    def __init__(self, engine: Engine, fold: int, loss: list, outputs: list | None):
        self.engine, self.fold, self.loss, self.outputs = engine, fold, loss, outputs

    def on_epoch(self, run, state, record) -> None:
        self.loss[state.epoch - 1][self.fold] = record["eval_loss"]
        if self.outputs is None:
            return
        predictor = predictor_for_prompt(
            run.model, run.tokenizer, state.prompt.detach(), run.task, kind=run.kind
        )
        inputs = list(dict.fromkeys(run.eval_texts))
        outs = self.engine.generate(predictor, inputs, batch_size=run.cfg.eval_batch_size)
        self.outputs[state.epoch - 1].update(zip(inputs, outs, strict=True))


def cross_validate(
    cfg: TrainConfig, folds: int = 5, *, retrain: bool = True, model=None, tokenizer=None
) -> CVResult:
    """Train `folds` runs as `cfg` says, each holding out one stratified fold; score every held-out
    row after every epoch; pick the epoch with the best pooled out-of-fold macro-F1, fit the bias
    on those predictions, then (retrain) train on all rows for that many epochs.
    cfg.task == "generation": folds by input, the epoch by held-out loss or --select-by's score,
    no bias (`_cross_validate_generation`)."""
    cfg = cfg.resolved()
    cfg.validate()
    ensure_visible()
    if cfg.eval_data:
        raise SoftpromptError(
            "--eval-data is not used by cross-validation (every row is held out once); drop it"
        )
    multi = cfg.task == "multilabel"
    table = load_table(
        cfg.data,
        cfg.text_column,
        cfg.label_column,
        subset=cfg.subset,
        split=cfg.split,
        separator=cfg.label_separator if multi else None,
    )
    if cfg.task == "generation":
        return _cross_validate_generation(cfg, table, folds, retrain, model, tokenizer)
    if multi:
        return _cross_validate_multilabel(cfg, table, folds, retrain, model, tokenizer)
    names = label_set(table)
    counts = {n: table.labels.count(n) for n in names}
    if folds < 2 or folds > min(counts.values()):
        raise SoftpromptError(
            f"--folds must be between 2 and the size of the smallest class ({counts}); got {folds}"
        )
    out, model, tokenizer = _start(cfg, folds, model, tokenizer)
    engine = Engine(model, tokenizer, kv_cache_bytes=0)
    gold = [names.index(y) for y in table.labels]
    oof = torch.zeros(cfg.epochs, len(gold), len(names))  # [E, N, L]
    fold_f1 = [[0.0] * folds for _ in range(cfg.epochs)]
    parts = stratified_folds(table.labels, folds, cfg.seed)
    for i, held in enumerate(parts):
        keep = sorted(set(range(len(gold))) - set(held))
        part = {
            name: Table(cfg.data, [table.texts[j] for j in idx], [table.labels[j] for j in idx], [])
            for name, idx in (("train", keep), ("eval", held))
        }
        logger.info(f"--- fold {i + 1}/{folds}: train {len(keep)} rows, held out {len(held)} ---")
        texts = part["eval"].texts
        train(
            replace(
                cfg,
                data=None,
                out=str(out / "folds" / str(i)),
                overwrite=False,
                save_every_epoch=True,  # each epoch's prompt stays inspectable (folds/<i>/epochs)
            ),
            model,
            tokenizer,
            data=part["train"],
            eval_data=part["eval"],
            callbacks=[_OutOfFold(engine, oof, held, texts)],
        )
        for e in range(cfg.epochs):
            gold_held = [names[gold[j]] for j in held]
            fold_f1[e][i] = metrics(gold_held, _pred(oof[e, held], names), names)["macro_f1"]

    rows = []
    for e in range(cfg.epochs):
        m = metrics(table.labels, _pred(oof[e], names), names)
        nll = -oof[e][torch.arange(len(gold)), torch.tensor(gold)].clamp_min(1e-12).log().mean()
        rows.append(
            {
                "epoch": e + 1,
                "oof_accuracy": m["accuracy"],
                "oof_macro_f1": m["macro_f1"],
                "oof_log_loss": nll.item(),
                "fold_macro_f1_mean": statistics.mean(fold_f1[e]),
                "fold_macro_f1_std": statistics.stdev(fold_f1[e]),
            }
        )
    best = max(rows, key=lambda r: (r["oof_macro_f1"], -r["oof_log_loss"]))
    bias = fit_bias(oof[best["epoch"] - 1], gold)
    calibrated = metrics(
        table.labels, _pred(apply_bias(oof[best["epoch"] - 1], bias), names), names
    )
    report = {
        "status": "done",
        "folds": folds,
        "labels": names,
        "best_epoch": best["epoch"],
        "bias": bias,
        "oof_macro_f1_with_bias": calibrated["macro_f1"],
        "epochs": rows,
        "config": asdict(cfg),
    }
    atomic_write_json(out / "cv.json", report)
    _print_table(rows, best["epoch"], bias, calibrated["macro_f1"])

    final = None
    if retrain:
        logger.info(f"--- final: all {len(gold)} rows, {best['epoch']} epochs ---")
        final = _retrain(cfg, out, best["epoch"], model, tokenizer)
        set_calibration(final.out, bias, f"fitted on {folds}-fold out-of-fold predictions")
    return CVResult(out=out, best_epoch=best["epoch"], bias=bias, epochs=rows, final=final)


def _start(cfg: TrainConfig, folds: int, model, tokenizer):
    """The cv folder (its cv.json says the run is under way) and the base model (loaded unless
    given): (out, model, tokenizer)."""
    out = prepare_run_folder(cfg.out, cfg.overwrite)
    atomic_write_json(out / "cv.json", {"status": "running", "folds": folds, "config": asdict(cfg)})
    if model is None:
        logger.info(dtype_line(cfg.dtype, cfg.device))
        model, tokenizer, _ = load_base(
            cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code
        )
    return out, model, tokenizer


def _retrain(cfg: TrainConfig, out: Path, epochs: int, model, tokenizer) -> TrainResult:
    """The final run: every row, the chosen number of epochs, into out/final."""
    final_cfg = replace(
        cfg,
        out=str(out / "final"),
        epochs=epochs,
        eval_fraction=0.0,
        overwrite=False,
        save_every_epoch=False,
    )
    return train(final_cfg, model, tokenizer)


GENERATION_SCORES = ("bleu", "chrf", "rouge_l", "exact_match")


def input_folds(texts: list[str], k: int, seed: int) -> list[list[int]]:
    """k seeded folds of row indices (each sorted) by scikit-learn's `GroupKFold` (shuffled)
    with the input text as the group: all the rows of one input (its references) are in the
    same fold. k must be between 2 and the number of distinct inputs (`--folds`)."""
    from sklearn.model_selection import GroupKFold  # lazily: slow to import

    inputs = len(set(texts))
    if k < 2 or k > inputs:
        raise SoftpromptError(
            f"--folds must be between 2 and the number of distinct inputs ({inputs}: every input "
            f"is held out with all its rows in one fold); got {k}"
        )
    split = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [sorted(held.tolist()) for _, held in split.split(texts, groups=texts)]


def _cross_validate_generation(
    cfg: TrainConfig, table: Table, folds: int, retrain: bool, model, tokenizer
) -> CVResult:
    """--task generation: folds by input; each fold's run evaluates its held-out rows every
    epoch (loss, and with --select-by a metric the greedy outputs); the epoch with the lowest
    mean held-out loss (or the best pooled out-of-fold score) is retrained on all rows."""
    texts, targets = table.texts, table.labels
    parts = input_folds(texts, folds, cfg.seed)
    metric = None if cfg.select_by == "loss" else cfg.select_by
    out, model, tokenizer = _start(cfg, folds, model, tokenizer)
    engine = Engine(model, tokenizer, kv_cache_bytes=0)
    loss = [[0.0] * folds for _ in range(cfg.epochs)]  # [E][fold]
    outputs: list[dict] | None = [{} for _ in range(cfg.epochs)] if metric else None
    for i, held in enumerate(parts):
        keep = sorted(set(range(len(texts))) - set(held))
        part = {
            name: Table(cfg.data, [texts[j] for j in idx], [targets[j] for j in idx], [])
            for name, idx in (("train", keep), ("eval", held))
        }
        n_held = len(set(part["eval"].texts))
        logger.info(
            f"--- fold {i + 1}/{folds}: train {len(keep)} rows, held out {len(held)} rows "
            f"({n_held} inputs) ---"
        )
        train(
            replace(
                cfg,
                data=None,
                out=str(out / "folds" / str(i)),
                overwrite=False,
                save_every_epoch=True,  # each epoch's prompt stays inspectable (folds/<i>/epochs)
                select_by="loss",  # the outputs are written once, by the callback
            ),
            model,
            tokenizer,
            data=part["train"],
            eval_data=part["eval"],
            callbacks=[_HeldOutGeneration(engine, i, loss, outputs)],
        )

    inputs, refs = group_references(texts, targets)
    rows = []
    for e in range(cfg.epochs):
        row = {
            "epoch": e + 1,
            "oof_loss_mean": statistics.mean(loss[e]),
            "oof_loss_std": statistics.stdev(loss[e]),
            "fold_loss": list(loss[e]),
        }
        if outputs is not None:
            pooled = generation_metrics([outputs[e][t] for t in inputs], refs)
            row.update({f"oof_{k}": pooled[k] for k in GENERATION_SCORES})
            per_fold = []
            for held in parts:
                fold_inputs, fold_refs = group_references(
                    [texts[j] for j in held], [targets[j] for j in held]
                )
                got = generation_metrics([outputs[e][t] for t in fold_inputs], fold_refs)
                per_fold.append(got[metric])
            row[f"fold_{metric}_mean"] = statistics.mean(per_fold)
            row[f"fold_{metric}_std"] = statistics.stdev(per_fold)
        rows.append(row)
    if metric:
        best = max(rows, key=lambda r: (r[f"oof_{metric}"], -r["oof_loss_mean"]))
    else:
        best = min(rows, key=lambda r: r["oof_loss_mean"])
    report = {
        "status": "done",
        "task": "generation",
        "folds": folds,
        "inputs": len(inputs),
        "select_by": cfg.select_by,
        "best_epoch": best["epoch"],
        "epochs": rows,
        "fold_rows": parts,
        "config": asdict(cfg),
    }
    atomic_write_json(out / "cv.json", report)
    _print_generation_table(rows, best["epoch"], metric)

    final = None
    if retrain:
        logger.info(f"--- final: all {len(texts)} rows, {best['epoch']} epochs ---")
        final = _retrain(cfg, out, best["epoch"], model, tokenizer)
    return CVResult(out=out, best_epoch=best["epoch"], bias=[], epochs=rows, final=final)


def set_calibration(folder: Path, bias: list[float] | None, how: str, *, key: str = "bias") -> None:
    """Record a decision bias (or, key "thresholds", a multilabel adapter's per-label
    thresholds) in an adapter's softprompt.json (None removes it)."""
    path = Path(folder) / TASK_NAME
    if not path.exists():
        raise SoftpromptError(f"{folder} has no {TASK_NAME}; calibration needs a softprompt run")
    data = json.loads(path.read_text())
    extra = data.setdefault("extra", {})
    if bias is None:
        extra.pop("calibration", None)
    else:
        extra["calibration"] = {key: [float(b) for b in bias], "how": how}
    atomic_write_json(path, data)


def label_set_folds(label_sets: list[list[str]], k: int, seed: int) -> list[list[int]]:
    """k seeded folds of row indices (each sorted) for multilabel rows, stratified by each
    row's rarest label (scikit-learn's `StratifiedKFold`, shuffled): every label with at least k
    rows is held out in every fold, which a threshold fitted on the folds' outputs needs. Rows
    whose rarest label has fewer than k rows, and rows with no label, stratify as one group.
    k must be between 2 and the number of rows (`--folds`)."""
    import warnings

    from sklearn.model_selection import StratifiedKFold  # lazily: slow to import

    n = len(label_sets)
    if k < 2 or k > n:
        raise SoftpromptError(f"--folds must be between 2 and the number of rows ({n}); got {k}")
    counts = Counter(x for labels in label_sets for x in set(labels))
    rarest = [min(set(labels), key=lambda x: (counts[x], x), default="") for labels in label_sets]
    groups = Counter(rarest)
    key = [r if r and groups[r] >= k else "" for r in rarest]
    split = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a pooled group smaller than k: spread as far as it goes
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return [sorted(held.tolist()) for _, held in split.split(key, key)]


def _cross_validate_multilabel(
    cfg: TrainConfig, table: Table, folds: int, retrain: bool, model, tokenizer
) -> CVResult:
    """--task multilabel: folds stratified by each row's rarest label; every held-out row's
    per-label probabilities after every epoch; the epoch with the best out-of-fold macro-F1
    (labels at 0.5; ties: the lower log-loss); each label's threshold fitted on that epoch's
    out-of-fold probabilities; then (retrain) all rows for that many epochs, the thresholds
    saved in its softprompt.json."""
    names = label_set(table)
    if len(names) < 2:
        raise SoftpromptError(
            f"--data {table.source}: column {cfg.label_column!r} has only the labels {names}; "
            "need at least 2"
        )
    parts = label_set_folds(table.labels, folds, cfg.seed)
    out, model, tokenizer = _start(cfg, folds, model, tokenizer)
    engine = Engine(model, tokenizer, kv_cache_bytes=0)
    gold = torch.zeros(len(table.texts), len(names))  # [N, L] multi-hot
    for j, labels in enumerate(table.labels):
        gold[j, [names.index(n) for n in labels]] = 1.0
    oof = torch.zeros(cfg.epochs, len(table.texts), len(names))  # [E, N, L]
    fold_f1 = [[0.0] * folds for _ in range(cfg.epochs)]
    for i, held in enumerate(parts):
        keep = sorted(set(range(len(table.texts))) - set(held))
        part = {
            name: Table(cfg.data, [table.texts[j] for j in idx], [table.labels[j] for j in idx], [])
            for name, idx in (("train", keep), ("eval", held))
        }
        logger.info(f"--- fold {i + 1}/{folds}: train {len(keep)} rows, held out {len(held)} ---")
        train(
            replace(
                cfg,
                data=None,
                out=str(out / "folds" / str(i)),
                overwrite=False,
                save_every_epoch=True,
                # every fold's head scores every label, also one its training rows lack
                extra={**cfg.extra, "label_names": names},
            ),
            model,
            tokenizer,
            data=part["train"],
            eval_data=part["eval"],
            callbacks=[_OutOfFold(engine, oof, held, part["eval"].texts)],
        )
        for e in range(cfg.epochs):
            got = _label_lists(choose_labels(oof[e, held], None), names)
            fold_f1[e][i] = multilabel_metrics(part["eval"].labels, got, names)["macro_f1"]

    rows = []
    for e in range(cfg.epochs):
        m = multilabel_metrics(
            table.labels, _label_lists(choose_labels(oof[e], None), names), names
        )
        p = oof[e].clamp(1e-7, 1 - 1e-7)
        nll = -(gold * p.log() + (1 - gold) * (1 - p).log()).mean()
        rows.append(
            {
                "epoch": e + 1,
                "oof_micro_f1": m["micro_f1"],
                "oof_macro_f1": m["macro_f1"],
                "oof_subset_accuracy": m["subset_accuracy"],
                "oof_log_loss": nll.item(),
                "fold_macro_f1_mean": statistics.mean(fold_f1[e]),
                "fold_macro_f1_std": statistics.stdev(fold_f1[e]),
            }
        )
    best = max(rows, key=lambda r: (r["oof_macro_f1"], -r["oof_log_loss"]))
    probs = oof[best["epoch"] - 1]
    thresholds = fit_thresholds(probs, gold)
    fitted = multilabel_metrics(
        table.labels, _label_lists(choose_labels(probs, thresholds), names), names
    )
    report = {
        "status": "done",
        "task": "multilabel",
        "folds": folds,
        "labels": names,
        "best_epoch": best["epoch"],
        "thresholds": thresholds,
        "oof_macro_f1_with_thresholds": fitted["macro_f1"],
        "oof_micro_f1_with_thresholds": fitted["micro_f1"],
        "epochs": rows,
        "fold_rows": parts,
        "config": asdict(cfg),
    }
    atomic_write_json(out / "cv.json", report)
    _print_multilabel_table(rows, best["epoch"], names, thresholds, fitted["macro_f1"])

    final = None
    if retrain:
        logger.info(f"--- final: all {len(table.texts)} rows, {best['epoch']} epochs ---")
        final = _retrain(cfg, out, best["epoch"], model, tokenizer)
        how = f"per-label thresholds fitted on {folds}-fold out-of-fold probabilities"
        set_calibration(final.out, thresholds, how, key="thresholds")
    return CVResult(
        out=out, best_epoch=best["epoch"], bias=[], epochs=rows, final=final, thresholds=thresholds
    )


def _label_lists(chosen: torch.Tensor, names: list[str]) -> list[list[str]]:
    return [[n for n, c in zip(names, row, strict=True) if c] for row in chosen.tolist()]


def _pred(probs: torch.Tensor, names: list[str]) -> list[str]:
    return [names[i] for i in probs.argmax(-1).tolist()]


def _print_table(rows: list[dict], best: int, bias: list[float], f1_bias: float) -> None:
    print("epoch  oof_acc  oof_macro_f1  oof_log_loss  fold_f1 (mean ± std)")
    for r in rows:
        mark = "  <- best" if r["epoch"] == best else ""
        print(
            f"{r['epoch']:5d}  {r['oof_accuracy']:7.3f}  {r['oof_macro_f1']:12.3f}  "
            f"{r['oof_log_loss']:12.4f}  {r['fold_macro_f1_mean']:.3f} ± "
            f"{r['fold_macro_f1_std']:.3f}{mark}"
        )
    shown = ", ".join(f"{b:+.3f}" for b in bias)
    print(
        f"fitted bias [{shown}]: out-of-fold macro-F1 {f1_bias:.3f} (optimistic: fitted on the same rows)"
    )


def _print_multilabel_table(
    rows: list[dict], best: int, names: list[str], thresholds: list[float], f1: float
) -> None:
    print("epoch  oof_micro_f1  oof_macro_f1  oof_subset_acc  oof_log_loss  fold_macro_f1 (mean ± std)")  # fmt: skip
    for r in rows:
        mark = "  <- best" if r["epoch"] == best else ""
        print(
            f"{r['epoch']:5d}  {r['oof_micro_f1']:12.3f}  {r['oof_macro_f1']:12.3f}  "
            f"{r['oof_subset_accuracy']:14.3f}  {r['oof_log_loss']:12.4f}  "
            f"{r['fold_macro_f1_mean']:.3f} ± {r['fold_macro_f1_std']:.3f}{mark}"
        )
    shown = ", ".join(f"{n} {t:.2f}" for n, t in zip(names, thresholds, strict=True))
    print(
        f"fitted thresholds [{shown}]: out-of-fold macro-F1 {f1:.3f} (optimistic: fitted on the same rows)"
    )


def _print_generation_table(rows: list[dict], best: int, metric: str | None) -> None:
    loss_head = "oof_loss (mean ± std over folds)"
    score_head = f"oof_{metric}" if metric else ""
    print(f"epoch  {loss_head}" + (f"  {score_head}  fold_{metric} (mean ± std)" if metric else ""))
    for r in rows:
        mark = "  <- best" if r["epoch"] == best else ""
        loss = f"{r['oof_loss_mean']:.4f} ± {r['oof_loss_std']:.4f}"
        line = f"{r['epoch']:5d}  {loss:<{len(loss_head)}}"
        if metric:
            line += (
                f"  {r[f'oof_{metric}']:{len(score_head)}.3f}  "
                f"{r[f'fold_{metric}_mean']:.3f} ± {r[f'fold_{metric}_std']:.3f}"
            )
        print(line.rstrip() + mark)

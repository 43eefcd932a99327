"""The `softprompt` command: a thin map from subcommands to library functions.

softprompt train   --data train.csv --text-column "Tweet text" --label-column Label --out runs/c
softprompt eval    runs/c --data dev.csv
softprompt predict runs/c "some text"       |  --data new.csv --output preds.csv
softprompt push    runs/c user/repo
softprompt serve   --adapters runs/      (every adapter folder under runs/, over HTTP)
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path

from .errors import SoftpromptError

DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]  # model.DTYPE_CHOICES (no torch here)
DTYPE_HELP = (
    "base model dtype: auto (bfloat16 where the CPU or GPU has bfloat16 hardware, else float32), "
    "float32, bfloat16 or float16; the prompt stays float32 [default: auto]"
)


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (used as the flag's help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:], strict=False):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(b, ast.Expr)
            and isinstance(getattr(b, "value", None), ast.Constant)
        ):
            docs[a.target.id] = str(b.value.value)
    return docs


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .train import PRESETS, TrainConfig

    docs = _field_docs(TrainConfig)
    skip = {"progress", "extra"}
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = docs.get(f.name, "")
        if f.type in ("bool", bool):  # --x / --no-x; None unless given
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_} [default: {'on' if f.default else 'off'}]",
            )
            continue
        if f.name == "init_text":
            p.add_argument(flag, default=None, help=help_)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        default = None if f.default is dataclasses.MISSING else f.default
        # the parsed value stays None unless the flag is given: --resume tells given from default
        p.add_argument(flag, type=kind, default=None, help=f"{help_} [default: {default}]")
    p.add_argument(
        "--preset",
        default=None,
        help="start from a named recipe; flags you give override its values. "
        + "; ".join(
            f"{name}: "
            + " ".join(
                f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                for k, v in values.items()
            )
            for name, values in PRESETS.items()
        )
        + " (the defaults are the recommended recipe, docs/accuracy.md; guide: the PEFT guide's)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train this many prompts (seeds --seed, --seed+1, ...) into --out/seed-<s>/ and save "
        "them as one ensemble (--out/ensemble.json): eval, predict and serve use their mean "
        "[default: 1]",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _adapter_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="run/adapter folder (ours or PEFT's) or Hub repo id")
    p.add_argument(
        "--model", default=None, help="base model (default: the one recorded in the adapter)"
    )
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated label names (for PEFT adapters without softprompt.json)",
    )
    p.add_argument("--template", default=None, help="override the input template")
    p.add_argument(
        "--text-column",
        default=None,
        help="column with the text (default: the one used in training)",
    )
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--generate", action="store_true", help="free generation instead of label scoring"
    )
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument(
        "--ensemble",
        action="append",
        default=[],
        metavar="ADAPTER",
        help="another adapter for the same task (repeatable): label probabilities are the mean "
        "of all prompts'",
    )
    p.add_argument(
        "--no-calibration",
        action="store_true",
        help="ignore the decision bias saved by `softprompt cv` (raw label probabilities)",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="softprompt", description="Prompt tuning for frozen causal language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a soft prompt; the --out folder becomes an adapter")
    _add_train_flags(t)

    c = sub.add_parser(
        "cv",
        help="k-fold cross-validation: choose epochs and a decision bias, then train on all rows",
    )
    _add_train_flags(c)
    c.add_argument("--folds", type=int, default=5, help="number of folds [default: 5]")
    c.add_argument(
        "--no-retrain",
        action="store_true",
        help="only report; don't train the final run on all rows",
    )
    e = sub.add_parser(
        "eval", help="accuracy, macro-F1 and confusion matrix on labeled data (JSON)"
    )
    _adapter_flags(e)
    e.add_argument("--data", required=True, help="labeled data: file or Hub dataset id")
    e.add_argument(
        "--label-column",
        default=None,
        help="column with the gold label (default: the training one)",
    )
    e.add_argument("--subset", default=None)
    e.add_argument("--split", default="test")
    e.add_argument("--output", default=None, help="also write the metrics JSON to this file")
    e.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    pr = sub.add_parser("predict", help="label (or generate for) texts given inline or in a file")
    _adapter_flags(pr)
    pr.add_argument("texts", nargs="*", help="texts to classify")
    pr.add_argument("--data", default=None, help="file or Hub dataset id with a text column")
    pr.add_argument("--subset", default=None)
    pr.add_argument("--split", default="test")
    pr.add_argument(
        "--output",
        default=None,
        help="write predictions to .csv or .jsonl (default: print JSON lines)",
    )
    pr.add_argument("--overwrite", action="store_true", help="replace --output if it exists")

    pu = sub.add_parser("push", help="upload a run folder's adapter to the Hugging Face Hub")
    pu.add_argument("adapter", help="run folder")
    pu.add_argument("repo_id", help="e.g. your-name/smollm2-complaints")
    pu.add_argument("--private", action="store_true")
    pu.add_argument(
        "--token", default=None, help="Hub token (default: the logged-in one or HF_TOKEN)"
    )

    s = sub.add_parser(
        "serve", help="serve every adapter in a folder over HTTP (needs softprompt[serve])"
    )
    s.add_argument(
        "--adapters", required=True, help="folder whose sub-folders are adapters (name = folder)"
    )
    s.add_argument("--model", default=None, help="base model (default: the built-in model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch-size", type=int, default=32, help="most inputs per forward pass")
    s.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for a batch"
    )
    s.add_argument(
        "--kv-cache-mb",
        type=float,
        default=256.0,
        help="budget for cached prompt keys/values (LRU; the adapter in use is always kept)",
    )
    s.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger bodies get 413")
    s.add_argument("--max-inputs", type=int, default=1024, help="most inputs per request")
    s.add_argument(
        "--stream-buffer",
        type=int,
        default=256,
        help="most events a stream holds for a client that does not read; past it its row ends",
    )
    s.add_argument(
        "--stream-timeout-s",
        type=float,
        default=30.0,
        help="a stream whose client takes no data for this long is closed",
    )
    s.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    s.add_argument("--device", default=None)
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer <key>' on every request but /health and / "
        "(default: the SOFTPROMPT_API_KEY environment variable; unset: no key)",
    )
    s.add_argument(
        "--allow-adapter-admin",
        action="store_true",
        help="allow loading and unloading adapters over HTTP (POST/DELETE /v1/adapters)",
    )
    return parser, {"train": t, "cv": c, "eval": e, "predict": pr, "push": pu, "serve": s}


def _given_train_flags(args: argparse.Namespace) -> dict:
    """The TrainConfig fields whose flags were given (unset flags parse to None / False)."""
    from .train import TrainConfig

    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }


def _train_config(args: argparse.Namespace, given: dict):
    """The TrainConfig of `train` / `cv`: the --preset's values (if any), then the given flags."""
    from .train import TrainConfig, preset_config

    if given.get("method") == "prefix" and "suffix_tokens" not in given:
        given = {**given, "suffix_tokens": 0}  # deep prompts take no suffix tokens
    if args.preset:
        return preset_config(args.preset, **given)
    return TrainConfig(**{"data": None, **given})


def cmd_train(args: argparse.Namespace) -> int:
    from .train import end_processes, resume_config, train, train_ensemble

    given = _given_train_flags(args)
    try:
        if args.resume:
            if args.preset:
                raise SoftpromptError(
                    f"--preset cannot be used with --resume {args.resume}: the run keeps the "
                    "settings it was started with"
                )
            cfg = resume_config(args.resume, **given)
        else:
            cfg = _train_config(args, given)
        cfg.progress = not args.no_progress
        if args.seeds != 1:
            results = train_ensemble(cfg, args.seeds)
        else:
            result = train(cfg)
    finally:
        end_processes()
    if args.seeds != 1:
        if results[0].main_process:
            f1 = [r.best.get("eval_macro_f1") for r in results]
            said = "" if None in f1 else f"; members' eval macro-F1 {[round(x, 4) for x in f1]}"
            print(f"ensemble of {len(results)} prompts saved in {cfg.out}{said}")
        return 0
    if result.main_process:
        best = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.best.items()}
        print(f"best prompt (epoch {best['epoch']}) saved in {result.out}: {json.dumps(best)}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from .cv import cross_validate

    given = _given_train_flags(args)
    for flag in ("resume", "save_every_epoch", "eval_data"):
        if flag in given:
            raise SoftpromptError(f"--{flag.replace('_', '-')} cannot be used with `softprompt cv`")
    if args.seeds != 1:
        raise SoftpromptError(
            "--seeds cannot be used with `softprompt cv` (it trains one prompt per fold)"
        )
    cfg = _train_config(args, given)
    cfg.progress = not args.no_progress
    r = cross_validate(cfg, args.folds, retrain=not args.no_retrain)
    where = f"; final run (calibrated) in {r.final.out}" if r.final else ""
    print(f"cross-validation report in {r.out / 'cv.json'}: best epoch {r.best_epoch}{where}")
    return 0


def _load(args):
    from .modeling.load import dtype_line
    from .pipeline import SoftPrompt

    if not args.no_progress:  # on stderr: stdout carries the results
        print(dtype_line(args.dtype, args.device), file=sys.stderr)
    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    return SoftPrompt.load(
        args.adapter,
        base_model=args.model,
        dtype=args.dtype,
        device=args.device,
        labels=labels,
        template=args.template,
        text_column=args.text_column,
        trust_remote_code=args.trust_remote_code,
        ensemble=args.ensemble,
    )


def _check_output(path: str | None, overwrite: bool) -> None:
    if path is None:
        return
    if Path(path).suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise SoftpromptError(f"--output {path}: use a .csv or .jsonl file name")
    if Path(path).exists() and not overwrite:
        raise SoftpromptError(
            f"--output {path} already exists; pass --overwrite to replace it, or choose another name"
        )


def cmd_eval(args: argparse.Namespace) -> int:
    from .adapters import atomic_write_json
    from .data import check_labels, load_table

    _check_output(args.output, args.overwrite)
    sp = _load(args)
    sp._need_labels()
    label_col = args.label_column or sp.task.label_column or "label"
    table = load_table(
        args.data, sp.task.text_column, label_col, subset=args.subset, split=args.split
    )
    check_labels(table, sp.task.label_names, "--data")
    m = sp.evaluate(
        table.texts,
        table.labels,
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        calibrated=not args.no_calibration,
    )
    print(json.dumps(m, indent=2))
    if args.output:
        atomic_write_json(Path(args.output), m)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .data import load_table

    if not args.texts and not args.data:
        raise SoftpromptError("give texts to classify, or --data with a file of them")
    _check_output(args.output, args.overwrite)
    sp = _load(args)
    texts = list(args.texts)
    if args.data:
        texts += load_table(
            args.data,
            sp.task.text_column,
            None,
            subset=args.subset,
            split=args.split,
            need_labels=False,
        ).texts
    progress = not args.no_progress and len(texts) > args.batch_size
    if args.generate:
        outs = sp.generate(
            texts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=progress
        )
        rows = [{"text": t, "generated": o} for t, o in zip(texts, outs, strict=True)]
    else:
        preds = sp.classify(
            texts,
            batch_size=args.batch_size,
            progress=progress,
            calibrated=not args.no_calibration,
        )
        rows = [
            {
                "text": t,
                "label": p["label"],
                **{f"p({k})": round(v, 6) for k, v in p["probabilities"].items()},
            }
            for t, p in zip(texts, preds, strict=True)
        ]
    if args.output:
        _write_rows(Path(args.output), rows)
        print(f"wrote {len(rows)} predictions to {args.output}")
    else:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    return 0


def _write_rows(path: Path, rows: list[dict]) -> None:
    import io

    from .adapters import atomic_write_bytes

    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode())


def cmd_push(args: argparse.Namespace) -> int:
    from .adapters import push_to_hub

    url = push_to_hub(args.adapter, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.adapter} to {url}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [
        m for m in ("fastapi", "uvicorn", "prometheus_client") if not importlib.util.find_spec(m)
    ]
    if missing:
        raise SoftpromptError(
            f"`softprompt serve` needs {', '.join(missing)}: pip install 'softprompt[serve]'"
        )
    from .serve import run_server

    run_server(
        args.adapters,
        model=args.model,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        kv_cache_mb=args.kv_cache_mb,
        max_body_bytes=args.max_body_bytes,
        max_inputs=args.max_inputs,
        stream_buffer=args.stream_buffer,
        stream_timeout_s=args.stream_timeout_s,
        log_level=args.log_level,
        api_key=args.api_key or os.environ.get("SOFTPROMPT_API_KEY") or None,
        allow_adapter_admin=args.allow_adapter_admin,
    )
    return 0


COMMANDS = {
    "train": cmd_train,
    "cv": cmd_cv,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "push": cmd_push,
    "serve": cmd_serve,
}


def _quiet_loading() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subs = build_parser()
    if not argv or argv[0] not in subs:
        parser.parse_args(argv)  # prints usage or help, and exits
    # options and texts may come in any order: `predict RUN --generate "text"`
    args = subs[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    if getattr(args, "no_progress", False):
        _quiet_loading()
    try:
        return COMMANDS[args.command](args)
    except SoftpromptError as e:
        print(f"softprompt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

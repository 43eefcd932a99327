"""The `softprompt` command: a thin map from subcommands to library functions.

softprompt train   --data train.csv --text-column "Tweet text" --label-column Label --out runs/c
softprompt train   --config run.yaml --epochs 5   (settings from a YAML/JSON file; flags win)
softprompt eval    runs/c --data dev.csv
softprompt predict runs/c "some text"       |  --data new.csv --output preds.csv
softprompt push    runs/c user/repo
softprompt serve   --adapters runs/      (every adapter folder under runs/, over HTTP)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import json
import os
import re
import shlex
import sys
from pathlib import Path

from .config import DTYPE_CHOICES
from .errors import SoftpromptError

DTYPE_HELP = (
    "base model dtype: auto (bfloat16 where the CPU or GPU has bfloat16 hardware, else float32; "
    "the environment variable SOFTPROMPT_AUTO_DTYPE=float32|bfloat16 overrides what auto picks), "
    "float32, bfloat16 or float16; the prompt stays float32 [default: auto]"
)


TRAIN_HELP = {
    "train": "train a soft prompt; the --out folder becomes an adapter",
    "cv": "k-fold cross-validation: choose epochs and a decision bias, then train on all rows",
}
PRECEDENCE = (
    "Each setting comes from the first of: a flag on the command line, a --config file, the "
    "--preset, the default shown. A run's own train_config.json is a valid --config (its "
    "dtype_requested is ignored; dtype is the type the run resolved --dtype to)."
)


def _train_parser(command: str):
    """The `train` / `cv` parser (jsonargparse): a flag per TrainConfig field, typed, its help the
    field's docstring; booleans as --x / --no-x. Parsed with defaults=False, it returns only what
    was given, which --resume needs."""
    from jsonargparse import ActionYesNo, ArgumentParser, set_parsing_settings

    from .config import PRESETS, TrainConfig

    class Parser(ArgumentParser):
        hyphens = False

        def add_argument(self, *args, **kwargs):
            # jsonargparse names a field's flag --num_virtual_tokens; ours is --num-virtual-tokens
            # (the key stays num_virtual_tokens). Only while the fields are added: jsonargparse
            # also adds flags of its own.
            if self.hyphens and args and args[0].startswith("--"):
                args = ("--" + args[0][2:].replace("_", "-"), *args[1:])
            if kwargs.get("type") is bool:  # --x / --no-x; true / false in a file
                del kwargs["type"]
                kwargs["action"] = ActionYesNo(no_prefix="no-")
            return super().add_argument(*args, **kwargs)

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    p = Parser(
        prog=f"softprompt {command}",
        description=f"{TRAIN_HELP[command]}. {PRECEDENCE}",
        exit_on_error=False,
        print_config=None,
    )
    p.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="YAML or JSON file of settings: the flags' names with _ as keys (num_virtual_tokens: "
        "16, balance: false); repeatable, a later file wins; flags given on the command line win "
        "over the files",
    )
    p.hyphens = True
    p.add_class_arguments(TrainConfig, as_group=False, skip={"extra"})
    p.hyphens = False
    p.add_argument(
        "--preset",
        help="start from a named recipe; --config files and flags override its values. "
        + "; ".join(
            f"{name}: " + (" ".join(_as_flags(values)) or "the defaults")
            for name, values in PRESETS.items()
        )
        + " (the defaults are the recommended recipe, docs/accuracy.md; guide: the PEFT guide's)",
    )
    if command == "train":
        p.add_argument(
            "--seeds",
            type=int,
            default=1,
            help="train this many prompts (seeds --seed, --seed+1, ...) into --out/seed-<s>/ and "
            "save them as one ensemble (--out/ensemble.json): eval, predict and serve use their "
            "mean",
        )
    else:
        p.add_argument("--folds", type=int, default=5, help="number of folds")
        p.add_argument(
            "--retrain",
            type=bool,
            default=True,
            help="train the final run on all rows (--no-retrain: only report)",
        )
    return p


def _as_flags(values: dict) -> list[str]:
    """{"balance": False, "epochs": 50} -> ["--no-balance", "--epochs 50"]."""
    flags = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + flag[2:])
        else:
            flags.append(f"{flag} {shlex.quote(str(v))}")
    return flags


def parse_train_args(command: str, argv: list[str]) -> argparse.Namespace:
    """`softprompt train` / `cv` arguments. `given`: the TrainConfig fields set by --config files
    and flags (flags win), nothing else; the other arguments (preset, seeds or folds and retrain)
    as attributes, defaults filled in."""
    from argparse import ArgumentError

    from .config import TrainConfig

    parser = _train_parser(command)
    try:
        flags = parser.parse_args(argv, defaults=False).as_dict()
    except ArgumentError as e:
        msg = _one_line(e)
        if msg.startswith("unrecognized arguments"):
            msg += f" (softprompt {command} --help lists the flags)"
        raise SoftpromptError(msg) from None
    defaults = parser.get_defaults().as_dict()
    values: dict = {}
    for path in flags.pop("config", None) or []:
        values.update(_read_config(parser, path, defaults))
    values.update(flags)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    rest = {k: v for k, v in {**defaults, **values}.items() if k not in fields and k != "config"}
    return argparse.Namespace(given={k: v for k, v in values.items() if k in fields}, **rest)


def _read_config(parser, path: str, defaults: dict) -> dict:
    """The settings in a --config file, checked against the parser: every key known, every value
    of its flag's type. `extra` (in train_config.json) is kept as it is; `dtype_requested` is
    dropped."""
    from argparse import ArgumentError

    import yaml

    where = f"--config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SoftpromptError(f"{where}: file not found") from None
    except OSError as e:
        raise SoftpromptError(f"{where}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SoftpromptError(f"{where}: not a text file (UTF-8)") from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as e:
        raise SoftpromptError(f"{where}: not valid YAML or JSON ({_one_line(e)})") from None
    if data is None:  # an empty file
        data = {}
    if not isinstance(data, dict):
        raise SoftpromptError(
            f"{where}: expected settings as key: value pairs, found a {type(data).__name__}"
        )
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.pop("dtype_requested", None)  # train_config.json: the --dtype asked for, e.g. auto
    extra = data.pop("extra", {})
    if not isinstance(extra, dict):
        raise SoftpromptError(f"{where}: extra must be a mapping (got {extra!r})")
    known = set(defaults) - {"config"}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SoftpromptError(
                f"{where}: unknown key {key!r}; {hint}the keys are the flags' names with _ "
                f"(softprompt train --help lists them)"
            )
        if isinstance(defaults[key], bool) and not isinstance(value, bool):
            raise SoftpromptError(f"{where}: {key}: expected true or false, got {value!r}")
    try:
        values = parser.parse_object(data, defaults=False).as_dict()
    except ArgumentError as e:
        raise SoftpromptError(f"{where}: {_one_line(e, key_style=True)}") from None
    return {**values, "extra": extra} if extra else values


TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "NoneType": "null"}


def _one_line(e: Exception, key_style: bool = False) -> str:
    """A parser or YAML error on one line. jsonargparse's
    'Parser key "epochs":\n  Expected a <class 'int'>. Got value: x' becomes
    "--epochs: expected int, got x" (or "epochs: ..." with key_style, for a file)."""
    msg = str(e).strip()
    m = re.match(r'Parser key "([^"]+)":\s*(.*)', msg, re.S)
    if m:
        key, body = m.groups()
        name = key if key_style else "--" + key.replace("_", "-")
        types = re.findall(r"Expected an? <class '(\w+)'>", body)
        got = re.findall(r"(?:Got|Given) value: (.*)", body)
        if types and got:
            want = " or ".join(dict.fromkeys(TYPE_WORDS.get(t, t) for t in types))
            return f"{name}: expected {want}, got {got[-1].strip()}"
        msg = f"{name}: {body}"
    mark = getattr(e, "problem_mark", None)  # a YAML syntax error
    if mark is not None:
        msg = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    return " ".join(msg.split())


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
    """The top-level parser, and the argparse parsers of the commands but train and cv."""
    parser = argparse.ArgumentParser(
        prog="softprompt", description="Prompt tuning for frozen causal language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    for command, help_ in TRAIN_HELP.items():  # listed here; parsed by parse_train_args
        sub.add_parser(command, help=help_, add_help=False)
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
    return parser, {"eval": e, "predict": pr, "push": pu, "serve": s}


def _train_config(args: argparse.Namespace):
    """The TrainConfig of `train` / `cv`: the --preset's values (if any), then the given ones."""
    from .config import TrainConfig, preset_config

    given = args.given
    if given.get("method") == "prefix" and "suffix_tokens" not in given:
        given = {**given, "suffix_tokens": 0}  # deep prompts take no suffix tokens
    if args.preset:
        return preset_config(args.preset, **given)
    return TrainConfig(**{"data": None, **given})


def cmd_train(args: argparse.Namespace) -> int:
    from .training import end_processes, resume_config, train, train_ensemble

    given = args.given
    try:
        if given.get("resume"):
            if args.preset:
                raise SoftpromptError(
                    f"--preset cannot be used with --resume {given['resume']}: the run keeps the "
                    "settings it was started with"
                )
            cfg = resume_config(given["resume"], **given)
        else:
            cfg = _train_config(args)
        cfg.progress = given.get("progress", True)  # not the resumed run's
        if args.seeds != 1:
            results = train_ensemble(cfg, args.seeds)
        else:
            result = train(cfg)
    except BaseException:
        end_processes(ok=False)
        raise
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

    for flag in ("resume", "save_every_epoch", "eval_data"):
        if args.given.get(flag):
            raise SoftpromptError(f"--{flag.replace('_', '-')} cannot be used with `softprompt cv`")
    cfg = _train_config(args)
    r = cross_validate(cfg, args.folds, retrain=args.retrain)
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
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage or help, and exits
    command = argv[0]
    try:
        if command in TRAIN_HELP:
            args = parse_train_args(command, argv[1:])
            quiet = args.given.get("progress") is False
        else:  # options and texts may come in any order: `predict RUN --generate "text"`
            args = subs[command].parse_intermixed_args(argv[1:])
            quiet = getattr(args, "no_progress", False)
        if quiet:
            _quiet_loading()
        from .log import show_log

        # what a run says as it works: plain lines, on stdout for train and cv (their output),
        # on stderr for the commands whose stdout is results (serve sets up its own log)
        if command != "serve":
            show_log(sys.stdout if command in TRAIN_HELP else sys.stderr)
        return COMMANDS[command](args)
    except SoftpromptError as e:
        print(f"softprompt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

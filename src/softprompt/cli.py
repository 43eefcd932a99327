"""The `softprompt` command: a thin map from subcommands to library functions.

softprompt train   --data train.csv --text-column "Tweet text" --label-column Label --out runs/c
softprompt train   --config run.yaml --epochs 5   (settings from a YAML/JSON file; flags win)
softprompt eval    runs/c --data dev.csv
softprompt predict runs/c "some text"       |  --data new.csv --output preds.csv
softprompt push    runs/c user/repo
softprompt serve   --adapters runs/      (every adapter folder under runs/, over HTTP)

Each subcommand's flags are the fields of its settings class (TrainConfig, EvalConfig,
PredictConfig, PushConfig, ServeConfig): a flag per field, its help the field's docstring, its
choices the field's Literal; every boolean has a --no- form. Values are checked by pydantic
against the fields' types; a problem is one line naming the flag.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SoftpromptError

if TYPE_CHECKING:  # each command's interface: its settings class
    from .serve.settings import ServeConfig
    from .settings import EvalConfig, PredictConfig, PushConfig

HELP = {
    "train": "train a soft prompt; the --out folder becomes an adapter",
    "cv": "k-fold cross-validation: choose epochs and a decision bias, then train on all rows",
    "eval": "accuracy, macro-F1 and confusion matrix on labeled data (JSON)",
    "predict": "label (or generate for) texts given inline or in a file",
    "push": "upload a run folder's adapter to the Hugging Face Hub",
    "serve": "serve every adapter in a folder over HTTP (needs softprompt[serve])",
}
PRECEDENCE = (
    "Each setting comes from the first of: a flag on the command line, a --config file, the "
    "--preset, the default shown. A run's own train_config.json is a valid --config (its "
    "dtype_requested is ignored; dtype is the type the run resolved --dtype to)."
)
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "sse_starlette", "pydantic_settings")


# --------------------------------------------------------------------------- train and cv


def _train_parser(command: str):
    from .config import PRESETS, TrainConfig
    from .flags import settings_parser

    presets = "; ".join(
        f"{name}: " + (" ".join(_as_flags(values)) or "the defaults")
        for name, values in PRESETS.items()
    )
    note = f" {presets} (the defaults are the recommended recipe, docs/accuracy.md; guide: the PEFT guide's)"  # fmt: skip
    return settings_parser(
        command,
        [TrainConfig, _flags_class(command)],
        f"{HELP[command]}. {PRECEDENCE}",
        {"preset": note},  # fmt: skip
    )


def _flags_class(command: str):
    from .settings import CvFlags, TrainFlags

    return TrainFlags if command == "train" else CvFlags


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
    from .config import TrainConfig
    from .flags import check, parse, settings_fields

    flags_cls, fields = _flags_class(command), settings_fields(TrainConfig)
    flags = parse(_train_parser(command), argv)
    files = flags.pop("config", [])
    flags = {
        **check(TrainConfig, {k: v for k, v in flags.items() if k in fields}),
        **check(flags_cls, {k: v for k, v in flags.items() if k not in fields}),
    }
    values: dict = {}
    for path in files:
        values.update(_read_config(command, path))
    values.update(flags)
    rest = {s.name: s.default for s in settings_fields(flags_cls).values() if s.name != "config"}
    rest.update({k: v for k, v in values.items() if k not in fields})
    return argparse.Namespace(given={k: v for k, v in values.items() if k in fields}, **rest)


def _read_config(command: str, path: str) -> dict:
    """The settings in a --config file: every key a flag's name, every value of its flag's
    type; `dtype_requested` (in train_config.json: the --dtype asked for, e.g. auto) is
    dropped."""
    from .config import TrainConfig
    from .flags import read_file, settings_fields, unknown_key

    classes = (TrainConfig, _flags_class(command))
    try:
        values, other = read_file(path, classes)
        other.pop("dtype_requested", None)
        for key in [*other, *(["config"] if "config" in values else [])]:
            known = [k for cls in classes for k in settings_fields(cls) if k not in ("extra", "config")]  # fmt: skip
            raise unknown_key(key, known, command)
    except SoftpromptError as e:
        raise SoftpromptError(f"--config {path}: {e}") from None
    return values


def _train_config(args: argparse.Namespace):
    """The TrainConfig of `train` / `cv`: the --preset's values (if any), then the given ones."""
    from .config import TrainConfig, preset_config

    given = args.given
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
    how = " (calibrated)" if r.bias or r.thresholds else ""
    where = f"; final run{how} in {r.final.out}" if r.final else ""
    print(f"cross-validation report in {r.out / 'cv.json'}: best epoch {r.best_epoch}{where}")
    return 0


# --------------------------------------------------------------------------- eval and predict


def _load(cfg: EvalConfig | PredictConfig):
    from .modeling.load import dtype_line
    from .pipeline import SoftPrompt

    if cfg.progress:  # on stderr: stdout carries the results
        print(dtype_line(cfg.dtype, cfg.device), file=sys.stderr)
    labels = [s.strip() for s in cfg.labels.split(",") if s.strip()] if cfg.labels else None
    return SoftPrompt.load(
        cfg.adapter,
        base_model=cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        labels=labels,
        template=cfg.template,
        text_column=cfg.text_column,
        trust_remote_code=cfg.trust_remote_code,
        ensemble=cfg.ensemble,
    )


def _check_output(path: str | None, overwrite: bool, flag: str = "--output") -> None:
    if path is None:
        return
    if Path(path).suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise SoftpromptError(f"{flag} {path}: use a .csv or .jsonl file name")
    if Path(path).exists() and not overwrite:
        raise SoftpromptError(
            f"{flag} {path} already exists; pass --overwrite to replace it, or choose another name"
        )


def _decoding(cfg: EvalConfig | PredictConfig) -> dict:
    """The generation options of eval and predict, checked."""
    if cfg.num_beams < 1:
        raise SoftpromptError(f"--num-beams must be at least 1 (got {cfg.num_beams})")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise SoftpromptError(f"--max-new-tokens must be at least 1 (got {cfg.max_new_tokens})")
    return dict(
        max_new_tokens=cfg.max_new_tokens,
        num_beams=cfg.num_beams,
        length_penalty=cfg.length_penalty,
        stop=cfg.stop,
    )


def cmd_eval(cfg: EvalConfig) -> int:
    from .data import check_labels, load_table
    from .files import atomic_write_json

    _check_output(cfg.output, cfg.overwrite)
    _check_output(cfg.outputs, cfg.overwrite, flag="--outputs")
    decoding = _decoding(cfg)
    sp = _load(cfg)
    if not sp.task.generates:
        sp._need_labels()
    label_col = cfg.label_column or sp.task.label_column or "label"
    sep = (sp.task.label_separator or ",") if sp.task.multilabel else None
    table = load_table(
        cfg.data, sp.task.text_column, label_col, subset=cfg.subset, split=cfg.split, separator=sep
    )
    if not sp.task.generates:
        check_labels(table, sp.task.label_names, "--data")
    rows: list[dict] = []
    m = sp.evaluate(
        table.texts,
        table.labels,
        generate=cfg.generate,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
        calibrated=cfg.calibration,
        outputs=rows if cfg.outputs else None,
        **decoding,
    )
    print(json.dumps(m, indent=2))
    if cfg.output:
        atomic_write_json(Path(cfg.output), m)
    if cfg.outputs:
        if Path(cfg.outputs).suffix.lower() == ".csv":  # a cell holds one text
            join = sep or " ||| "  # a label set's names, or a generation input's references
            rows = [{k: join.join(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]  # fmt: skip
        _write_rows(Path(cfg.outputs), rows)
        print(f"wrote {len(rows)} outputs to {cfg.outputs}", file=sys.stderr)
    return 0


def cmd_predict(cfg: PredictConfig) -> int:
    from .data import load_table

    if not cfg.texts and not cfg.data:
        raise SoftpromptError("give texts to classify, or --data with a file of them")
    _check_output(cfg.output, cfg.overwrite)
    sp = _load(cfg)
    texts = list(cfg.texts)
    if cfg.data:
        column = sp.task.text_column
        texts += load_table(
            cfg.data, column, None, subset=cfg.subset, split=cfg.split, need_labels=False
        ).texts
    progress = cfg.progress and len(texts) > cfg.batch_size
    decoding = _decoding(cfg)
    if cfg.generate or sp.task.generates:
        outs = sp.generate(texts, batch_size=cfg.batch_size, progress=progress, **decoding)
        rows = [{"text": t, "generated": o} for t, o in zip(texts, outs, strict=True)]
    else:
        preds = sp.classify(
            texts, batch_size=cfg.batch_size, progress=progress, calibrated=cfg.calibration
        )
        key = "labels" if sp.task.multilabel else "label"  # multilabel: the chosen labels' list
        rows = [
            {
                "text": t,
                key: p[key],
                **{f"p({k})": round(v, 6) for k, v in p["probabilities"].items()},
            }
            for t, p in zip(texts, preds, strict=True)
        ]
    if cfg.output:
        if Path(cfg.output).suffix.lower() == ".csv" and sp.task.multilabel:  # one text a cell
            sep = sp.task.label_separator or ","
            rows = [{**r, "labels": sep.join(r["labels"])} for r in rows]
        _write_rows(Path(cfg.output), rows)
        print(f"wrote {len(rows)} predictions to {cfg.output}")
    else:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    return 0


def _write_rows(path: Path, rows: list[dict]) -> None:
    import io

    from .files import atomic_write_bytes

    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode())


def cmd_push(cfg: PushConfig) -> int:
    from .hub import push_to_hub

    url = push_to_hub(cfg.adapter, cfg.repo_id, private=cfg.private, token=cfg.token)
    print(f"pushed {cfg.adapter} to {url}")
    return 0


def cmd_serve(cfg: ServeConfig) -> int:
    from .serve import run_server

    run_server(cfg)
    return 0


# --------------------------------------------------------------------------- dispatch


COMMANDS = {
    "train": cmd_train,
    "cv": cmd_cv,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "push": cmd_push,
    "serve": cmd_serve,
}


def settings_class(command: str):
    """The settings class of a subcommand but train and cv."""
    if command == "serve":
        import importlib.util

        missing = [m for m in SERVE_MODULES if not importlib.util.find_spec(m)]
        if missing:
            raise SoftpromptError(
                f"`softprompt serve` needs {', '.join(missing)}: pip install 'softprompt[serve]'"
            )
        from .serve.settings import ServeConfig

        return ServeConfig
    from .settings import EvalConfig, PredictConfig, PushConfig

    return {"eval": EvalConfig, "predict": PredictConfig, "push": PushConfig}[command]


def parse_command(command: str, argv: list[str]):
    """The settings object of `softprompt COMMAND ARGV` (train and cv: a Namespace)."""
    if command in ("train", "cv"):
        return parse_train_args(command, argv)
    from .flags import build, parse, settings_parser

    cls = settings_class(command)
    given = parse(settings_parser(command, [cls], f"{HELP[command]}."), argv)
    return cls(**given) if hasattr(cls, "model_fields") else build(cls, given)


def _quiet_loading() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(
            prog="softprompt", description="Prompt tuning for frozen causal language models."
        )
        sub = parser.add_subparsers(dest="command", required=True)
        for command, help_ in HELP.items():
            sub.add_parser(command, help=help_, add_help=False)
        parser.parse_args(argv)  # prints usage or help, and exits
    command = argv[0]
    try:
        args = parse_command(command, argv[1:])
        train = command in ("train", "cv")
        if not (args.given.get("progress", True) if train else getattr(args, "progress", True)):
            _quiet_loading()
        from .log import show_log

        # what a run says as it works: plain lines, on stdout for train and cv (their output),
        # on stderr for the commands whose stdout is results (serve sets up its own log)
        if command != "serve":
            show_log(sys.stdout if train else sys.stderr)
        return COMMANDS[command](args)
    except SoftpromptError as e:
        print(f"softprompt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

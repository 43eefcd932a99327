"""How far apart two doors, or two training set-ups, land when the base model runs in bfloat16:
the measurements behind the bounds in tests/bounds.py (docs/models.md, "Precision").

    python bench/bf16_bounds.py doors --seeds 20        # label probabilities, door against door
    python bench/bf16_bounds.py train --seeds 4         # 2 processes vs 1, checkpointed vs not
    python bench/bf16_bounds.py train --seeds 5 --heads linear,pooled   # the same with a head

`doors`, per seed (the seed makes the tiny model and the adapters), on the test suite's tiny
models (tests/conftest.py, tests/families.py) in bfloat16 and float32:
- the API / `predict` (`Engine.classify`: rows sorted by length, batches of 32) against one
  server request (`Engine.label_probabilities`, the rows in the request's order) and against a
  server batch that mixes every adapter kind (tests/test_doors.py's mix), for a plain prompt,
  one with suffix tokens, a calibrated one and an ensemble, on tiny Llama and GPT-2;
- the same API-against-request pair for every family of tests/families.py (prompt + suffix), and
  for a deep prompt (prefix) on tiny Llama.
Also the smallest gap between the two label probabilities (a label can only differ between
doors where that gap is below the difference).

`train`, per seed: `softprompt train` as tests/test_train.py runs it (tiny Llama, the guide's
settings, 2 epochs), bfloat16 forced (SOFTPROMPT_AUTO_DTYPE), one process against two (torchrun,
data parallel and --fsdp, the tests' batch and hold-out settings) and plain against
--gradient-checkpointing (1 epoch): the largest difference of the saved prompts (also relative
to how far the prompt moved from its init), of a classification head's weight and bias
(`--heads`: each value trains every pair once more with that `--head`), of the per-epoch
losses, and of eval accuracy.
Results as JSON on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

LABELS = ["complaint", "no complaint"]
TEXTS = [  # tests/test_doors.py's texts
    "@ZephyrMobile no signal for three days and nobody answers",
    "thanks, lovely service today",
    "@NorthRailUK the 8:05 was cancelled again, third time this week. Refund please",
    "ok",
    "my parcel never arrived " * 12,
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _task(suffix: int):
    from softprompt.data import Task

    return Task(text_column="Tweet text", label_names=LABELS, max_length=40, suffix_tokens=suffix)


def _predictors(model, tok, seed: int) -> dict:
    """The four kinds of tests/test_doors.py: plain, suffix, calibrated, ensemble (3 suffix
    members and a bias); and a deep prompt."""
    from softprompt.forward.kv import kv_to_prefix, prompt_kv
    from softprompt.predictors import predictor_for_prompt
    from softprompt.prompt import init_prompt

    def prompt(s: int, n: int) -> torch.Tensor:
        return init_prompt(model, tok, n, "vocab", seed=1000 * seed + s)

    out = {
        "plain": predictor_for_prompt(model, tok, prompt(1, 4), _task(0), name="plain"),
        "suffix": predictor_for_prompt(model, tok, prompt(2, 7), _task(3), name="suffix"),
        "calibrated": predictor_for_prompt(
            model, tok, prompt(3, 4), _task(0), bias=[1.5, 0.0], name="calibrated"
        ),
        "ensemble": predictor_for_prompt(
            model,
            tok,
            torch.stack([prompt(s, 7) for s in (4, 5, 6)]),
            _task(3),
            bias=[-0.8, 0.0],
            name="ensemble",
        ),
    }
    with torch.no_grad():
        deep = kv_to_prefix(prompt_kv(model, prompt(7, 4)))[0]
    out["prefix"] = predictor_for_prompt(model, tok, deep, _task(0), name="prefix", kind="prefix")
    return out


@torch.no_grad()
def _door_gaps(model, tok, predictors: dict, texts, mixed: bool) -> dict:
    """Per kind: (largest |API - request| , largest |API - mixed batch|, smallest label gap)."""
    from softprompt.engine import Engine
    from softprompt.predictors import ClassifyRow

    engine = Engine(model, tok)
    api, request = {}, {}
    for kind, pred in predictors.items():
        api[kind] = engine.classify(pred, texts)
        rows = [ClassifyRow(pred, engine.encode(pred, t)[0]) for t in texts]
        request[kind] = torch.stack(engine.label_probabilities(rows))
    mix = {}
    if mixed:
        kinds = [k for k in predictors if k != "prefix"]
        order = [kinds[i % len(kinds)] for i in range(3 * len(kinds))]
        ts = [texts[i % len(texts)] for i in range(len(order))]
        rows = [
            ClassifyRow(predictors[k], engine.encode(predictors[k], t)[0])
            for k, t in zip(order, ts, strict=True)
        ]
        for k, t, p in zip(order, ts, engine.run(rows), strict=True):
            d = (torch.tensor(p) - api[k][texts.index(t)]).abs().max().item()
            mix[k] = max(mix.get(k, 0.0), d)
    return {
        kind: {
            "request": (request[kind] - api[kind]).abs().max().item(),
            "mixed": mix.get(kind),
            "label_gap": (api[kind][:, 0] - api[kind][:, 1]).abs().min().item(),
        }
        for kind in predictors
    }


def doors(seeds: int) -> dict:
    from conftest import make_model, make_tokenizer
    from families import FAMILIES, family_model

    torch.set_num_threads(1)
    tok = make_tokenizer()
    out: dict = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        got: dict = {}
        for seed in range(seeds):
            for arch in ("llama", "gpt2"):
                model = make_model(arch, len(tok), seed=seed).to(dtype)
                gaps = _door_gaps(model, tok, _predictors(model, tok, seed), TEXTS, mixed=True)
                for kind, g in gaps.items():
                    got.setdefault(f"{arch}/{kind}", []).append(g)
            for fam in FAMILIES:
                model = family_model(fam, len(tok), seed=seed).to(dtype)
                preds = _predictors(model, tok, seed)
                gaps = _door_gaps(model, tok, {"suffix": preds["suffix"]}, TEXTS[:3], mixed=False)
                got.setdefault(f"family {fam}", []).append(gaps["suffix"])
            log(f"doors {name}: seed {seed} done")
        out[name] = {
            key: {
                "largest_request": max(g["request"] for g in v),
                "largest_mixed": max((g["mixed"] or 0.0) for g in v),
                "smallest_label_gap": min(g["label_gap"] for g in v),
            }
            for key, v in got.items()
        }
        out[name]["ALL"] = {
            f: max(v[f] for k, v in out[name].items() if k != "ALL")
            for f in ("largest_request", "largest_mixed")
        }
    return out


# --------------------------------------------------------------------------- training


def _train(argv: list[str], procs: int, env: dict) -> None:
    if procs == 1:
        cmd = [sys.executable, "-m", "softprompt.cli", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        cmd += ["--standalone", "-m", "softprompt.cli", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])


def _compare(a: Path, b: Path, init: torch.Tensor) -> dict:
    from safetensors.torch import load_file

    def prompt(f: Path) -> torch.Tensor:
        return load_file(str(f / "adapter_model.safetensors"))["prompt_embeddings"]

    def head(f: Path) -> dict[str, torch.Tensor]:
        tensors = load_file(str(f / "adapter_model.safetensors"))
        return {k: v.float() for k, v in tensors.items() if k != "prompt_embeddings"}

    def records(f: Path) -> list[dict]:
        return [json.loads(x) for x in (f / "metrics.jsonl").read_text().splitlines()]

    out = {}
    for sub in ("", "last"):
        pa, pb = prompt(a / sub), prompt(b / sub)
        out[f"prompt{'/' + sub if sub else ''}"] = {
            "max_abs": (pa - pb).abs().max().item(),
            "moved_max_abs": (pa - init).abs().max().item(),
            "rel_to_move": ((pa - pb).norm() / (pa - init).norm()).item(),
        }
        ha, hb = head(a / sub), head(b / sub)
        for key in ha:
            out[f"{key}{'/' + sub if sub else ''}"] = {
                "max_abs": (ha[key] - hb[key]).abs().max().item(),
                "max": ha[key].abs().max().item(),
            }
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_macro_f1"):
        pairs = [(x.get(key), y.get(key)) for x, y in zip(records(a), records(b), strict=True)]
        if all(x is not None for x, _ in pairs):
            out[key] = max(abs(x - y) for x, y in pairs)
    return out


def train(seeds: list[int], dtype: str, heads: list[str]) -> dict:
    from conftest import DEMO, make_model, make_tokenizer
    from test_cli import train_args

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["SOFTPROMPT_AUTO_DTYPE"] = dtype
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    demo = DEMO / "complaints_train.csv"
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bf16-bounds-") as tmp:
        tmp = Path(tmp)
        tok = make_tokenizer()
        model_dir = tmp / "tiny-llama"
        make_model("llama", len(tok)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        for seed, head in [(s, h) for h in heads for s in seeds]:
            for name, extra, procs in (
                ("ddp", ["--batch-size", "7", "--eval-fraction", "0.25"], 2),
                (
                    "fsdp",
                    ["--batch-size", "4", "--eval-fraction", "0.22", "--eval-batch-size", "1"],
                    2,
                ),
                ("ckpt", ["--epochs", "1"], 1),
            ):
                base = train_args(demo, model_dir, tmp / "x", "--seed", str(seed), "--head", head)
                name = name if head == "none" else f"{name}-{head}"
                if not name.startswith("ckpt"):
                    i = base.index("--batch-size")
                    del base[i : i + 2]
                    base += [*extra, "--grad-accum", "2"]
                else:
                    base += extra
                one, two = tmp / f"{name}-{seed}-a", tmp / f"{name}-{seed}-b"
                argv1 = [a if a != str(tmp / "x") else str(one) for a in base]
                argv2 = [a if a != str(tmp / "x") else str(two) for a in base]
                if name.startswith("fsdp"):
                    argv2.append("--fsdp")
                if name.startswith("ckpt"):
                    argv2.append("--gradient-checkpointing")
                _train(argv1, 1, env)
                _train(argv2, procs, env)
                # the init: epoch 0 is not saved; the prompt's text init is the same for both
                with contextlib.redirect_stdout(io.StringIO()):
                    init = _init_of(one, model_dir)
                out.setdefault(name, []).append({"seed": seed, **_compare(one, two, init)})
                log(f"train {dtype} {name} seed {seed}: {out[name][-1]}")
    return out


def _init_of(run: Path, model_dir: Path) -> torch.Tensor:
    """The run's initial prompt, rebuilt as training builds it (same settings, same seed)."""
    from softprompt.modeling.load import load_base
    from softprompt.prompt import init_prompt

    cfg = json.loads((run / "train_config.json").read_text())
    model, tok, _ = load_base(str(model_dir), dtype="float32")
    P, how = cfg["num_virtual_tokens"], cfg["init"]
    return init_prompt(model, tok, P, how, text=cfg["init_text"], seed=cfg["seed"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("doors", "train"))
    ap.add_argument("--seeds", type=int, default=10, help="doors: seeds 0..N-1; train: N seeds")
    ap.add_argument("--dtype", default="bfloat16", help="train: what auto resolves to")
    ap.add_argument("--heads", default="none", help="train: --head values, comma-separated")
    args = ap.parse_args(argv)
    if args.what == "doors":
        result = doors(args.seeds)
    else:
        result = train([42, 1, 2, 3, 4, 5, 6, 7][: args.seeds], args.dtype, args.heads.split(","))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

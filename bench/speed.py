"""Speed benchmark: softprompt's `train()` and classifier against the PEFT guide, side by side.

    python bench/speed.py                             # P = 8 32 100, 3 timed epochs, 2 rounds
    python bench/speed.py --quick                     # smoke run: 16 train rows, 32 dev tweets
    python bench/speed.py --dtypes float32,bfloat16   # everything once per base-model dtype
    python bench/speed.py --dtypes float32,bfloat16 --softprompt-only --threads 1  # dtype gain

On the RAFT twitter_complaints data (train.csv, dev.csv), for each base-model dtype:

1. Training, per number of virtual tokens P, each (system, P) in a fresh spawned process:
   seconds per epoch (1 warm-up epoch, the median of the timed ones, then the median over
   rounds; the rounds alternate which system goes first) and the process's peak memory
   (`ru_maxrss`; on CUDA, peak allocated).
   - softprompt: the library's `softprompt.train` with the guide's settings; seconds from
     `result.history[i]["epoch_seconds"]` (the loop's own clock: its batches, not the adapter
     and checkpoint it writes after each epoch).
   - PEFT: the guide "Prompt tuning for causal language modeling" as written.
2. Classification of the dev tweets with softprompt's trained prompt of the first P: the guide's
   `generate` (6 new tokens, exact match) against softprompt's engine (rank
   classification) and `generate_texts` (the guide's method in softprompt's engine).

3. The raw forward: a no-grad forward of the frozen model over RAW_BATCH x RAW_TOKENS random
   tokens (the median of RAW_REPEATS after a warm-up), in its own process per dtype: what the
   dtype alone gives this machine; and the same forward with a backward to the input embeddings
   (what training asks of the frozen model: the dtype's gain there is what its backward
   kernels allow). With several dtypes the side-by-side table puts softprompt's
   speed-up of each measure next to the raw forward's, as a share of it ("share of raw gain":
   softprompt's speed-up / the raw forward's; 1.0 = softprompt gains all the dtype gives), by
   the wall clock and by the process's CPU time (steadier where other work shares the cores).

`--softprompt-only` skips PEFT (training and `generate`) and softprompt's `generate`: softprompt's
training, its label scoring and the raw forward, for the dtype comparison.

That the two systems compute the same thing (init, loss, gradient, greedy generation) is
tested in tests/test_model.py, not measured here. Tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import peft
import torch
import transformers
from common import LABEL_COLUMN, LABEL_NAMES, TEXT_COLUMN, markdown_table, tweet_task
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from torch.utils.data import DataLoader
from transformers import default_data_collator, get_linear_schedule_with_warmup

from softprompt import TrainConfig, load_base, train
from softprompt.metrics import metrics
from softprompt.modeling.builtin import default_model_dir
from softprompt.training import Callback

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "raft_twitter_complaints"
INIT_TEXT = "Classify if the tweet is a complaint or not:"
MAX_LENGTH, BATCH_SIZE, LR = 64, 8, 3e-2
GEN_BATCH_SIZE, GEN_MAX_NEW_TOKENS, CLASSIFY_BATCH_SIZE = 16, 6, 32
RAW_BATCH, RAW_TOKENS, RAW_REPEATS = 32, 72, 3
SYSTEMS = ("peft", "softprompt")


def _classify(model, tokenizer, prompt, task, texts) -> list[str]:
    """softprompt's label scoring through its engine (what `softprompt eval` runs)."""
    from softprompt.engine import Engine
    from softprompt.predictors import predictor_for_prompt

    predictor = predictor_for_prompt(model, tokenizer, prompt, task)
    probs = Engine(model, tokenizer).classify(predictor, texts, batch_size=CLASSIFY_BATCH_SIZE)
    return [task.label_names[i] for i in probs.argmax(-1).tolist()]


def _generate(model, tokenizer, prompt, task, texts, **kw) -> list[str]:
    """softprompt's free generation through its engine (`softprompt eval --generate`)."""
    from softprompt.engine import Engine
    from softprompt.predictors import predictor_for_prompt

    predictor = predictor_for_prompt(model, tokenizer, prompt, task)
    return Engine(model, tokenizer).generate(predictor, texts, **kw)


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_csv(path) -> tuple[list[str], list[str]]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return list(frame[TEXT_COLUMN]), [s.strip() for s in frame[LABEL_COLUMN]]


# ---------------------------------------------------------------------------------------------
# in a worker process


def _setup(job: dict):
    """Threads, seed and the frozen base model in job["dtype"]."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Position ids are not supported")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    model, tokenizer, _ = load_base(None, dtype=job["dtype"], device=job["device"])
    weight = model.get_input_embeddings().weight
    return model, tokenizer, weight.device, str(weight.dtype).removeprefix("torch.")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float:
    """This process's peak memory so far: resident set (CPU) or CUDA memory allocated."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _peft_config(P: int):
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        num_virtual_tokens=P,
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=str(default_model_dir()),
    )


def _guide_rows(tokenizer, texts, labels) -> list[dict]:
    """The guide's `preprocess_function`: input and label tokenised separately, label + end
    token, every row LEFT-padded to MAX_LENGTH and cut `[:MAX_LENGTH]`."""
    inputs = tokenizer([f"{TEXT_COLUMN} : {x} Label : " for x in texts])["input_ids"]
    targets = tokenizer([str(y) for y in labels])["input_ids"]
    rows = []
    for x, y in zip(inputs, targets, strict=True):
        y = y + [tokenizer.eos_token_id]  # the guide appends pad_token_id; SmolLM2's pad is eos
        ids, lab = x + y, [-100] * len(x) + y
        pad = MAX_LENGTH - len(ids)
        row = {
            "input_ids": [tokenizer.pad_token_id] * pad + ids,
            "attention_mask": [0] * pad + [1] * len(ids),
            "labels": [-100] * pad + lab,
        }
        rows.append({k: torch.tensor(v[:MAX_LENGTH]) for k, v in row.items()})
    return rows


def _train_peft(job, model, tokenizer, device):
    """The guide's training loop; returns (seconds of each epoch, CPU seconds of each, last
    epoch's loss, None)."""
    model = get_peft_model(model, _peft_config(job["P"]))
    loader = DataLoader(
        _guide_rows(tokenizer, *read_csv(job["train_csv"])),
        shuffle=True,
        collate_fn=default_data_collator,
        batch_size=BATCH_SIZE,
        pin_memory=device.type == "cuda",
    )
    epochs = 1 + job["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=0, num_training_steps=len(loader) * epochs
    )
    seconds, cpu = [], []
    for _ in range(epochs):
        model.train()
        total = 0.0
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            total += loss.detach().float()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return seconds, cpu, float(total) / len(loader), None


class _CpuClock(Callback):
    """The process's CPU seconds at the end of each epoch (after its files: a few ms)."""

    def __init__(self):
        self.marks = [time.process_time()]

    def on_epoch(self, run, state, record) -> None:
        self.marks.append(time.process_time())


def _train_softprompt(job, model, tokenizer, device):
    """The library's `train()`; returns (seconds of each epoch, CPU seconds of each, last
    epoch's loss, prompt)."""
    cfg = TrainConfig(
        data=job["train_csv"],
        text_column=TEXT_COLUMN,
        label_column=LABEL_COLUMN,
        out=str(Path(job["tmp"]) / f"softprompt-P{job['P']}"),
        overwrite=True,
        model=str(default_model_dir()),
        num_virtual_tokens=job["P"],
        head="none",  # label words, as PEFT's guide trains
        suffix_tokens=0,
        init="text",
        init_text=INIT_TEXT,
        lr=LR,
        epochs=1 + job["epochs"],
        batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        balance=False,
        eval_fraction=0.0,
        progress=False,
        seed=job["seed"],
    )
    clock = _CpuClock()
    result = train(cfg, model, tokenizer, callbacks=[clock])
    seconds = [r["epoch_seconds"] for r in result.history]
    cpu = [b - a for a, b in itertools.pairwise(clock.marks)]
    prompt = result.prompt.float().cpu().tolist()
    return seconds, cpu, result.history[-1]["train_loss"], prompt


def train_job(job: dict) -> dict:
    """One (system, P) training run, in a fresh process: timings, peak memory, last loss."""
    with contextlib.redirect_stdout(sys.stderr):  # train() prints; stdout is for the tables
        model, tokenizer, device, dtype = _setup(job)
        before = _peak_mb(device)
        run = _train_softprompt if job["system"] == "softprompt" else _train_peft
        seconds, cpu, loss, prompt = run(job, model, tokenizer, device)
        peak = _peak_mb(device)
    log(f"  epochs {', '.join(f'{s:.2f}s' for s in seconds)} (first: warm-up); peak {peak:.0f} MB")
    return {
        "dtype": dtype,
        "epoch_seconds": seconds[1:],
        "seconds_per_epoch": statistics.median(seconds[1:]),
        "cpu_seconds_per_epoch": statistics.median(cpu[1:]),
        "final_loss": loss,
        "peak_mb": peak,
        "training_mb": peak - before,
        "prompt": prompt,
    }


def _guide_generate(model, tokenizer, texts, device) -> list[str]:
    """The guide's inference, batched: generate after the template (left-padded), decode the
    new tokens, strip."""
    out = []
    for s in range(0, len(texts), GEN_BATCH_SIZE):
        inputs = [f"{TEXT_COLUMN} : {x} Label : " for x in texts[s : s + GEN_BATCH_SIZE]]
        enc = tokenizer(inputs, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            outputs = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=GEN_MAX_NEW_TOKENS,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = outputs[:, enc["input_ids"].shape[1] :].cpu()
        out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


def classify_job(job: dict) -> dict:
    """Tweets per second and scores of the dev tweets, three ways, in a fresh process."""
    with contextlib.redirect_stdout(sys.stderr):
        model, tokenizer, device, dtype = _setup(job)
    texts, gold = read_csv(job["dev_csv"])
    task, prompt = tweet_task(MAX_LENGTH), torch.tensor(job["prompt"], device=device)
    out = {"dtype": dtype, "n": len(texts), "P": job["P"]}

    def timed(name: str, predict) -> None:
        log(f"classification: {name}, {len(texts)} tweets")
        predict(texts[:GEN_BATCH_SIZE])  # warm-up
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        pred = predict(texts)
        _sync(device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = metrics(gold, pred, LABEL_NAMES)
        keep = ("accuracy", "macro_f1", "invalid")
        out[name] = {"seconds": seconds, "tweets_per_second": len(texts) / seconds}
        out[name]["tweets_per_cpu_second"] = len(texts) / cpu
        out[name].update({k: m[k] for k in keep})

    timed(
        "softprompt classify",
        lambda t: _classify(model, tokenizer, prompt, task, t),
    )
    if job.get("softprompt_only"):
        return out
    gen = {"max_new_tokens": GEN_MAX_NEW_TOKENS, "batch_size": GEN_BATCH_SIZE}
    timed("softprompt generate", lambda t: _generate(model, tokenizer, prompt, task, t, **gen))
    peft_model = get_peft_model(model, _peft_config(job["P"]))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt)
    peft_model.eval()
    tokenizer.padding_side = "left"
    timed("PEFT generate", lambda t: _guide_generate(peft_model, tokenizer, t, device))
    return out


def raw_forward_job(job: dict) -> dict:
    """Seconds of one no-grad forward of the frozen model over RAW_BATCH x RAW_TOKENS tokens."""
    with contextlib.redirect_stdout(sys.stderr):
        model, tokenizer, device, dtype = _setup(job)
    g = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(0, len(tokenizer), (RAW_BATCH, RAW_TOKENS), generator=g).to(device)
    seconds, cpu = [], []
    with torch.no_grad():
        for _ in range(1 + RAW_REPEATS):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            model(input_ids=ids, use_cache=False)
            _sync(device)
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    log(f"raw forward {dtype}: {', '.join(f'{s:.3f}s' for s in seconds)} (first: warm-up)")
    # forward + backward to the input embeddings (what training needs of the frozen model)
    embeds = model.get_input_embeddings()(ids).detach()
    back, back_cpu = [], []
    for _ in range(1 + RAW_REPEATS):
        x = embeds.clone().requires_grad_(True)
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        hidden = model.get_decoder()(inputs_embeds=x, use_cache=False).last_hidden_state
        hidden.float().square().mean().backward()
        _sync(device)
        back.append(time.perf_counter() - t0)
        back_cpu.append(time.process_time() - c0)
    log(f"raw forward+backward {dtype}: {', '.join(f'{s:.3f}s' for s in back)} (first: warm-up)")
    return {
        "dtype": dtype,
        "seconds": statistics.median(seconds[1:]),
        "cpu_seconds": statistics.median(cpu[1:]),
        "runs": seconds[1:],
        "backward_seconds": statistics.median(back[1:]),
        "backward_cpu_seconds": statistics.median(back_cpu[1:]),
    }


# ---------------------------------------------------------------------------------------------
# the orchestrator


def isolated(fn, job: dict) -> dict:
    """fn(job) in a fresh spawned process, so that its peak memory is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, job).result()


def measure(base: dict, args: argparse.Namespace) -> dict:
    """All training runs and the classification run for base["dtype"]."""
    runs: dict[tuple[str, int], list[dict]] = {}
    systems = ("softprompt",) if args.softprompt_only else SYSTEMS
    for P in args.tokens:
        for rnd in range(args.rounds):
            for system in systems if rnd % 2 == 0 else systems[::-1]:
                log(f"training: {system}, P={P}, {base['dtype']}, round {rnd + 1}/{args.rounds}")
                job = {**base, "system": system, "P": P}
                runs.setdefault((system, P), []).append(isolated(train_job, job))
    training = {}
    for (system, P), rs in runs.items():
        training[f"{system} P={P}"] = {
            "system": system,
            "P": P,
            "dtype": rs[0]["dtype"],
            **{
                k: statistics.median(r[k] for r in rs)
                for k in ("seconds_per_epoch", "cpu_seconds_per_epoch", "final_loss")
            },
            **{k: max(r[k] for r in rs) for k in ("peak_mb", "training_mb")},
            "runs": [{k: v for k, v in r.items() if k != "prompt"} for r in rs],
        }
    classification = None
    if not args.skip_classify:
        P = args.tokens[0]
        prompt = runs[("softprompt", P)][0]["prompt"]
        job = {**base, "P": P, "prompt": prompt, "softprompt_only": args.softprompt_only}
        classification = isolated(classify_job, job)
    log(f"raw forward: {base['dtype']}")
    raw = isolated(raw_forward_job, base)
    return {"training": training, "classification": classification, "raw_forward": raw}


def training_table(training: dict, tokens: list[int]) -> str:
    if not any(k.startswith("peft") for k in training):
        return markdown_table(
            ["P", "softprompt s/epoch", "softprompt peak MB (+training)", "final loss"],
            [
                [
                    P,
                    (sp := training[f"softprompt P={P}"])["seconds_per_epoch"],
                    f"{sp['peak_mb']:.0f} (+{sp['training_mb']:.0f})",
                    f"{sp['final_loss']:.4f}",
                ]
                for P in tokens
            ],
        )
    rows = []
    for P in tokens:
        pe, sp = training[f"peft P={P}"], training[f"softprompt P={P}"]
        rows.append(
            [
                P,
                pe["seconds_per_epoch"],
                sp["seconds_per_epoch"],
                f"{pe['seconds_per_epoch'] / sp['seconds_per_epoch']:.2f}x",
                f"{pe['peak_mb']:.0f} (+{pe['training_mb']:.0f})",
                f"{sp['peak_mb']:.0f} (+{sp['training_mb']:.0f})",
                f"{sp['peak_mb'] / pe['peak_mb']:.2f}",
                f"{pe['final_loss']:.4f}",
                f"{sp['final_loss']:.4f}",
            ]
        )
    head = ["P", "PEFT s/epoch", "softprompt s/epoch", "speed-up (PEFT s / softprompt s)"]
    head += ["PEFT peak MB (+training)", "softprompt peak MB (+training)"]
    head += ["peak softprompt / PEFT", "PEFT final loss", "softprompt final loss"]
    return markdown_table(head, rows)


def classification_table(c: dict) -> str:
    names = ("PEFT generate", "softprompt generate", "softprompt classify")
    if "PEFT generate" not in c:
        r = c["softprompt classify"]
        keys = ("tweets_per_second", "accuracy", "macro_f1", "invalid", "seconds")
        return markdown_table(
            ["system", "tweets/s", "accuracy", "macro-F1", "invalid", "seconds"],
            [["softprompt classify", *(r[k] for k in keys)]],
        )
    rows = [
        [n] + [c[n][k] for k in ("tweets_per_second", "accuracy", "macro_f1", "invalid", "seconds")]
        for n in names
    ]
    table = markdown_table(
        ["system", "tweets/s", "accuracy", "macro-F1", "invalid", "seconds"], rows
    )
    speed = {n: c[n]["tweets_per_second"] for n in names}
    return (
        f"{table}\n\nsoftprompt classify / PEFT generate tweets/s: "
        f"{speed['softprompt classify'] / speed['PEFT generate']:.2f}x; softprompt generate / "
        f"PEFT generate: {speed['softprompt generate'] / speed['PEFT generate']:.2f}x"
    )


def dtype_table(by_dtype: dict[str, dict]) -> str:
    """Each measure per dtype, with the speed-up over the first dtype and that speed-up as a share
    of the raw forward's (see the module's docstring), by the wall clock and by the process's
    CPU time (the steadier of the two on a machine shared with other work, at --threads 1)."""
    names = list(by_dtype)
    first = by_dtype[names[0]]
    measures = [
        ("raw forward", "raw_forward", None, ("seconds", "cpu_seconds"), False),
        (
            "raw forward+backward",
            "raw_forward",
            None,
            ("backward_seconds", "backward_cpu_seconds"),
            False,
        ),  # fmt: skip
    ]
    measures += [
        (f"train {k} s/epoch", "training", k, ("seconds_per_epoch", "cpu_seconds_per_epoch"), False)
        for k in first["training"]
    ]
    if first["classification"]:
        measures += [
            (
                f"{n} tweets/s",
                "classification",
                n,
                ("tweets_per_second", "tweets_per_cpu_second"),
                True,
            )  # fmt: skip
            for n in ("PEFT generate", "softprompt generate", "softprompt classify")
            if n in first["classification"]
        ]

    def value(d: str, part: str, key, field: str) -> float:
        at = by_dtype[d][part]
        return (at if key is None else at[key])[field]

    raw_gain = {}
    rows = []
    for clock, i in (("wall", 0), ("CPU", 1)):
        for label, part, key, fields, higher_is_faster in measures:
            v = [value(d, part, key, fields[i]) for d in names]
            gain = [(x / v[0] if higher_is_faster else v[0] / x) for x in v]
            if label == "raw forward":
                raw_gain[clock] = gain
            share = [g / r for g, r in zip(gain, raw_gain[clock], strict=True)]
            rows.append(
                [f"{label} ({clock})", *v, *(f"{g:.2f}x" for g in gain[1:])]
                + [f"{x:.2f}" for x in share[1:]]
            )
    head = ["measure", *names, *(f"{d} speed-up" for d in names[1:])]
    head += [f"{d}: share of raw gain" for d in names[1:]]
    return markdown_table(head, rows)


def machine(device: str | None) -> str:
    """The CPU (model name and the flags that decide bfloat16 speed), or the GPU."""
    from softprompt.modeling.load import _cpu_flags, bf16_hardware, pick_device

    dev = pick_device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} ({bf16_hardware(dev) or 'no bfloat16'})"
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")
    flags = [f for f in wanted if f in _cpu_flags()]
    return f"{name}, {len(os.sched_getaffinity(0))} CPUs, flags: {' '.join(flags) or 'none of ' + '/'.join(wanted)}"  # fmt: skip


def commit() -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip() or "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="softprompt vs PEFT speed (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="a smoke run (defaults in brackets)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 32, 100], help="values of P")
    ap.add_argument("--epochs", type=int, help="timed epochs after 1 warm-up [3; quick 1]")
    ap.add_argument("--rounds", type=int, help="runs per (system, P) [2; quick 1]")
    ap.add_argument("--train-rows", type=int, help="first N train tweets [all; quick 16]")
    ap.add_argument("--dev-rows", type=int, help="first N dev tweets [all; quick 32]")
    ap.add_argument("--dtypes", default="auto", help="base-model dtypes, e.g. float32,bfloat16")
    ap.add_argument("--device", help="cpu, cuda, ... [softprompt's pick]")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip-classify", action="store_true", help="training only")
    ap.add_argument(
        "--softprompt-only",
        action="store_true",
        help="no PEFT, no generation: softprompt's training and classify, and the raw forward",
    )
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="train.csv, dev.csv")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speed.json")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.train_rows = args.train_rows or (16 if args.quick else None)
    args.dev_rows = args.dev_rows or (32 if args.quick else None)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if min(args.epochs, args.rounds, args.threads, *args.tokens) < 1:
        ap.error("--epochs, --rounds, --threads and --tokens must be at least 1")
    for name in ("train.csv", "dev.csv"):
        if not (args.data_dir / name).is_file():
            ap.error(
                f"{args.data_dir / name} not found; pass --data-dir with train.csv and dev.csv"
            )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = str(args.threads)  # the spawned workers inherit these
    os.environ.update(
        OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false"
    )
    default_model_dir()  # convert the built-in model once, before the workers
    started, load = time.time(), os.getloadavg()
    by_dtype = {}
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        base = {"threads": args.threads, "seed": args.seed, "device": args.device, "tmp": tmp}
        base["epochs"] = args.epochs
        for split, n in (("train", args.train_rows), ("dev", args.dev_rows)):
            frame = pd.read_csv(args.data_dir / f"{split}.csv", dtype=str, keep_default_na=False)
            base[f"{split}_csv"] = str(Path(tmp) / f"{split}.csv")
            frame.head(n or len(frame)).to_csv(base[f"{split}_csv"], index=False)
        for dtype in args.dtypes:
            by_dtype[dtype] = measure({**base, "dtype": dtype}, args)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"threads: {args.threads}; load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print(f"machine: {machine(args.device)}; softprompt at {commit()}")
    print(
        f"train rows: {args.train_rows or 'all'}, batch {BATCH_SIZE}, 1 warm-up + {args.epochs} timed epochs, "
        f"{args.rounds} round(s), medians{'; QUICK smoke run' if args.quick else ''}"
    )
    for dtype, r in by_dtype.items():
        got = {t["dtype"] for t in r["training"].values()}
        name = dtype if got == {dtype} else f"{dtype} ({'/'.join(sorted(got))})"
        print(f"\n## Training, base model in {name} (seconds per epoch)\n")
        print(training_table(r["training"], args.tokens))
        if (c := r["classification"]) is not None:
            print(
                f"\n## Classification, {name} ({c['n']} dev tweets, softprompt's P={c['P']} prompt)\n"
            )
            print(classification_table(c))
    if len(by_dtype) > 1:
        print("\n## The dtypes side by side (seconds per epoch; tweets per second)\n")
        print(dtype_table(by_dtype))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"settings": settings, "wall_seconds": time.time() - started, "by_dtype": by_dtype}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

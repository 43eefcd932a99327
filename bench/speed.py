"""Speed benchmark: softprompt against the Hugging Face PEFT guide, side by side.

    python bench/speed.py                       # the full run (takes a while on a CPU)
    python bench/speed.py --quick               # a short smoke run (16 rows, 64 dev tweets)
    python bench/speed.py --tokens 8 32 100 --epochs 3 --threads 2 --out bench/results/speed.json
    python bench/speed.py --dtypes float32,bfloat16   # everything once per base-model dtype

Three measurements on the RAFT twitter_complaints data (train.csv: 50 tweets, dev.csv: 1000):

1. Training, for each number of virtual tokens P: seconds per epoch, peak memory and final
   train loss of
   - PEFT, exactly the recipe of the PEFT guide "Prompt tuning for causal language modeling"
     (every row left-padded to 64 tokens, full logits, `model(**batch).loss`), and
   - softprompt's own training step (`encode_rows` -> `batch_order` -> `collate_train` ->
     `label_loss`), the inner step of `softprompt.train.train` without its evaluation and files.
   Each (system, P) runs in its own process (this script with the hidden `--worker` flag), so
   the peak memory of one run is not hidden by another's; the systems alternate (PEFT, softprompt,
   then softprompt, PEFT) so machine drift hits both, and the median over rounds is reported.
2. Classification of the dev tweets with one prompt (softprompt's P=8 prompt from step 1):
   PEFT's guide inference (`model.generate`, 6 new tokens, exact-match to a label) against
   `softprompt.evaluate.classify` (rank classification).
3. The floor: one no-grad forward pass over exactly the real tokens of one epoch (prompt + row,
   batch size 1, no padding), to show how far each training epoch is from the bare compute.

With `--dtypes float32,bfloat16` all of it runs once per dtype of the frozen base model (PEFT
and softprompt alike; the prompts stay float32 in softprompt) and a last table sets the dtypes
side by side. The default, `auto`, is softprompt's own choice (bfloat16 where the CPU or GPU
has bfloat16 hardware, else float32). bfloat16 on a CPU without it is emulated and slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "raft_twitter_complaints"
TEXT_COLUMN = "Tweet text"
LABEL_COLUMN = "Label"
LABEL_NAMES = ["complaint", "no complaint"]
INIT_TEXT = "Classify if the tweet is a complaint or not:"
MAX_LENGTH = 64
BATCH_SIZE = 8
LR = 3e-2
GEN_BATCH_SIZE = 16
GEN_MAX_NEW_TOKENS = 6
CLASSIFY_BATCH_SIZE = 32
CLASSIFY_P = 8
CLASSIFY_FALLBACK_EPOCHS = 5
PARITY_TWEETS = 8
QUICK_TRAIN_ROWS = 16
QUICK_DEV_ROWS = 64
SEED = 42
RSS_INTERVAL_S = 0.005


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# data


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    """(texts, labels) of a RAFT CSV (columns `Tweet text,Label,ID`), every cell a string."""
    import pandas as pd

    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return list(frame[TEXT_COLUMN]), [s.strip() for s in frame[LABEL_COLUMN]]


def load_split(data_dir: Path, name: str, limit: int | None) -> tuple[list[str], list[str]]:
    path = data_dir / f"{name}.csv"
    if not path.is_file():
        raise SystemExit(f"speed.py: {path} not found; pass --data-dir with train.csv and dev.csv")
    texts, labels = read_csv(path)
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
    return texts, labels


def make_task():
    from softprompt.data import Task

    return Task(
        text_column=TEXT_COLUMN,
        label_names=list(LABEL_NAMES),
        label_column=LABEL_COLUMN,
        max_length=MAX_LENGTH,
    )


def peft_preprocess(tokenizer, texts, labels, max_length: int = MAX_LENGTH) -> list[dict]:
    """The guide's `preprocess_function`, row for row.

    Input and label are tokenised separately; the label gets the end token (the guide appends
    `pad_token_id`; for SmolLM2 pad and eos are the same id); every row is LEFT-padded to
    max_length and then cut with `[:max_length]` (which drops the label of a too-long row).
    """
    import torch

    inputs = [f"{TEXT_COLUMN} : {x} Label : " for x in texts]
    targets = [str(x) for x in labels]
    model_inputs = tokenizer(inputs)
    label_enc = tokenizer(targets)
    rows = []
    for i in range(len(texts)):
        sample_input_ids = model_inputs["input_ids"][i]
        label_input_ids = label_enc["input_ids"][i] + [tokenizer.eos_token_id]
        ids = sample_input_ids + label_input_ids
        lab = [-100] * len(sample_input_ids) + label_input_ids
        mask = [1] * len(ids)
        pad = max_length - len(ids)
        ids = [tokenizer.pad_token_id] * pad + ids
        mask = [0] * pad + mask
        lab = [-100] * pad + lab
        rows.append(
            {
                "input_ids": torch.tensor(ids[:max_length]),
                "attention_mask": torch.tensor(mask[:max_length]),
                "labels": torch.tensor(lab[:max_length]),
            }
        )
    return rows


def peft_config(tokenizer_path: str, num_virtual_tokens: int):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        num_virtual_tokens=num_virtual_tokens,
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=tokenizer_path,
    )


# --------------------------------------------------------------------------------------------
# memory and timing


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4096


PAGE = _page_size()


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc/self/statm; else ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc), so the baseline RSS is comparable between runs."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Samples RSS every 5 ms in a background thread: peak (absolute) and peak - baseline.

    ru_maxrss cannot be reset, so the peak of one phase is measured by sampling.
    """

    def __init__(self, interval: float = RSS_INTERVAL_S):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            r = rss_bytes()
            self.peak = max(self.peak, r)
            self.samples += 1
            self._stop.wait(self.interval)

    def start(self) -> None:
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return {
            "rss_before_mb": self.baseline / 2**20,
            "peak_rss_mb": self.peak / 2**20,
            "peak_rss_increase_mb": (self.peak - self.baseline) / 2**20,
            "rss_samples": self.samples,
        }


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuPeak:
    """Peak CUDA memory allocated during a phase, above what was allocated before it."""

    def __init__(self, device):
        self.device = device
        self.before = 0

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)

    def stop(self) -> dict:
        import torch

        if self.device.type != "cuda":
            return {}
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return {"gpu_peak_mb": peak / 2**20, "gpu_peak_increase_mb": (peak - self.before) / 2**20}


# --------------------------------------------------------------------------------------------
# the two training epochs


def peft_epoch(model, loader, optimizer, lr_scheduler, device) -> float:
    """One epoch of the guide's training loop; returns the row-weighted mean batch loss."""
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs = model(**batch)
        loss = outputs.loss
        total += loss.detach().float() * len(batch["input_ids"])
        count += len(batch["input_ids"])
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return float(total) / count


def softprompt_epoch(
    model, prompt, rows, rng: random.Random, optimizer, scheduler, pad_id: int, device
) -> float:
    """One epoch of softprompt's training step (the inner loop of `softprompt.train.train`,
    grad_accum 1, without evaluation and files); returns the row-weighted mean batch loss."""
    from softprompt.data import batch_order, collate_train
    from softprompt.model import label_loss

    lengths = [len(r) for r in rows]
    total, count = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    for idx in batch_order(lengths, BATCH_SIZE, rng):
        batch = {k: v.to(device) for k, v in collate_train([rows[j] for j in idx], pad_id).items()}
        loss = label_loss(model, prompt, **batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item() * len(idx)
        count += len(idx)
    return total / count


def timed_epochs(
    run_epoch, warmup: int, epochs: int, device, rss_interval: float = RSS_INTERVAL_S
) -> dict:
    """Run warm-up epochs, then timed ones, sampling memory throughout; returns the numbers."""
    trim_heap()
    sampler, gpu = RssSampler(rss_interval), GpuPeak(device)
    gpu.start()
    sampler.start()
    losses, seconds = [], []
    for e in range(warmup + epochs):
        sync(device)
        t0 = time.perf_counter()
        loss = run_epoch()
        sync(device)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if e >= warmup:
            seconds.append(dt)
        log(
            f"  epoch {e + 1}/{warmup + epochs}{' (warm-up)' if e < warmup else ''}: loss {loss:.4f}, {dt:.2f}s"
        )
    mem = sampler.stop()
    mem.update(gpu.stop())
    return {
        "epoch_seconds": seconds,
        "seconds_per_epoch": statistics.median(seconds),
        "losses": losses,
        "final_loss": losses[-1],
        **mem,
    }


# --------------------------------------------------------------------------------------------
# workers (each runs in its own process)


def setup(spec: dict):
    import warnings

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Position ids are not supported")
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    from softprompt.model import dtype_line, dtype_name, load_base

    dtype = spec.get("dtype", "auto")
    log(f"  {dtype_line(dtype, spec.get('device'))}")
    model, tokenizer, _ = load_base(None, dtype=dtype, device=spec.get("device"))
    spec["resolved_dtype"] = dtype_name(model.get_input_embeddings().weight.dtype)
    device = model.get_input_embeddings().weight.device
    return model, tokenizer, device


def model_folder() -> str:
    from softprompt.defaults import default_model_dir

    return str(default_model_dir())


def worker_peft(spec: dict) -> dict:
    import torch
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    from softprompt.prompt import init_prompt

    P = spec["P"]
    base, tokenizer, device = setup(spec)
    texts, labels = load_split(Path(spec["data_dir"]), "train", spec["train_rows"])
    rows = peft_preprocess(tokenizer, texts, labels)
    dropped = sum(
        int((r["labels"] != -100).sum()) < len(tokenizer(lab)["input_ids"]) + 1
        for r, lab in zip(rows, labels, strict=True)
    )

    model = get_peft_model(copy.deepcopy(base), peft_config(model_folder(), P))
    reference_prompt = init_prompt(base, tokenizer, P, "text", text=INIT_TEXT)
    del base
    model.to(device)
    peft_prompt = model.get_prompt_embedding_to_save("default").float()
    init_diff = float((peft_prompt.cpu() - reference_prompt.cpu()).abs().max())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # the initial loss, with the guide's padding and unpadded (batch size 1, no padding)
    model.eval()
    with torch.no_grad():
        init_loss = _mean_loss(model, rows, device)
        unpadded = [{k: v[r["attention_mask"].bool()] for k, v in r.items()} for r in rows]
        init_loss_unpadded = _mean_loss(model, unpadded, device, batch_size=1)

    torch.manual_seed(spec["seed"])
    loader = DataLoader(
        rows,
        shuffle=True,
        collate_fn=default_data_collator,
        batch_size=BATCH_SIZE,
        pin_memory=device.type == "cuda",
    )
    epochs_total = spec["warmup"] + spec["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer, num_warmup_steps=0, num_training_steps=len(loader) * epochs_total
    )
    result = timed_epochs(
        lambda: peft_epoch(model, loader, optimizer, lr_scheduler, device),
        spec["warmup"],
        spec["epochs"],
        device,
        spec["rss_interval_ms"] / 1000,
    )
    result.update(
        {
            "init_loss": init_loss,
            "init_loss_unpadded": init_loss_unpadded,
            "init_prompt_max_abs_diff_vs_softprompt": init_diff,
            "trainable_params": trainable,
            "rows": len(rows),
            "rows_without_full_label": dropped,
            "tokens_per_epoch_padded": len(rows) * (MAX_LENGTH + P),
        }
    )
    return result


def _mean_loss(model, rows: list[dict], device, batch_size: int = BATCH_SIZE) -> float:
    """Row-weighted mean of the PEFT model's batch losses over rows (in order)."""
    from transformers import default_data_collator

    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        batch = {k: v.to(device) for k, v in default_data_collator(chunk).items()}
        total += float(model(**batch).loss) * len(chunk)
        count += len(chunk)
    return total / count


def worker_softprompt(spec: dict) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    from softprompt.data import collate_train, encode_rows
    from softprompt.model import label_loss
    from softprompt.prompt import init_prompt

    P = spec["P"]
    model, tokenizer, device = setup(spec)
    task = make_task()
    texts, labels = load_split(Path(spec["data_dir"]), "train", spec["train_rows"])
    rows = encode_rows(tokenizer, task, texts, labels)
    pad = tokenizer.pad_token_id
    prompt = torch.nn.Parameter(init_prompt(model, tokenizer, P, "text", text=INIT_TEXT).to(device))

    with torch.no_grad():
        total = 0.0
        for s in range(0, len(rows), BATCH_SIZE):
            chunk = rows[s : s + BATCH_SIZE]
            batch = {k: v.to(device) for k, v in collate_train(chunk, pad).items()}
            total += float(label_loss(model, prompt, **batch)) * len(chunk)
        init_loss = total / len(rows)

    rng = random.Random(spec["seed"])
    epochs_total = spec["warmup"] + spec["epochs"]
    steps_per_epoch = math.ceil(len(rows) / BATCH_SIZE)
    optimizer = torch.optim.AdamW([prompt], lr=LR)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps_per_epoch * epochs_total)
    result = timed_epochs(
        lambda: softprompt_epoch(model, prompt, rows, rng, optimizer, scheduler, pad, device),
        spec["warmup"],
        spec["epochs"],
        device,
        spec["rss_interval_ms"] / 1000,
    )
    if spec.get("save_prompt"):
        save_prompt(prompt.detach(), spec["save_prompt"])

    floor = floor_seconds(model, prompt.detach(), rows, device, repeats=spec["epochs"])
    result.update(
        {
            "init_loss": init_loss,
            "trainable_params": prompt.numel(),
            "rows": len(rows),
            "real_tokens_per_epoch": sum(len(r) + P for r in rows),
            **floor,
        }
    )
    return result


def floor_seconds(model, prompt, rows, device, repeats: int) -> dict:
    """The floor: a no-grad forward over exactly the real tokens of one epoch, batch size 1
    (prompt [P, H] + the row's input and label tokens, no padding), via `concat_forward`.
    One short warm-up, then the median of `repeats` passes."""
    import torch

    from softprompt.model import concat_forward

    seqs = [torch.tensor([r.input_ids + r.label_ids], device=device) for r in rows]

    def one_pass(items) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for ids in items:
                concat_forward(model, prompt, ids, torch.ones_like(ids))
        sync(device)
        return time.perf_counter() - t0

    one_pass(seqs[:4])
    times = [one_pass(seqs) for _ in range(max(1, repeats))]
    log(f"  floor: {statistics.median(times):.2f}s per pass over {len(seqs)} rows")
    return {"floor_seconds": statistics.median(times), "floor_seconds_all": times}


def save_prompt(prompt, path: str) -> None:
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": prompt.float().cpu().contiguous()}, path)


def load_prompt(path: str):
    from safetensors.torch import load_file

    return load_file(path)["prompt_embeddings"]


def worker_classify(spec: dict) -> dict:
    import torch
    from peft import get_peft_model

    from softprompt.evaluate import classify, generate_texts, metrics

    model, tokenizer, device = setup(spec)
    task = make_task()
    texts, gold = load_split(Path(spec["data_dir"]), "dev", spec["dev_rows"])
    prompt_path = spec.get("prompt_path")
    if prompt_path and Path(prompt_path).is_file():
        prompt = load_prompt(prompt_path).to(device)
        prompt_source = f"softprompt training run, P={CLASSIFY_P}"
    else:
        prompt = train_prompt(model, tokenizer, task, spec, device)
        prompt_source = f"trained here: {CLASSIFY_FALLBACK_EPOCHS} epochs, P={CLASSIFY_P}"
    results = {"prompt_source": prompt_source, "n": len(texts)}

    # softprompt: rank classification
    log(f"classification: softprompt on {len(texts)} tweets")
    classify(
        model, tokenizer, prompt, task, texts[:CLASSIFY_BATCH_SIZE], batch_size=CLASSIFY_BATCH_SIZE
    )  # warm-up
    sync(device)
    t0 = time.perf_counter()
    pred, _ = classify(model, tokenizer, prompt, task, texts, batch_size=CLASSIFY_BATCH_SIZE)
    sync(device)
    dt = time.perf_counter() - t0
    results["softprompt"] = _classification_record(gold, pred, dt, metrics)

    # softprompt: rank classification on an int8-quantised copy of the model (--int8; not exact)
    if spec.get("int8") and device.type == "cpu" and spec["resolved_dtype"] != "float32":
        log("classification: --int8 skipped (it quantises a float32 model)")
    elif spec.get("int8") and device.type == "cpu":
        log(f"classification: softprompt on an int8-quantised model, {len(texts)} tweets")
        qmodel = quantize_int8(model)
        kw = {"batch_size": CLASSIFY_BATCH_SIZE}
        classify(qmodel, tokenizer, prompt, task, texts[:CLASSIFY_BATCH_SIZE], **kw)  # warm-up
        t0 = time.perf_counter()
        qpred, _ = classify(qmodel, tokenizer, prompt, task, texts, **kw)
        rec = _classification_record(gold, qpred, time.perf_counter() - t0, metrics)
        same = sum(a == b for a, b in zip(pred, qpred, strict=True))
        rec["agreement_with_float32"] = same / len(texts)
        results["softprompt_int8"] = rec
        del qmodel

    # softprompt: the guide's method (free generation, exact match), for a like-for-like speed
    log(f"classification: softprompt generate on {len(texts)} tweets")
    gen_kw = {"max_new_tokens": GEN_MAX_NEW_TOKENS, "batch_size": GEN_BATCH_SIZE}
    generate_texts(model, tokenizer, prompt, task, texts[:GEN_BATCH_SIZE], **gen_kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    generated = generate_texts(model, tokenizer, prompt, task, texts, **gen_kw)
    sync(device)
    results["softprompt_generate"] = _classification_record(
        gold, generated, time.perf_counter() - t0, metrics
    )

    # PEFT: the guide's inference (generate, then exact match)
    log(f"classification: PEFT generate on {len(texts)} tweets")
    peft_model = get_peft_model(copy.deepcopy(model), peft_config(model_folder(), CLASSIFY_P))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt.to(device))
    peft_model.to(device)
    peft_model.eval()
    tokenizer.padding_side = "left"
    peft_generate(peft_model, tokenizer, texts[:GEN_BATCH_SIZE], device)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    outputs = peft_generate(peft_model, tokenizer, texts, device)
    sync(device)
    dt = time.perf_counter() - t0
    rec = _classification_record(gold, outputs, dt, metrics)
    rec["examples_invalid"] = [o for o in outputs if o not in LABEL_NAMES][:10]
    results["peft"] = rec
    agree = sum(a == b for a, b in zip(pred, outputs, strict=True))
    results["agreement"] = agree / len(texts)
    results["generation_parity"] = generation_parity(
        peft_model, model, tokenizer, prompt, task, texts[:PARITY_TWEETS], device
    )
    return results


def quantize_int8(model):
    """A copy of the model with every nn.Linear dynamically quantised to int8 (weights int8,
    activations quantised per call). Measured here, not offered by softprompt: on the default
    model it changes most predictions (docs/speed.md)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated but still works
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def generation_parity(peft_model, model, tokenizer, prompt, task, texts, device) -> dict:
    """Greedy generations of a few tweets, one at a time (no padding), three ways: PEFT's
    `generate` as the guide calls it (KV cache on), PEFT's `generate(use_cache=False)` (recomputes
    everything; the reference), and softprompt's `generate_texts`. All three should agree."""
    from softprompt.evaluate import generate_texts

    log(f"classification: generation parity on {len(texts)} tweets")
    cached = [peft_generate(peft_model, tokenizer, [t], device)[0] for t in texts]
    reference = [
        peft_generate(peft_model, tokenizer, [t], device, use_cache=False)[0] for t in texts
    ]
    ours = generate_texts(
        model, tokenizer, prompt, task, texts, max_new_tokens=GEN_MAX_NEW_TOKENS, batch_size=1
    )
    return {
        "n": len(texts),
        "peft_cached_equals_reference": sum(a == b for a, b in zip(cached, reference, strict=True)),
        "softprompt_equals_reference": sum(a == b for a, b in zip(ours, reference, strict=True)),
        "examples": [
            {"peft_cached": a, "peft_no_cache": b, "softprompt": c}
            for a, b, c in list(zip(cached, reference, ours, strict=True))[:4]
        ],
    }


def _classification_record(gold, pred, seconds: float, metrics) -> dict:
    m = metrics(gold, pred, LABEL_NAMES)
    return {
        "seconds": seconds,
        "tweets_per_second": len(gold) / seconds,
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "invalid": m["invalid"],
        "confusion_matrix": m["confusion_matrix"],
    }


def peft_generate(model, tokenizer, texts, device, **kw) -> list[str]:
    """The guide's inference, batched: generate after `Tweet text : {x} Label : ` (left-padded),
    decode the new tokens, strip."""
    import torch

    out = []
    for s in range(0, len(texts), GEN_BATCH_SIZE):
        inputs = [f"{TEXT_COLUMN} : {x} Label : " for x in texts[s : s + GEN_BATCH_SIZE]]
        enc = tokenizer(inputs, return_tensors="pt", padding=True)
        with torch.no_grad():
            outputs = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=GEN_MAX_NEW_TOKENS,
                eos_token_id=tokenizer.eos_token_id,
                **kw,
            )
        new = outputs[:, enc["input_ids"].shape[1] :]
        out += [t.strip() for t in tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)]
    return out


def train_prompt(model, tokenizer, task, spec: dict, device):
    """Fallback when no P=8 softprompt run saved a prompt: train one for a few epochs."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from softprompt.data import encode_rows
    from softprompt.prompt import init_prompt

    log(f"classification: training a P={CLASSIFY_P} prompt for {CLASSIFY_FALLBACK_EPOCHS} epochs")
    texts, labels = load_split(Path(spec["data_dir"]), "train", spec["train_rows"])
    rows = encode_rows(tokenizer, task, texts, labels)
    prompt = torch.nn.Parameter(
        init_prompt(model, tokenizer, CLASSIFY_P, "text", text=INIT_TEXT).to(device)
    )
    optimizer = torch.optim.AdamW([prompt], lr=LR)
    steps = math.ceil(len(rows) / BATCH_SIZE) * CLASSIFY_FALLBACK_EPOCHS
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    rng = random.Random(spec["seed"])
    for _ in range(CLASSIFY_FALLBACK_EPOCHS):
        softprompt_epoch(
            model, prompt, rows, rng, optimizer, scheduler, tokenizer.pad_token_id, device
        )
    prompt = prompt.detach()
    if spec.get("prompt_path"):
        save_prompt(prompt, spec["prompt_path"])
    return prompt


WORKERS = {"peft": worker_peft, "softprompt": worker_softprompt, "classify": worker_classify}


def run_worker(spec: dict) -> dict:
    """Run one measurement in a fresh process (this script with --worker) and return its JSON."""
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(
        {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    )
    with tempfile.TemporaryDirectory(prefix="speed-worker-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            json.dumps(spec),
            "--worker-out",
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, check=False)
        if proc.returncode != 0 or not out.is_file():
            raise SystemExit(
                f"speed.py: worker {spec['system']} (P={spec.get('P')}) failed with exit code {proc.returncode}"
            )
        return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------
# the orchestrator


def machine_info(threads: int) -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from importlib.metadata import version

        info["softprompt"] = version("softprompt")
    except Exception:  # noqa: BLE001
        info["softprompt"] = "unknown"
    return info


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarise(runs: dict[str, list[dict]]) -> dict:
    keys = ["seconds_per_epoch", "peak_rss_increase_mb", "peak_rss_mb", "final_loss", "init_loss"]
    keys += ["gpu_peak_increase_mb", "gpu_peak_mb"]
    out = {}
    for system, rs in runs.items():
        out[system] = {k: median_of(rs, k) for k in keys}
        if system == "softprompt":
            out[system]["floor_seconds"] = median_of(rs, "floor_seconds")
        if system == "peft":
            out[system]["init_loss_unpadded"] = median_of(rs, "init_loss_unpadded")
            out[system]["init_prompt_max_abs_diff_vs_softprompt"] = max(
                r["init_prompt_max_abs_diff_vs_softprompt"] for r in rs
            )
            out[system]["rows_without_full_label"] = max(r["rows_without_full_label"] for r in rs)
    pe, sp = out["peft"], out["softprompt"]
    out["ratio_peft_over_softprompt"] = pe["seconds_per_epoch"] / sp["seconds_per_epoch"]
    out["softprompt_over_floor"] = sp["seconds_per_epoch"] / sp["floor_seconds"]
    out["peft_over_floor"] = pe["seconds_per_epoch"] / sp["floor_seconds"]
    return out


def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def training_table(summary: dict, gpu: bool) -> str:
    mem = "GPU" if gpu else "RSS"
    head = [
        "P",
        "PEFT s/epoch",
        "softprompt s/epoch",
        "PEFT/softprompt",
        f"PEFT peak {mem} MB (+Δ / abs)",
        f"softprompt peak {mem} MB (+Δ / abs)",
        "PEFT final loss",
        "softprompt final loss",
        "floor s",
        "softprompt/floor",
        "PEFT/floor",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for P, s in summary.items():
        pe, sp = s["peft"], s["softprompt"]
        if gpu:
            mp = f"{_f(pe['gpu_peak_increase_mb'], '.0f')} / {_f(pe['gpu_peak_mb'], '.0f')}"
            ms = f"{_f(sp['gpu_peak_increase_mb'], '.0f')} / {_f(sp['gpu_peak_mb'], '.0f')}"
        else:
            mp = f"{_f(pe['peak_rss_increase_mb'], '.0f')} / {_f(pe['peak_rss_mb'], '.0f')}"
            ms = f"{_f(sp['peak_rss_increase_mb'], '.0f')} / {_f(sp['peak_rss_mb'], '.0f')}"
        row = [
            str(P),
            _f(pe["seconds_per_epoch"]),
            _f(sp["seconds_per_epoch"]),
            _f(s["ratio_peft_over_softprompt"]) + "x",
            mp,
            ms,
            _f(pe["final_loss"], ".4f"),
            _f(sp["final_loss"], ".4f"),
            _f(sp["floor_seconds"]),
            _f(s["softprompt_over_floor"]) + "x",
            _f(s["peft_over_floor"]) + "x",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parity_table(summary: dict) -> str:
    head = [
        "P",
        "init loss PEFT (guide padding)",
        "init loss PEFT (unpadded)",
        "init loss softprompt",
        "init prompt max |diff|",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for P, s in summary.items():
        pe, sp = s["peft"], s["softprompt"]
        row = [
            str(P),
            _f(pe["init_loss"], ".6f"),
            _f(pe["init_loss_unpadded"], ".6f"),
            _f(sp["init_loss"], ".6f"),
            _f(pe["init_prompt_max_abs_diff_vs_softprompt"], ".2e"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def classification_table(c: dict) -> str:
    head = ["system", "tweets/s", "accuracy", "macro-F1", "invalid", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join("---:" for _ in head[1:]) + "|"]
    systems = (
        ("PEFT generate (guide)", "peft"),
        ("softprompt generate", "softprompt_generate"),
        ("softprompt classify (rank)", "softprompt"),
        ("softprompt classify (rank), int8 model (not offered)", "softprompt_int8"),
    )
    for name, key in systems:
        if key not in c:
            continue
        r = c[key]
        lines.append(
            f"| {name} | {r['tweets_per_second']:.1f} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
            f"{r['invalid']} | {r['seconds']:.1f} |"
        )
    ratio = c["softprompt"]["tweets_per_second"] / c["peft"]["tweets_per_second"]
    gen_ratio = c["softprompt_generate"]["tweets_per_second"] / c["peft"]["tweets_per_second"]
    gp = c["generation_parity"]
    if "softprompt_int8" in c:
        q = c["softprompt_int8"]
        lines.append(
            f"\nint8 / float32 classify tweets/s: "
            f"{q['tweets_per_second'] / c['softprompt']['tweets_per_second']:.2f}x; "
            f"int8 predictions equal to float32's: {q['agreement_with_float32']:.3f}"
        )
    lines.append(
        f"\nsoftprompt classify / PEFT generate tweets/s: {ratio:.2f}x; softprompt generate / PEFT generate: "
        f"{gen_ratio:.2f}x; classify vs PEFT prediction agreement: {c['agreement']:.3f} (n={c['n']})"
    )
    lines.append(
        f"generation parity on {gp['n']} tweets (batch 1, greedy), equal to PEFT generate(use_cache=False): "
        f"PEFT generate (cache on, as the guide) {gp['peft_cached_equals_reference']}/{gp['n']}, "
        f"softprompt generate {gp['softprompt_equals_reference']}/{gp['n']}"
    )
    return "\n".join(lines)


def measure(base: dict, args: argparse.Namespace, tmp: Path) -> dict:
    """The training runs (each P, alternating PEFT and softprompt over the rounds) and the
    classification run, all with the base model in base["dtype"]."""
    tmp.mkdir(parents=True, exist_ok=True)
    prompt_path = str(tmp / f"prompt_P{CLASSIFY_P}.safetensors")
    raw: dict[int, dict[str, list[dict]]] = {}
    summary: dict[int, dict] = {}
    for P in args.tokens:
        raw[P] = {"peft": [], "softprompt": []}
        for rnd in range(args.rounds):
            order = ["peft", "softprompt"] if rnd % 2 == 0 else ["softprompt", "peft"]
            for system in order:
                log(f"training: {system}, P={P}, {base['dtype']}, round {rnd + 1}/{args.rounds}")
                spec = {**base, "system": system, "P": P}
                if system == "softprompt" and P == CLASSIFY_P:
                    spec["save_prompt"] = prompt_path
                r = run_worker(spec)
                r["round"] = rnd + 1
                raw[P][system].append(r)
        summary[P] = summarise(raw[P])
    classification = None
    if not args.skip_classify:
        log(f"classification, {base['dtype']}")
        classification = run_worker({**base, "system": "classify", "prompt_path": prompt_path})
    resolved = {r["dtype"] for rs in raw.values() for runs in rs.values() for r in runs}
    if classification is not None:
        resolved.add(classification["dtype"])
    return {
        "raw": raw,
        "summary": summary,
        "classification": classification,
        "resolved": sorted(resolved),
    }


def _dtype_title(dtype: str, run: dict) -> str:
    """The dtype as asked, with what the workers loaded where that differs: auto (float32)."""
    got = "/".join(run["resolved"])
    return dtype if got == dtype else f"{dtype} ({got})"


def dtype_table(runs: dict[str, dict]) -> str:
    """Each dtype's seconds per epoch (training, per P and system) and tweets per second
    (classification), side by side, with each dtype's speed-up over the first one."""
    names = list(runs)
    first = names[0]
    head = ["measure", *(_dtype_title(d, runs[d]) for d in names)]
    head += [f"{d} speed-up" for d in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join("---:" for _ in head[1:]) + "|"]

    def add(label: str, values: list, higher_is_faster: bool) -> None:
        row = [label, *(_f(v) for v in values)]
        for v in values[1:]:
            if values[0] is None or v is None or not v or not values[0]:
                row.append("-")
            else:
                row.append(_f(v / values[0] if higher_is_faster else values[0] / v) + "x")
        lines.append("| " + " | ".join(row) + " |")

    for P in runs[first]["summary"]:
        for system, label in (("peft", "PEFT"), ("softprompt", "softprompt")):
            secs = [runs[d]["summary"][P][system]["seconds_per_epoch"] for d in names]
            add(f"train P={P}, {label} s/epoch", secs, False)
    if all(runs[d]["classification"] for d in names):
        for key, label in (
            ("peft", "PEFT generate"),
            ("softprompt_generate", "softprompt generate"),
            ("softprompt", "softprompt classify"),
        ):
            tps = [runs[d]["classification"][key]["tweets_per_second"] for d in names]
            add(f"{label} tweets/s", tps, True)
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="softprompt vs PEFT speed benchmark (see bench/README.md)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 16 train rows, 64 dev tweets, 1 timed epoch, 1 round",
    )
    ap.add_argument(
        "--tokens", type=int, nargs="+", default=[8, 32, 100], help="numbers of virtual tokens P"
    )
    ap.add_argument(
        "--epochs", type=int, default=None, help="timed epochs per run (default 3; 1 with --quick)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the CPUs this process may use)",
    )
    ap.add_argument(
        "--out", default=str(REPO / "bench" / "results" / "speed.json"), help="JSON results file"
    )
    ap.add_argument(
        "--data-dir", default=str(DEFAULT_DATA), help="folder with train.csv and dev.csv"
    )
    ap.add_argument(
        "--device", default=None, help="cpu, cuda, ...; default: softprompt's pick (CUDA, MPS, CPU)"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of alternating runs (default 2; 1 with --quick)",
    )
    ap.add_argument(
        "--rss-interval-ms",
        type=float,
        default=RSS_INTERVAL_S * 1000,
        help="RSS sampling period (default 5)",
    )
    ap.add_argument("--skip-classify", action="store_true", help="skip the classification section")
    ap.add_argument(
        "--int8",
        action="store_true",
        help="also classify on a dynamically int8-quantised model (CPU; speed and agreement)",
    )
    ap.add_argument(
        "--dev-rows",
        type=int,
        default=None,
        help="classify only the first N dev tweets (default all 1000; 64 with --quick)",
    )
    ap.add_argument(
        "--train-rows",
        type=int,
        default=None,
        help="train on only the first N training tweets (default all 50; 16 with --quick)",
    )
    ap.add_argument(
        "--dtypes",
        default="auto",
        help="comma-separated base-model dtypes to measure one after the other, e.g. "
        "float32,bfloat16 (auto: softprompt's choice for this machine) [default: auto]",
    )
    ap.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 3
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    problems = []
    if args.epochs < 1:
        problems.append(f"--epochs must be at least 1 (got {args.epochs})")
    if args.rounds < 1:
        problems.append(f"--rounds must be at least 1 (got {args.rounds})")
    if not args.rss_interval_ms > 0:
        problems.append(f"--rss-interval-ms must be positive (got {args.rss_interval_ms})")
    if args.train_rows is not None and args.train_rows < 1:
        problems.append(f"--train-rows must be at least 1 (got {args.train_rows})")
    if args.dev_rows is not None and args.dev_rows < 1:
        problems.append(f"--dev-rows must be at least 1 (got {args.dev_rows})")
    if args.threads < 1:
        problems.append(f"--threads must be at least 1 (got {args.threads})")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    allowed = ("auto", "float32", "bfloat16", "float16")
    if not args.dtypes or any(d not in allowed for d in args.dtypes):
        problems.append(f"--dtypes must list some of {', '.join(allowed)} (got {args.dtypes})")
    elif len(set(args.dtypes)) < len(args.dtypes):
        problems.append(f"--dtypes lists a dtype twice (got {args.dtypes})")
    if any(p < 1 for p in args.tokens):
        problems.append(f"--tokens must all be at least 1 (got {args.tokens})")
    if problems:
        ap.error("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        result = WORKERS[spec["system"]](spec)
        result["dtype"] = spec.get("resolved_dtype")
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    data_dir = Path(args.data_dir).expanduser().resolve()
    for name in ("train.csv", "dev.csv"):
        if not (data_dir / name).is_file():
            raise SystemExit(
                f"speed.py: {data_dir / name} not found; pass --data-dir with train.csv and dev.csv"
            )
    info = machine_info(args.threads)
    log(f"machine: {info['cpu']}; {args.threads} threads; torch {info['torch']}")
    model_folder()  # convert the default model once, before the workers start
    base = {
        "threads": args.threads,
        "seed": args.seed,
        "data_dir": str(data_dir),
        "device": args.device,
        "train_rows": args.train_rows or (QUICK_TRAIN_ROWS if args.quick else None),
        "dev_rows": args.dev_rows or (QUICK_DEV_ROWS if args.quick else None),
        "int8": args.int8,
        "warmup": 1,
        "epochs": args.epochs,
        "rss_interval_ms": args.rss_interval_ms,
    }
    load_start = load_average()
    started = time.time()
    runs: dict[str, dict] = {}  # per dtype: raw runs, summary, classification
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        for dtype in args.dtypes:
            runs[dtype] = measure({**base, "dtype": dtype}, args, Path(tmp) / dtype)

    gpu = info["cuda"] is not None and (args.device is None or str(args.device).startswith("cuda"))
    rows = base["train_rows"] or "all"
    print("## Machine\n")
    print(f"- CPU: {info['cpu']} ({info['cpu_count']} logical CPUs); torch threads: {args.threads}")
    if info["cuda"]:
        print(f"- GPU: {info['cuda']}")
    print(
        f"- python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}"
    )
    print(f"- load average at start: {load_start}, at end: {load_average()}")
    print(
        f"- train rows: {rows}, batch {BATCH_SIZE}, 1 warm-up + {args.epochs} timed epochs, "
        f"{args.rounds} round(s), median reported{'; QUICK smoke run' if args.quick else ''}"
    )
    for dtype, r in runs.items():
        name = _dtype_title(dtype, r)
        print(f"\n## Training, base model in {name} (seconds per epoch, median)\n")
        print(training_table(r["summary"], gpu))
        print(
            f"\n## Parity at initialisation, {name} (same TEXT-init prompt, loss before training)\n"
        )
        print(parity_table(r["summary"]))
        c = r["classification"]
        if c is not None:
            print(
                f"\n## Classification, {name} ({c['n']} dev tweets, prompt: {c['prompt_source']})\n"
            )
            print(classification_table(c))
    if len(runs) > 1:
        print("\n## The dtypes side by side (seconds per epoch; tweets per second)\n")
        print(dtype_table(runs))

    result = {
        "machine": info,
        "settings": {
            "quick": args.quick,
            "tokens": args.tokens,
            "epochs": args.epochs,
            "warmup_epochs": 1,
            "rounds": args.rounds,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "max_length": MAX_LENGTH,
            "train_rows": base["train_rows"],
            "dev_rows": base["dev_rows"],
            "data_dir": str(data_dir),
            "seed": args.seed,
            "rss_interval_ms": args.rss_interval_ms,
            "dtypes": args.dtypes,
        },
        "load_average": {"start": load_start, "end": load_average()},
        "wall_seconds": time.time() - started,
        "by_dtype": {
            dtype: {
                "resolved": r["resolved"],
                "training": {
                    str(P): {"summary": r["summary"][P], "runs": r["raw"][P]} for P in r["raw"]
                },
                "classification": r["classification"],
            }
            for dtype, r in runs.items()
        },
    }
    first = result["by_dtype"][args.dtypes[0]]  # the shape of a one-dtype run, as before
    result["training"], result["classification"] = first["training"], first["classification"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

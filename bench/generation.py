"""Generation benchmark on E2E: softprompt's `--task generation` (a prompt and a deep prompt)
against PEFT prompt tuning the guide's way and full fine-tuning, on the same training pairs and
epochs, scored on the E2E dev inputs with greedy decoding and beam search.

    python bench/generation.py                     # 1000 pairs, seeds 42 1 2, all 547 dev inputs
    python bench/generation.py --train-pairs 40 --epochs 1 --dev-inputs 8 --beams 2 --seeds 42
                                                   # smoke run: every path, 15 min on 2 busy cores

Data: `trainset.csv` and `devset.csv` (columns mr, ref; several refs per mr) in `--data-dir`
(default `../shared/data/e2e` beside the repository), read in place. No E2E test set is used.

Training pairs (`--train-pairs N`, `--sample-seed S`): the distinct mr values of trainset.csv,
sorted, are shuffled with `random.Random(S).shuffle`; inputs are taken in
that order, each with all of its refs in file order, until N pairs are taken, and the last
input's refs are cut so that there are exactly N. `--train-pairs all`: every row, by the same
rule. Every method and seed trains on these same pairs (the seed changes initialisation, where
there is one, and batch order).

Dev inputs (`--dev-inputs N`): the distinct mr values of devset.csv (547); fewer than all: the
first N after `random.Random(S).shuffle` of them, sorted. `--write-sample DIR` writes the
sampled pairs and dev rows as DIR/train.csv and DIR/dev.csv (columns mr, ref) and stops, for
training and scoring the same rows with the command line. Each input is written out once and scored
against all of its refs by `softprompt.metrics.generation_metrics` (sacrebleu BLEU lowercased
with 13a tokenisation and all references, the official E2E BLEU; chrF; rouge-score ROUGE-L).
The dev set is never used to choose anything: every method keeps its last epoch.

The methods (`--methods`), each (method, seed) in a fresh spawned process (its own peak memory):

- softprompt-prompt / softprompt-prefix: `softprompt.train(TrainConfig(task="generation",
  method="prompt" | "prefix", text_column="mr", label_column="ref", ...), model, tokenizer,
  data=rows)` with softprompt's defaults except the flags given (--lr, --epochs,
  --num-virtual-tokens, --batch-size); generation through `SoftPrompt.load(run).generate`.
- peft-prompt: the PEFT guide "Prompt tuning for causal language modeling": `PromptTuningConfig`
  (CAUSAL_LM, TEXT init with softprompt's init text for the task, "Given the mr, write the
  ref:"), the guide's `preprocess_function` (input `mr : {mr} Label : ` and target tokenised
  separately, target + end token, labels -100 on the input, every row LEFT-padded to
  `--peft-max-length` and cut `[:max_length]`; default: the longest training row, the shortest
  length that cuts none, where softprompt's --max-length is 256), `DataLoader(shuffle=True,
  default_data_collator)`, `AdamW(lr)`, `get_linear_schedule_with_warmup(0, steps)`, with
  softprompt's resolved lr, epochs, batch size and number of virtual tokens. Two differences
  from the guide's text: targets are tokenised without special tokens (the guide's
  `tokenizer(targets)` puts a BOS inside every target on tokenizers that add one, e.g. Gemma's;
  SmolLM2's adds none) and the end token is eos (the guide appends pad, which is eos on SmolLM2).
  Generation: the trained prompt concatenated in front of the token embeddings as
  `inputs_embeds` in the base model's `generate` (left padding, positions from the attention
  mask). PEFT's own cached `generate` is checked first (first seed) on `--peft-check` dev
  inputs, one at a time, against PEFT's `generate(use_cache=False)` (the reference of
  tests/test_model.py), and so is the `inputs_embeds` way (batched, as it scores): with
  transformers 5 and peft 0.21 the cached one re-inserts the virtual tokens at every step, so it
  is measured, not used. Note: the guide trains with left padding and no position ids, so in
  training a row's text sits after its padding (positions P + pad ...), as in PEFT.
- full-ft: every weight of the same model trainable, AdamW (`--ft-lr`, default 5e-5,
  softprompt's weight decay), linear schedule with no warm-up, the same rows as softprompt
  encodes them (`data.encode_targets`: loss on the target tokens only), batches in a seeded
  random order, right-padded to their longest row; generation with transformers' `generate`.

All methods decode with `--max-new-tokens` (default: what softprompt gives a generation adapter:
the longest training target's tokens + max(8, a quarter of it)), greedy and with `--beams` beams
(length penalty 1, transformers' `early_stopping=False`; softprompt's beam search follows it), in
batches of `--gen-batch-size` // beams inputs.

Reported per method and seed: BLEU, ROUGE-L, chrF (exact match in the JSON) for greedy and beam;
training seconds (the epochs' batches only: `history[i]["epoch_seconds"]` for softprompt, the
same span timed around the loops of the others); training tokens/s (real tokens, input + target
+ end token of each row, no padding, times epochs, over those seconds); the process's peak
memory at the end of training (`ru_maxrss`; on CUDA the peak allocated), model included. Then
mean ± std (sample std) over seeds. The JSON also has CPU seconds (`time.process_time`: the
epoch loops; for softprompt the whole `train()` call), steadier than the wall clock on a shared
machine, and each decoding's seconds.

Speed section (unless `--no-speed`; `--speed-only` runs just it): greedy generation of
`--speed-inputs` (32) dev inputs in one batch, `--speed-tokens` (40) new tokens each on both
sides (the engine with the end token switched off, transformers with `min_new_tokens` =
`max_new_tokens`), after the same prompt (the first seed's softprompt-prompt run, or a text-init
prompt): softprompt's engine (`Engine.generate`, the prompt's KV cached) against transformers'
`generate` with the prompt ++ token embeddings as `inputs_embeds`; one warm-up each, then the
median of `--speed-repeats` timed runs, alternating which goes first. Tokens/s and the ratio,
and how many rows agree up to the engine's first end token. `--speed-profile` also runs each
side once under torch's profiler: the seconds in the linear layers' matrix products, and the
engine's ceiling, generate's seconds over the engine's matrix-product seconds (what an engine
that spent no time outside them would reach). With the main runs, it also prints
softprompt's training tokens/s over the PEFT guide loop's.

Tables go to stdout, progress to stderr; all numbers to `--out` (bench/results/generation.json),
every output text to `<out>_outputs.jsonl`, adapters to `--runs-dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import resource
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch
from common import markdown_table

from softprompt import TrainConfig
from softprompt.config import EPOCHS_FOR_GENERATION

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "e2e"
TEXT, TARGET = "mr", "ref"
METHODS = ("softprompt-prompt", "softprompt-prefix", "peft-prompt", "full-ft")
METRICS = (("bleu", "BLEU"), ("rouge_l", "ROUGE-L"), ("chrf", "chrF"))


def log(msg: str) -> None:
    print(f"[generation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# data


def read_pairs(path: Path) -> list[tuple[str, str]]:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return list(zip(frame[TEXT], frame[TARGET], strict=True))


def by_input(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{mr: its refs in file order}, mr in first-seen order."""
    refs: dict[str, list[str]] = {}
    for mr, ref in pairs:
        refs.setdefault(mr, []).append(ref)
    return refs


def sample_train(pairs, n: int | None, seed: int) -> list[tuple[str, str]]:
    """The module docstring's rule: shuffled inputs, all their refs, the last input cut to n."""
    refs = by_input(pairs)
    inputs = sorted(refs)
    random.Random(seed).shuffle(inputs)
    n = len(pairs) if n is None else n
    out: list[tuple[str, str]] = []
    for mr in inputs:
        out += [(mr, r) for r in refs[mr][: n - len(out)]]
        if len(out) >= n:
            break
    return out


def sample_dev(pairs, n: int | None, seed: int) -> tuple[list[str], list[list[str]]]:
    """(inputs, each input's refs): all, or the first n after a seeded shuffle."""
    refs = by_input(pairs)
    inputs = sorted(refs)
    if n is not None and n < len(inputs):
        random.Random(seed).shuffle(inputs)
        inputs = inputs[:n]
    return inputs, [refs[mr] for mr in inputs]


def write_sample(folder: Path, pairs, dev_inputs, dev_refs) -> None:
    """--write-sample: the sampled training pairs and dev rows as CSV files (mr, ref)."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(pairs, columns=[TEXT, TARGET]).to_csv(folder / "train.csv", index=False)
    dev = [(mr, r) for mr, refs in zip(dev_inputs, dev_refs, strict=True) for r in refs]
    pd.DataFrame(dev, columns=[TEXT, TARGET]).to_csv(folder / "dev.csv", index=False)
    log(f"wrote {len(pairs)} training pairs and {len(dev)} dev rows to {folder}")


def gen_task(max_length: int):
    """The task softprompt trains: the guide's template with column mr, free-text targets."""
    from softprompt.data import Task

    return Task(
        text_column=TEXT,
        label_names=[],
        label_column=TARGET,
        max_length=max_length,
        kind="generation",
    )


def encoded_rows(tokenizer, pairs, max_length: int):
    """The rows as softprompt encodes them (template, target tokens, end token)."""
    from softprompt.data import encode_targets

    rows, _ = encode_targets(
        tokenizer, gen_task(max_length), [x for x, _ in pairs], [y for _, y in pairs]
    )
    return rows


def default_max_new_tokens(tokenizer, targets) -> int:
    """What softprompt's training gives a generation adapter (training/setup.py)."""
    from softprompt.data import target_token_ids

    longest = max(len(target_token_ids(tokenizer, y)) for y in targets)
    return longest + max(8, longest // 4)


# ---------------------------------------------------------------------------------------------
# in a worker process


def _setup(job: dict):
    import transformers

    from softprompt import load_base

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Position ids are not supported")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])
    model, tokenizer, _ = load_base(job["model"], dtype=job["dtype"], device=job["device"])
    return model, tokenizer, model.get_input_embeddings().weight.device


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _until_end(toks: list[int], eos: int | None) -> list[int]:
    return toks[: toks.index(eos)] if eos is not None and eos in toks else toks


@torch.no_grad()
def hf_generate(
    model,
    tokenizer,
    texts,
    *,
    max_length: int,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 16,
    prompt=None,
    fixed: bool = False,
) -> list[list[int]]:
    """transformers' `generate` after each rendered input (softprompt's template and cut),
    left-padded, batches of batch_size // num_beams inputs sorted by length (as the engine
    batches): each input's new tokens up to the end token. `prompt` [P, H]: its vectors go in
    front of the token embeddings (`inputs_embeds`, mask ones). `fixed`: exactly max_new_tokens
    each (`min_new_tokens`)."""
    from softprompt.data import collate_left, input_token_ids

    task = gen_task(max_length)
    device = model.get_input_embeddings().weight.device
    seqs = [input_token_ids(tokenizer, task, t, max_length - 1) for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    per = max(1, batch_size // num_beams)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = [[] for _ in texts]
    for s in range(0, len(order), per):
        idx = order[s : s + per]
        ids, mask = collate_left([seqs[i] for i in idx], tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        kw = dict(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            length_penalty=1.0,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        if fixed:
            kw["min_new_tokens"] = max_new_tokens
        if prompt is None:
            new = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
        else:
            emb = model.get_input_embeddings()(ids)
            p = prompt.to(emb)[None].expand(len(idx), -1, -1)
            mask = torch.cat([mask.new_ones(len(idx), p.shape[1]), mask], 1)
            new = model.generate(inputs_embeds=torch.cat([p, emb], 1), attention_mask=mask, **kw)
        for i, toks in zip(idx, new.tolist(), strict=True):
            out[i] = toks if fixed else _until_end(toks, eos)
    return out


def decode(tokenizer, seqs: list[list[int]]) -> list[str]:
    """As the engine decodes: skip special tokens, strip."""
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in seqs]


def softprompt_run(job, model, tokenizer, pairs, method: str):
    """softprompt's `train()` with `--task generation --method {method}`; generation through
    `SoftPrompt.generate`. Returns (training record, generate(texts, num_beams) -> texts)."""
    from softprompt import train
    from softprompt.pipeline import SoftPrompt

    given = {
        k: job[k]
        for k in ("lr", "epochs", "num_virtual_tokens", "batch_size")
        if job[k] is not None
    }
    cfg = TrainConfig(
        data=None,
        out=str(Path(job["runs_dir"]) / f"{job['method']}-seed{job['seed']}"),
        task="generation",
        text_column=TEXT,
        label_column=TARGET,
        method=method,
        model=job["model"],
        dtype=job["dtype"],
        device=job["device"],
        overwrite=True,
        progress=False,
        seed=job["seed"],
        **given,
    )
    rows = [{TEXT: x, TARGET: y} for x, y in pairs]
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(cfg, model, tokenizer, data=rows)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    seconds = sum(r["epoch_seconds"] for r in result.history)
    tokens = sum(len(r) for r in encoded_rows(tokenizer, pairs, job["settings"]["max_length"]))
    sp = SoftPrompt.load(str(result.out), model, tokenizer)

    def generate(texts, num_beams):
        return sp.generate(
            texts,
            num_beams=num_beams,
            max_new_tokens=job["max_new_tokens"],
            batch_size=job["gen_batch_size"],
        )

    record = {
        "train_seconds": seconds,
        "train_wall_seconds": wall,
        "train_cpu_seconds": cpu,
        "real_tokens_per_epoch": tokens,
        "final_loss": result.history[-1]["train_loss"],
        "run_dir": str(result.out),
    }
    return record, generate


def guide_rows(tokenizer, pairs, max_length: int) -> list[dict]:
    """The guide's `preprocess_function`: input and target tokenised separately, target + end
    token, labels -100 on the input, every row LEFT-padded to max_length and cut [:max_length]."""
    inputs = tokenizer([f"{TEXT} : {x} Label : " for x, _ in pairs])["input_ids"]
    targets = tokenizer([y for _, y in pairs], add_special_tokens=False)["input_ids"]
    rows = []
    for x, y in zip(inputs, targets, strict=True):
        y = y + [tokenizer.eos_token_id]
        ids, lab = x + y, [-100] * len(x) + y
        pad = max(0, max_length - len(ids))
        row = {
            "input_ids": [tokenizer.pad_token_id] * pad + ids,
            "attention_mask": [0] * pad + [1] * len(ids),
            "labels": [-100] * pad + lab,
        }
        rows.append({k: torch.tensor(v[:max_length]) for k, v in row.items()})
    return rows


def peft_check(peft_model, model, tokenizer, prompt, texts, job) -> dict:
    """Greedy, one input at a time (no padding): PEFT's cached `generate`, PEFT's
    `generate(use_cache=False)` (the reference) and the prompt as `inputs_embeds` in the base
    model's `generate` (batched, as scored). How many of each equal the reference."""
    from softprompt.data import input_token_ids

    kw = dict(
        max_new_tokens=job["max_new_tokens"],
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    length = job["settings"]["max_length"]
    cached, reference = [], []
    for t in texts:
        x = torch.tensor(
            [input_token_ids(tokenizer, gen_task(length), t, length - 1)], device=prompt.device
        )
        for use_cache, into in ((True, cached), (False, reference)):
            with torch.no_grad():
                out = peft_model.generate(
                    input_ids=x, attention_mask=torch.ones_like(x), use_cache=use_cache, **kw
                )
            into.append(_until_end(out[0, x.shape[1] :].tolist(), tokenizer.eos_token_id))
    embeds = hf_generate(
        model,
        tokenizer,
        texts,
        max_length=length,
        max_new_tokens=job["max_new_tokens"],
        batch_size=job["gen_batch_size"],
        prompt=prompt,
    )
    return {
        "inputs": len(texts),
        "peft_cached_equal_reference": sum(a == b for a, b in zip(cached, reference, strict=True)),
        "inputs_embeds_equal_reference": sum(
            a == b for a, b in zip(embeds, reference, strict=True)
        ),
        "example": {
            "input": texts[0],
            "reference": decode(tokenizer, reference[:1])[0],
            "peft_cached": decode(tokenizer, cached[:1])[0],
            "inputs_embeds": decode(tokenizer, embeds[:1])[0],
        },
    }


def peft_prompt_run(job, model, tokenizer, pairs):
    """The PEFT guide's prompt tuning (see the module docstring); generation through the base
    model's `generate` with the prompt as `inputs_embeds`, after checking PEFT's own."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import default_data_collator, get_linear_schedule_with_warmup

    from softprompt.prompt import task_init_text

    s, device = job["settings"], model.get_input_embeddings().weight.device
    t0 = time.perf_counter()
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        num_virtual_tokens=s["num_virtual_tokens"],
        prompt_tuning_init_text=task_init_text([], generation=(TEXT, TARGET)),
        tokenizer_name_or_path=job["model_dir"],
    )
    peft_model = get_peft_model(model, config)
    rows = guide_rows(tokenizer, pairs, job["peft_max_length"])
    loader = DataLoader(
        rows, shuffle=True, collate_fn=default_data_collator, batch_size=s["batch_size"]
    )
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=s["lr"])
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, len(loader) * s["epochs"])
    seconds, cpu, total = 0.0, 0.0, 0.0
    for _ in range(s["epochs"]):
        peft_model.train()
        total = 0.0
        _sync(device)
        e0, c0 = time.perf_counter(), time.process_time()
        for batch in loader:
            loss = peft_model(**{k: v.to(device) for k, v in batch.items()}).loss
            total += float(loss.detach())
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        _sync(device)
        seconds += time.perf_counter() - e0
        cpu += time.process_time() - c0
    wall = time.perf_counter() - t0
    peft_model.eval()
    run_dir = Path(job["runs_dir"]) / f"{job['method']}-seed{job['seed']}"
    peft_model.save_pretrained(str(run_dir))
    prompt = peft_model.prompt_encoder["default"].embedding.weight.detach()
    check = None
    if job["check_texts"]:
        check = peft_check(peft_model, model, tokenizer, prompt, job["check_texts"], job)

    def generate(texts, num_beams):
        toks = hf_generate(
            model,
            tokenizer,
            texts,
            max_length=s["max_length"],
            max_new_tokens=job["max_new_tokens"],
            num_beams=num_beams,
            batch_size=job["gen_batch_size"],
            prompt=prompt,
        )
        return decode(tokenizer, toks)

    record = {
        "train_seconds": seconds,
        "train_wall_seconds": wall,
        "train_cpu_seconds": cpu,
        "real_tokens_per_epoch": int(sum(int(r["attention_mask"].sum()) for r in rows)),
        "padded_tokens_per_epoch": len(rows) * job["peft_max_length"],
        "final_loss": total / len(loader),
        "run_dir": str(run_dir),
        "peft_check": check,
        "generation": "base model generate, prompt ++ token embeddings as inputs_embeds",
    }
    return record, generate


def full_ft_run(job, model, tokenizer, pairs):
    """Every weight trainable, AdamW at --ft-lr, loss on the target tokens only; transformers'
    `generate`."""
    from transformers import get_linear_schedule_with_warmup

    from softprompt.data import collate_train

    s, device = job["settings"], model.get_input_embeddings().weight.device
    t0 = time.perf_counter()
    rows = encoded_rows(tokenizer, pairs, s["max_length"])
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=job["ft_lr"], weight_decay=s["weight_decay"]
    )
    steps = math.ceil(len(rows) / s["batch_size"])
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps * s["epochs"])
    order = torch.Generator().manual_seed(job["seed"])
    seconds, cpu, total = 0.0, 0.0, 0.0
    for _ in range(s["epochs"]):
        model.train()
        total = 0.0
        perm = torch.randperm(len(rows), generator=order).tolist()
        _sync(device)
        e0, c0 = time.perf_counter(), time.process_time()
        for b in range(0, len(perm), s["batch_size"]):
            batch = collate_train(
                [rows[i] for i in perm[b : b + s["batch_size"]]], tokenizer.pad_token_id
            )
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            total += float(loss.detach())
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds += time.perf_counter() - e0
        cpu += time.process_time() - c0
    wall = time.perf_counter() - t0
    model.eval()
    model.requires_grad_(False)
    del optimizer  # its state is twice the model

    def generate(texts, num_beams):
        toks = hf_generate(
            model,
            tokenizer,
            texts,
            max_length=s["max_length"],
            max_new_tokens=job["max_new_tokens"],
            num_beams=num_beams,
            batch_size=job["gen_batch_size"],
        )
        return decode(tokenizer, toks)

    record = {
        "train_seconds": seconds,
        "train_wall_seconds": wall,
        "train_cpu_seconds": cpu,
        "real_tokens_per_epoch": sum(len(r) for r in rows),
        "final_loss": total / steps,
    }
    return record, generate


def run_job(job: dict) -> dict:
    """One (method, seed): train, then write out the dev inputs greedy and with beams, score."""
    from softprompt.metrics import generation_metrics

    with contextlib.redirect_stdout(sys.stderr):  # train() prints; stdout is for the tables
        model, tokenizer, device = _setup(job)
        before = _peak_mb(device)
        pairs = [tuple(p) for p in job["pairs"]]
        method = job["method"]
        if method.startswith("softprompt-"):
            record, generate = softprompt_run(job, model, tokenizer, pairs, method.split("-")[1])
        elif method == "peft-prompt":
            record, generate = peft_prompt_run(job, model, tokenizer, pairs)
        else:
            record, generate = full_ft_run(job, model, tokenizer, pairs)
        record["peak_mb"], record["training_mb"] = _peak_mb(device), _peak_mb(device) - before
        tokens = record["real_tokens_per_epoch"] * job["settings"]["epochs"]
        record["train_tokens_per_second"] = tokens / record["train_seconds"]
        log(
            f"  {method} seed {job['seed']}: trained in {record['train_seconds']:.1f}s "
            f"({record['train_tokens_per_second']:.0f} tokens/s), loss {record['final_loss']:.3f}"
        )
        record["decodings"], outputs = {}, {}
        decodings = [("greedy", 1)] + [(f"beam{job['beams']}", job["beams"])] * (job["beams"] > 1)
        for name, beams in decodings:
            _sync(device)
            g0, c0 = time.perf_counter(), time.process_time()
            preds = generate(job["dev_inputs"], beams)
            _sync(device)
            m = generation_metrics(preds, job["dev_refs"])
            m.pop("settings")
            m["num_beams"], m["seconds"] = beams, time.perf_counter() - g0
            m["cpu_seconds"] = time.process_time() - c0
            record["decodings"][name], outputs[name] = m, preds
            log(
                f"  {name}: BLEU {m['bleu']:.2f}, ROUGE-L {m['rouge_l']:.2f}, chrF {m['chrf']:.2f} ({m['seconds']:.1f}s)"
            )
        record["peak_mb_end"] = _peak_mb(device)
    return {"method": method, "seed": job["seed"], **record, "outputs": outputs}


class _NoEnd:
    """A tokenizer whose end token the engine does not see: every row runs to max_new_tokens."""

    eos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kw):
        return self._tokenizer(*args, **kw)


def speed_job(job: dict) -> dict:
    """Greedy generation, fixed length, one batch: softprompt's engine against transformers'
    `generate` with the prompt ++ token embeddings as `inputs_embeds`."""
    from softprompt.engine import Engine
    from softprompt.pipeline import SoftPrompt
    from softprompt.predictors import GenerateRow, predictor_for_prompt
    from softprompt.prompt import init_prompt, task_init_text

    with contextlib.redirect_stdout(sys.stderr):
        model, tokenizer, device = _setup(job)
    length, n_new = job["settings"]["max_length"], job["speed_tokens"]
    if job["prompt_dir"]:
        prompt, source = (
            SoftPrompt.load(job["prompt_dir"], model, tokenizer).prompt,
            job["prompt_dir"],
        )
    else:
        text = task_init_text([], generation=(TEXT, TARGET))
        prompt = init_prompt(
            model, tokenizer, job["settings"]["num_virtual_tokens"], "text", text=text
        )
        source = f"text init ({text!r})"
    prompt = prompt.to(device)
    task = gen_task(length)
    engine = Engine(model, _NoEnd(tokenizer))
    predictor = predictor_for_prompt(model, tokenizer, prompt, task)
    texts = job["speed_texts"]
    n = len(texts)

    def ours():
        return engine.generate(predictor, texts, max_new_tokens=n_new, batch_size=n)

    def theirs():
        toks = hf_generate(
            model,
            tokenizer,
            texts,
            max_length=length,
            max_new_tokens=n_new,
            batch_size=n,
            prompt=prompt,
            fixed=True,
        )
        return decode(tokenizer, toks)

    # warm-up, and the token ids: both sides write n_new tokens per row
    rows = [GenerateRow(predictor, engine.encode_generation(predictor, t), n_new) for t in texts]
    our_toks = [t for t, _ in engine.complete(rows)]
    their_toks = hf_generate(
        model,
        tokenizer,
        texts,
        max_length=length,
        max_new_tokens=n_new,
        batch_size=n,
        prompt=prompt,
        fixed=True,
    )
    counts = {
        "softprompt engine": sum(map(len, our_toks)),
        "transformers generate": sum(map(len, their_toks)),
    }
    eos = tokenizer.eos_token_id
    agree = sum(
        a[: len(_until_end(a, eos))] == b[: len(_until_end(a, eos))]
        for a, b in zip(our_toks, their_toks, strict=True)
    )
    ours(), theirs()
    seconds: dict[str, list[float]] = {"softprompt engine": [], "transformers generate": []}
    for r in range(job["speed_repeats"]):
        order = [("softprompt engine", ours), ("transformers generate", theirs)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            seconds[name].append(time.perf_counter() - t0)
    out = {"prompt": source, "inputs": n, "new_tokens_per_row": n_new, "rows_agreeing": agree}
    for name, s in seconds.items():
        med = statistics.median(s)
        out[name] = {
            "seconds": med,
            "runs": s,
            "new_tokens": counts[name],
            "tokens_per_second": counts[name] / med,
        }
    out["ratio"] = (
        out["softprompt engine"]["tokens_per_second"]
        / out["transformers generate"]["tokens_per_second"]
    )
    if job.get("speed_profile"):
        out["profile"] = {
            name: matmul_profile(fn)
            for name, fn in (("softprompt engine", ours), ("transformers generate", theirs))
        }
        mm = out["profile"]["softprompt engine"]["matmul_seconds"]
        # an engine whose every step but its matrix products took no time, against generate as timed
        out["ceiling"] = out["transformers generate"]["seconds"] / mm
    log(
        f"speed: engine {out['softprompt engine']['tokens_per_second']:.1f} tokens/s, "
        f"generate {out['transformers generate']['tokens_per_second']:.1f} tokens/s"
    )
    return out


MATMUL_OPS = ("aten::mm", "aten::addmm")
"""The linear layers' matrix products (with and without a bias) as torch's profiler names them."""


def matmul_profile(fn) -> dict:
    """fn() once under torch.profiler (CPU): seconds in the linear layers' matrix products
    (`MATMUL_OPS`, each op's time with its children), the profiled run's seconds, and the five
    ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    ops = prof.key_averages()
    mm = sum(e.cpu_time_total for e in ops if e.key in MATMUL_OPS) / 1e6
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:5]
    return {
        "matmul_seconds": mm,
        "profiled_seconds": wall,
        "top_self_seconds": {e.key: e.self_cpu_time_total / 1e6 for e in top},
    }


# ---------------------------------------------------------------------------------------------
# the orchestrator


def isolated(fn, job: dict) -> dict:
    """fn(job) in a fresh spawned process, so that its peak memory is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, job).result()


def mean_std(xs: list[float], digits: int = 2) -> str:
    """mean ± std ("-" for none)."""
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def tables(runs: list[dict], beam: str) -> str:
    """Per (method, seed), then mean ± std per method."""
    head = ["method", "seed"]
    head += [f"{d} {label}" for d in ("greedy", beam) for _, label in METRICS]
    head += ["train s", "train tokens/s", "peak MB", f"greedy s / {beam} s"]
    rows = []

    def cell(r, d, k, fmt=".2f"):  # a run decoded greedily only (--beams 1) has no beam cells
        return format(r["decodings"][d][k], fmt) if d in r["decodings"] else "-"

    for r in runs:
        scores = [cell(r, d, k) for d in ("greedy", beam) for k, _ in METRICS]
        gen_s = f"{cell(r, 'greedy', 'seconds', '.0f')} / {cell(r, beam, 'seconds', '.0f')}"
        rows.append(
            [
                r["method"],
                r["seed"],
                *scores,
                f"{r['train_seconds']:.1f}",
                f"{r['train_tokens_per_second']:.0f}",
                f"{r['peak_mb']:.0f}",
                gen_s,
            ]
        )
    out = markdown_table(head, rows)
    head = ["method", "seeds"] + [f"{d} {label}" for d in ("greedy", beam) for _, label in METRICS]
    head += ["train s", "train tokens/s", "peak MB"]
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        scores = []
        for d in ("greedy", beam):
            for k, _ in METRICS:
                xs = [r["decodings"][d][k] for r in rs if d in r["decodings"]]
                some = f" ({len(xs)} of the seeds)" if 0 < len(xs) < len(rs) else ""
                scores.append(mean_std(xs) + some)
        rows.append(
            [
                method,
                len(rs),
                *scores,
                mean_std([r["train_seconds"] for r in rs], 1),
                mean_std([r["train_tokens_per_second"] for r in rs], 0),
                f"{max(r['peak_mb'] for r in rs):.0f}",
            ]
        )
    return (
        out + "\n\nMean ± std over seeds (peak MB: the largest):\n\n" + markdown_table(head, rows)
    )


def print_ratios(runs: list[dict]) -> None:
    """softprompt's training tokens/s over PEFT's guide loop's, means over seeds."""
    tps = {m: [r["train_tokens_per_second"] for r in runs if r["method"] == m] for m in METHODS}
    if tps["peft-prompt"]:
        for m in ("softprompt-prompt", "softprompt-prefix"):
            if tps[m]:
                ratio = statistics.mean(tps[m]) / statistics.mean(tps["peft-prompt"])
                print(f"training tokens/s, {m} / peft-prompt (means over seeds): {ratio:.2f}x")


def speed_table(speed: dict) -> str:
    names = ("softprompt engine", "transformers generate")
    rows = [
        [
            n,
            speed[n]["new_tokens"],
            f"{speed[n]['seconds']:.2f}",
            f"{speed[n]['tokens_per_second']:.1f}",
        ]
        for n in names
    ]
    table = markdown_table(["system", "new tokens", "seconds (median)", "tokens/s"], rows)
    text = (
        f"{table}\n\nengine / generate tokens/s: {speed['ratio']:.2f}x; rows agreeing with "
        f"generate up to the engine's first end token: {speed['rows_agreeing']}/{speed['inputs']}; "
        f"prompt: {speed['prompt']}"
    )
    if "profile" in speed:
        for n in names:
            p = speed["profile"][n]
            top = ", ".join(f"{k} {v:.2f}" for k, v in p["top_self_seconds"].items())
            text += (
                f"\n{n}, profiled once: {p['matmul_seconds']:.2f} s of {p['profiled_seconds']:.2f} s "
                f"in the linear layers' matrix products ({'/'.join(MATMUL_OPS)}); most self time: {top}"
            )
        text += (
            f"\nceiling: generate's {speed['transformers generate']['seconds']:.2f} s over the engine's "
            f"matrix products' {speed['profile']['softprompt engine']['matmul_seconds']:.2f} s = "
            f"{speed['ceiling']:.2f}x (an engine that spent no time outside them)"
        )
    return text


def machine(device: str | None) -> str:
    if device and device.startswith("cuda") or (device is None and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    return f"{name}, {len(os.sched_getaffinity(0))} CPUs"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="E2E generation: softprompt vs PEFT vs full fine-tuning (bench/README.md)"
    )
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument(
        "--train-pairs", default="1000", help="training pairs, sampled by input, or 'all'"
    )
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the pair and dev samples")
    ap.add_argument("--dev-inputs", type=int, help="dev inputs scored [all 547]")
    ap.add_argument(
        "--beams", type=int, default=5, help="beams of the beam-search decoding (1: greedy only)"
    )
    ap.add_argument("--lr", type=float, help="softprompt's and PEFT's lr [softprompt's: 3e-2]")
    ap.add_argument(
        "--epochs", type=int, help=f"[softprompt's default for generation: {EPOCHS_FOR_GENERATION}]"
    )
    ap.add_argument("--num-virtual-tokens", type=int, help="[softprompt's: 8]")
    ap.add_argument("--batch-size", type=int, help="training batch, every method [softprompt's: 8]")
    ap.add_argument("--ft-lr", type=float, default=5e-5, help="full fine-tuning's AdamW lr")
    ap.add_argument(
        "--peft-max-length", type=int, help="the guide's padded length [the longest training row]"
    )
    ap.add_argument(
        "--peft-check", type=int, default=4, help="dev inputs for the PEFT generate check"
    )
    ap.add_argument("--max-new-tokens", type=int, help="[softprompt's: longest target + room]")
    ap.add_argument(
        "--gen-batch-size", type=int, default=16, help="inputs x beams per generation batch"
    )
    ap.add_argument(
        "--model",
        help="built-in short name (gemma3-270m), local folder or Hub id [built-in SmolLM2-135M-Instruct]",
    )
    ap.add_argument("--dtype", default="float32", help="base-model dtype")
    ap.add_argument("--device", help="cpu, cuda, ... [softprompt's pick]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS)")
    ap.add_argument("--no-speed", action="store_true", help="skip the generation speed section")
    ap.add_argument("--speed-only", action="store_true", help="only the speed section")
    ap.add_argument(
        "--write-sample", type=Path, help="write DIR/train.csv and DIR/dev.csv and stop"
    )
    ap.add_argument("--speed-inputs", type=int, default=32)
    ap.add_argument("--speed-tokens", type=int, default=40)
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument(
        "--speed-profile",
        action="store_true",
        help="also profile one run of each side: time in the linear layers' matrix products, "
        "and the engine's ceiling (generate's seconds over the engine's matrix-product seconds)",
    )
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="trainset.csv, devset.csv")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "bench" / "results" / "generation_runs")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generation.json")
    ap.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print the tables of earlier --out files (their runs together) and stop",
    )
    args = ap.parse_args(argv)
    if args.report:
        return args
    if args.train_pairs == "all":
        args.train_pairs = None
    elif not args.train_pairs.isdigit() or int(args.train_pairs) < 1:
        ap.error(f"--train-pairs takes a positive number or 'all' (got {args.train_pairs!r})")
    else:
        args.train_pairs = int(args.train_pairs)
    given = [args.beams, args.threads, args.speed_inputs, args.speed_tokens, args.speed_repeats]
    if min(given) < 1 or (args.dev_inputs is not None and args.dev_inputs < 1):
        ap.error("--beams, --threads, --dev-inputs and the --speed-* counts must be at least 1")
    for name in ("trainset.csv", "devset.csv"):
        if not (args.data_dir / name).is_file():
            ap.error(
                f"{args.data_dir / name} not found; pass --data-dir with trainset.csv and devset.csv"
            )
    return args


def report(paths: list[Path]) -> int:
    """The tables of several --out files: runs of one setting split over processes or machines.
    Refuses files whose sample or decoding settings differ."""
    results = []
    for p in paths:
        try:
            results.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            sys.exit(f"--report {p}: cannot read it as a bench/generation.py result ({e})")
    keys = ("train_pairs", "train_inputs", "dev_inputs", "resolved")
    for p, r in zip(paths[1:], results[1:], strict=True):
        differ = [k for k in keys if r.get(k) != results[0].get(k)]
        if differ:
            sys.exit(f"--report {p}: its {', '.join(differ)} differ from {paths[0]}'s")
    runs = [run for r in results for run in r["runs"]]
    beams = {s["beams"] for s in (r["settings"] for r in results) if s["beams"] > 1} or {5}
    if not runs or len(beams) > 1:
        sys.exit("--report: the files hold no runs, or runs decoded with different --beams")
    first = results[0]
    print(
        f"{first['machine']}; train: {first['train_pairs']} pairs from {first['train_inputs']} inputs; "
        f"dev: {first['dev_inputs']} inputs; {first['resolved']}"
    )
    print(tables(runs, f"beam{beams.pop()}"))
    print_ratios(runs)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    threads = str(args.threads)  # the spawned workers inherit these
    os.environ.update(
        OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false"
    )
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from softprompt.modeling.builtin import builtin_model, builtin_model_dir

    started = time.time()
    model_dir = str(builtin_model_dir(args.model)) if builtin_model(args.model) else args.model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # converts a built-in model once, here
    given = {k: getattr(args, k) for k in ("lr", "epochs", "num_virtual_tokens", "batch_size")}
    resolved = TrainConfig(
        data=None, task="generation", **{k: v for k, v in given.items() if v is not None}
    ).resolved()
    settings = {
        k: getattr(resolved, k)
        for k in ("lr", "epochs", "num_virtual_tokens", "batch_size", "max_length", "weight_decay")
    }

    pairs = sample_train(
        read_pairs(args.data_dir / "trainset.csv"), args.train_pairs, args.sample_seed
    )
    dev_inputs, dev_refs = sample_dev(
        read_pairs(args.data_dir / "devset.csv"), args.dev_inputs, args.sample_seed
    )
    if args.write_sample:
        write_sample(args.write_sample, pairs, dev_inputs, dev_refs)
        return 0
    rows = encoded_rows(tokenizer, pairs, settings["max_length"])
    max_new = args.max_new_tokens or default_max_new_tokens(tokenizer, [y for _, y in pairs])
    peft_max_length = args.peft_max_length or max(len(r) for r in rows)
    n_inputs = len({x for x, _ in pairs})
    log(
        f"{len(pairs)} training pairs from {n_inputs} inputs; {len(dev_inputs)} dev inputs "
        f"({sum(map(len, dev_refs))} refs); settings {settings}; max_new_tokens {max_new}"
    )
    base = {
        "model": args.model,
        "model_dir": model_dir,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "settings": settings,
        **given,
        "ft_lr": args.ft_lr,
        "max_new_tokens": max_new,
        "gen_batch_size": args.gen_batch_size,
        "beams": args.beams,
        "peft_max_length": peft_max_length,
        "runs_dir": str(args.runs_dir),
    }

    runs: list[dict] = []
    speed = None

    def save(runs, speed) -> None:
        """All numbers so far to --out (after every run, so a long run that stops keeps them)."""
        result = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "resolved": {**settings, "max_new_tokens": max_new, "peft_max_length": peft_max_length},
            "train_pairs": len(pairs),
            "train_inputs": n_inputs,
            "dev_inputs": len(dev_inputs),
            "machine": machine(args.device),
            "wall_seconds": time.time() - started,
            "runs": runs,
            "speed": speed,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    outputs_path = args.out.with_name(args.out.stem + "_outputs.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.speed_only:
        outputs_path.write_text("")
        job = {
            **base,
            "pairs": pairs,
            "dev_inputs": dev_inputs,
            "dev_refs": dev_refs,
        }
        for seed in args.seeds:
            for method in args.methods:
                log(f"{method}, seed {seed}")
                check = dev_inputs[: args.peft_check] if seed == args.seeds[0] else []
                r = isolated(run_job, {**job, "method": method, "seed": seed, "check_texts": check})
                with outputs_path.open("a") as f:
                    for name, preds in r.pop("outputs").items():
                        for x, p, refs in zip(dev_inputs, preds, dev_refs, strict=True):
                            f.write(
                                json.dumps(
                                    {
                                        "method": method,
                                        "seed": seed,
                                        "decoding": name,
                                        "input": x,
                                        "output": p,
                                        "references": refs,
                                    }
                                )
                                + "\n"
                            )
                runs.append(r)
                save(runs, None)

    if not args.no_speed:
        first = Path(args.runs_dir) / f"softprompt-prompt-seed{args.seeds[0]}"
        texts = [dev_inputs[i % len(dev_inputs)] for i in range(args.speed_inputs)]
        log(
            f"speed: {len(texts)} inputs x {args.speed_tokens} new tokens, {args.speed_repeats} repeats"
        )
        speed = isolated(
            speed_job,
            {
                **base,
                "seed": args.seeds[0],
                "speed_texts": texts,
                "speed_tokens": args.speed_tokens,
                "speed_repeats": args.speed_repeats,
                "speed_profile": args.speed_profile,
                "prompt_dir": str(first) if (first / "softprompt.json").is_file() else None,
            },
        )

    import peft
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{machine(args.device)}; threads {args.threads}; dtype {args.dtype}; model {args.model or 'built-in SmolLM2-135M-Instruct'}"
    )
    print(
        f"train: {len(pairs)} pairs from {n_inputs} inputs (sample seed {args.sample_seed}); "
        f"dev: {len(dev_inputs)} inputs, {sum(map(len, dev_refs))} refs; epochs {settings['epochs']}, "
        f"lr {settings['lr']} (full-ft {args.ft_lr}), batch {settings['batch_size']}, "
        f"P {settings['num_virtual_tokens']}; max new tokens {max_new}; PEFT rows padded to {peft_max_length}"
    )
    beam = f"beam{args.beams}"
    if runs:
        print(f"\n## E2E dev scores (greedy and {args.beams} beams) and training\n")
        print(tables(runs, beam))
        for r in runs:
            if r.get("peft_check"):
                c = r["peft_check"]
                print(
                    f"\nPEFT generate check (seed {r['seed']}, {c['inputs']} dev inputs, greedy, one at a time): "
                    f"PEFT's cached generate equals generate(use_cache=False) on {c['peft_cached_equal_reference']}, "
                    f"prompt ++ embeddings as inputs_embeds in the base model's generate (used) on "
                    f"{c['inputs_embeds_equal_reference']}"
                )
                if c["inputs_embeds_equal_reference"] < c["inputs"]:
                    print(
                        "WARNING: the inputs_embeds generation used for peft-prompt differs from the reference"
                    )
                print(
                    f"  e.g. reference: {c['example']['reference']!r}; PEFT cached: {c['example']['peft_cached']!r}"
                )
                break
    if speed is not None:
        print(
            f"\n## Generation speed (greedy, {speed['inputs']} inputs in one batch, {speed['new_tokens_per_row']} new tokens each)\n"
        )
        print(speed_table(speed))
    print_ratios(runs)
    save(runs, speed)
    print(f"\nwrote {args.out}" + (f" and {outputs_path}" if runs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: `softprompt serve` (many adapters, one batched model) against PEFT serving
the same requests one adapter at a time. By hand, not CI; run it on an otherwise idle machine.

    python bench/serve.py                                   # 10,000 requests, 16 adapters, 64 clients
    python bench/serve.py --requests 200 --peft-requests 100 # quick end-to-end check

1. Setup: 16 adapters for the built-in default model in bench/results/serve_adapters/. By default
   they are made with `init_prompt` (vocab init, one seed each) + `save_adapter`: untrained, but the
   serving cost is the same. `--train-epochs N` trains each on the demo data instead (slow on CPU).
2. softprompt: `softprompt serve` in a subprocess on loopback, started with ONE adapter; after a
   warm-up its RSS and tensor bytes are read; then the other 15 are loaded through
   POST /v1/adapters, warmed up, read again. Then `--requests` classification requests (one tweet
   each, adapter chosen at random) from `--clients` concurrent asyncio + httpx clients.
3. PEFT: `PeftModel.from_pretrained` + `load_adapter` for every adapter; the first
   `--peft-requests` of the same requests grouped by adapter; per adapter `set_adapter`, then
   batches of --max-batch-size inputs scored by label scoring with a plain forward (every input
   once per label, prompt included, right-padded; the label tokens' log-probabilities summed,
   softmax over labels). In-process and offline: no HTTP, no queueing, so it favours PEFT. Its
   throughput is extrapolated to --requests when it runs on a subset (the output says so).
4. PEFT generate: the guide's own inference (`generate`, batch 16, 6 new tokens, the text
   matched to a label), one adapter at a time, on the first `--peft-generate-requests`.

`--mix` runs a mixed workload instead (no PEFT): classify, completions, chat and streamed chat
(greedy, `--max-tokens`) over the adapters from `--clients` clients, `--requests` in all, with
throughput and p50/p99 latency per kind; then, on the same server, `--classify-requests` classify
requests alone and again while `--long-clients` generations of `--long-tokens` run (the p99
ratio); then the first `--serial-requests` of the mix's generations one at a time (new tokens/s of
the mix over this loop's). Any failed request makes it exit 1.

    python bench/serve.py --mix --requests 2000 --clients 32

`--server-src DIR` (repeatable) runs the server from another checkout's `src` folder, and
`--rounds N` runs each of them N times, alternating (A, B, A, B, ...), with no PEFT: the
throughput of two commits measured in the same run, e.g. a change against its base:

    git archive d9b66fd | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 python bench/serve.py --server-cpus 1 --client-cpus 0 --dtype float32 \
        --requests 1000 --server-src /tmp/base/src --server-src src --rounds 3

By default the load generator and the server share the machine's cores. `--server-cpus 1
--client-cpus 0` pins the server (and then PEFT, which runs in this process) to CPU 1 and the load
generator to CPU 0, so both systems get the same core and the clients' own work is not charged to
either (as when the load comes from other machines).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "softprompt" / "demo" / "complaints_train.csv"
LABELS = ["complaint", "no complaint"]


def log(msg: str) -> None:
    print(f"[serve-bench] {msg}", file=sys.stderr, flush=True)


def adapter_paths(folder: Path, names: list[str]) -> list[Path]:
    """Where `make_adapters` puts each adapter: the first in `folder`, the others in folder/more."""
    return [folder / names[0]] + [folder / "more" / x for x in names[1:]]


def make_adapters(folder: Path, n: int, P: int, train_epochs: int, method: str = "prompt") -> list[str]:  # fmt: skip
    """a00 directly in `folder` (loaded at start), a01.. in folder/more (loaded later).
    method "prefix": deep prompts (PEFT's PREFIX_TUNING), the real keys/values of vocab tokens."""
    from softprompt.adapters import save_adapter
    from softprompt.data import Task
    from softprompt.modeling.load import load_base
    from softprompt.peft_format import peft_config, prefix_config
    from softprompt.prompt import init_prefix, init_prompt

    names = [f"a{i:02d}" for i in range(n)]
    paths = adapter_paths(folder, names)
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return names
    model, tok, _ = load_base(None)
    for i, path in enumerate(paths):
        if train_epochs > 0:
            from softprompt import TrainConfig, train

            log(f"training {names[i]} ({train_epochs} epochs)")
            train(TrainConfig(data=str(DEMO), text_column="Tweet text", label_column="Label",
                              out=str(path), epochs=train_epochs, init="vocab", seed=i,
                              num_virtual_tokens=P, overwrite=True, progress=False,
                              method=method, suffix_tokens=0, head="none"))  # fmt: skip
            continue
        if method == "prefix":
            prompt = init_prefix(model, tok, P, "vocab", seed=i)
            conf = prefix_config(model, prompt, base_model="default", projection=False)
        else:
            prompt = init_prompt(model, tok, P, "vocab", seed=i)
            conf = peft_config(model, prompt, base_model="default", init="vocab", init_text=None,
                               tokenizer_name=None)  # fmt: skip
        task = Task(text_column="Tweet text", label_names=LABELS, label_column="Label",
                    extra={"base_model": "default"})  # fmt: skip
        save_adapter(path, prompt, conf, task)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def load(url: str, requests: list[tuple[str, str]], clients: int) -> dict:
    import httpx

    lat: list[float] = []
    failures: list[str] = []
    answers: dict[int, dict] = {}
    queue = list(enumerate(requests))
    queue.reverse()

    async def client(c: httpx.AsyncClient) -> None:
        while queue:
            i, (adapter, text) = queue.pop()
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/classify", json={"adapter": adapter, "inputs": [text]})
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    answers[i] = r.json()["results"][0]["probabilities"]
            except Exception as e:  # noqa: BLE001 - count it
                failures.append(repr(e))
            lat.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {
        "requests": len(requests),
        "seconds": wall,
        "throughput_rps": len(requests) / wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "failed": len(failures),
        "failures_sample": failures[:5],
        "answers": answers,
    }


def start_server(args, folder: Path, src: Path = ROOT / "src") -> tuple[subprocess.Popen, str]:
    """`softprompt serve` from the `src` folder given, on loopback (pinned to --server-cpus if
    given); returns once /health is 200."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "softprompt.cli", "serve", "--adapters", str(folder),
           "--port", str(port), "--max-batch-size", str(args.max_batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--kv-cache-mb", str(args.kv_cache_mb),
           "--dtype", args.dtype, "--log-level", "warning", "--allow-adapter-admin"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    cpus = args.server_cpus
    if cpus:
        env["OMP_NUM_THREADS"] = str(len(cpus))
    proc = subprocess.Popen(
        cmd, env=env, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    )
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit("the server did not start in 300 s")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_softprompt(args, folder: Path, names: list[str], requests, src: Path = ROOT / "src") -> dict:  # fmt: skip
    import httpx

    proc, url = start_server(args, folder, src)
    out: dict = {}
    try:
        texts = [t for _, t in requests]

        def memory(tag: str) -> dict:
            m = httpx.get(f"{url}/metrics").text
            return {
                "adapters": int(metric(m, "softprompt_adapters_loaded")),
                "rss_bytes": rss_bytes(proc.pid),
                "prompt_bytes": int(metric(m, "softprompt_prompt_bytes")),
                "kv_cache_bytes": int(metric(m, "softprompt_kv_cache_bytes")),
                "kv_cache_entries": int(metric(m, "softprompt_kv_cache_entries")),
            }

        warm = [(names[0], texts[i % len(texts)]) for i in range(args.clients)]
        asyncio.run(load(url, warm, args.clients))
        out["memory_1"] = memory("1")
        for name in names[1:]:
            r = httpx.post(f"{url}/v1/adapters", json={"path": f"more/{name}"}, timeout=60)
            r.raise_for_status()
        warm = [(names[i % len(names)], texts[i % len(texts)]) for i in range(4 * len(names))]
        asyncio.run(load(url, warm, args.clients))
        out["memory_n"] = memory("n")
        m0 = httpx.get(f"{url}/metrics").text
        log(f"softprompt: {len(requests)} requests, {args.clients} clients")
        out["load"] = asyncio.run(load(url, requests, args.clients))
        m1 = httpx.get(f"{url}/metrics").text
        batches = metric(m1, "softprompt_batch_rows_count") - metric(
            m0, "softprompt_batch_rows_count"
        )
        rows = metric(m1, "softprompt_batch_rows_sum") - metric(m0, "softprompt_batch_rows_sum")
        adap = metric(m1, "softprompt_batch_adapters_sum") - metric(
            m0, "softprompt_batch_adapters_sum"
        )
        out["mean_batch_rows"] = rows / batches if batches else 0
        out["mean_batch_adapters"] = adap / batches if batches else 0
    finally:
        stop_server(proc)
    return out


def run_peft(args, folder: Path, names: list[str], requests) -> dict:
    import torch
    from peft import PeftModel

    from softprompt.adapters import load_adapter
    from softprompt.data import input_budget, input_token_ids, label_token_ids
    from softprompt.modeling.load import load_base

    model, tok, _ = load_base(None)
    paths = dict(zip(names, adapter_paths(folder, names), strict=True))
    pm = PeftModel.from_pretrained(model, str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(paths[n]), adapter_name=n)
    pm.eval()
    task = load_adapter(paths[names[0]]).task
    budget = input_budget(tok, task)
    labels = [label_token_ids(tok, x) for x in task.label_names]
    by_adapter: dict[str, list[int]] = {}
    for i, (a, _) in enumerate(requests):
        by_adapter.setdefault(a, []).append(i)
    answers: dict[int, dict] = {}
    log(f"PEFT: {len(requests)} requests")
    t0 = time.perf_counter()
    with torch.no_grad():
        for a, idx in by_adapter.items():
            pm.set_adapter(a)
            for s in range(0, len(idx), args.max_batch_size):
                part = idx[s : s + args.max_batch_size]
                seqs = [input_token_ids(tok, task, requests[i][1], budget) for i in part]
                rows = [
                    (b, j, s_ + lab) for b, s_ in enumerate(seqs) for j, lab in enumerate(labels)
                ]
                T = max(len(r[2]) for r in rows)
                ids = torch.full((len(rows), T), tok.pad_token_id)
                mask = torch.zeros((len(rows), T), dtype=torch.long)
                for r, (_, _, x) in enumerate(rows):
                    ids[r, : len(x)] = torch.tensor(x)
                    mask[r, : len(x)] = 1
                logits = pm(input_ids=ids, attention_mask=mask).logits[
                    :, -T:
                ]  # drop virtual tokens
                logp = torch.log_softmax(logits.float(), -1)
                scores = torch.zeros(len(part), len(labels))
                for r, (b, j, _) in enumerate(rows):
                    n_in = len(seqs[b])
                    lab = labels[j]
                    pos = torch.arange(n_in - 1, n_in - 1 + len(lab))
                    scores[b, j] = logp[r, pos, torch.tensor(lab)].sum()
                probs = torch.softmax(scores, -1)
                for b, i in enumerate(part):
                    answers[i] = dict(zip(task.label_names, probs[b].tolist(), strict=True))
    wall = time.perf_counter() - t0
    return {"requests": len(requests), "seconds": wall, "throughput_rps": len(requests) / wall,
            "answers": answers}  # fmt: skip


def run_peft_generate(folder: Path, names: list[str], requests) -> dict:
    """The PEFT guide's own inference, one adapter at a time: `generate` (batch 16, 6 new tokens)
    after the guide's template, then the text is matched to a label."""
    import torch
    from peft import PeftModel

    sys.path.insert(0, str(ROOT / "bench"))
    from speed import peft_generate

    from softprompt.modeling.load import load_base

    model, tok, _ = load_base(None)
    tok.padding_side = "left"
    paths = dict(zip(names, adapter_paths(folder, names), strict=True))
    pm = PeftModel.from_pretrained(model, str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(paths[n]), adapter_name=n)
    pm.eval()
    by_adapter: dict[str, list[int]] = {}
    for i, (a, _) in enumerate(requests):
        by_adapter.setdefault(a, []).append(i)
    log(f"PEFT generate: {len(requests)} requests")
    valid = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for a, idx in by_adapter.items():
            pm.set_adapter(a)
            outs = peft_generate(pm, tok, [requests[i][1] for i in idx], torch.device("cpu"))
            valid += sum(o in LABELS for o in outs)
    wall = time.perf_counter() - t0
    return {"requests": len(requests), "seconds": wall, "throughput_rps": len(requests) / wall,
            "valid_labels": valid}  # fmt: skip


KINDS = ("classify", "completion", "chat", "chat_stream")


async def call(c, kind: str, adapter: str, text: str, max_tokens: int) -> dict:
    """One request of `kind`; {kind, ok, seconds, tokens (new tokens), error}. Streams: the
    answer must end in `data: [DONE]` with no error event (then `first_s`: time to the first
    piece)."""
    t0 = time.perf_counter()
    out = {"kind": kind, "ok": False, "tokens": 0, "error": None}
    gen = {"model": adapter, "max_tokens": max_tokens, "temperature": 0}
    chat = {**gen, "messages": [{"role": "user", "content": text}]}
    try:
        if kind == "classify":
            r = await c.post("/v1/classify", json={"adapter": adapter, "inputs": [text]})
            out["ok"] = r.status_code == 200 and len(r.json()["results"]) == 1
        elif kind in ("completion", "chat"):
            path, body = (("/v1/completions", {**gen, "prompt": text}) if kind == "completion"
                          else ("/v1/chat/completions", chat))  # fmt: skip
            r = await c.post(path, json=body)
            out["ok"] = r.status_code == 200
            if out["ok"]:
                out["tokens"] = r.json()["usage"]["completion_tokens"]
        else:
            body = {**chat, "stream": True, "stream_options": {"include_usage": True}}
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                done, bad = False, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        bad = ev["error"]["message"]
                    elif ev.get("usage"):
                        out["tokens"] = ev["usage"]["completion_tokens"]
                    elif "first_s" not in out and ev["choices"][0]["delta"].get("content"):
                        out["first_s"] = time.perf_counter() - t0
                out["ok"] = r.status_code == 200 and done and bad is None
                if not out["ok"]:
                    out["error"] = bad or f"{r.status_code}, [DONE] {'seen' if done else 'missing'}"
        if not out["ok"] and out["error"] is None:
            out["error"] = f"{r.status_code}: {r.text[:200]}"
    except Exception as e:  # noqa: BLE001 - count it
        out["error"] = repr(e)
    out["seconds"] = time.perf_counter() - t0
    return out


async def drive(url: str, jobs: list[tuple], clients: int, background: list[tuple] = ()) -> tuple:
    """`jobs` (kind, adapter, text, max_tokens) from `clients` concurrent clients; while they
    run, each of `background` is sent again and again by a client of its own (and cancelled at
    the end). Returns (results of jobs, wall seconds, results of background requests)."""
    import httpx

    queue = list(reversed(jobs))
    results: list[dict] = []
    back: list[dict] = []
    limits = httpx.Limits(max_connections=clients + len(background) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:

        async def worker() -> None:
            while queue:
                results.append(await call(c, *queue.pop()))

        async def repeat(job: tuple) -> None:
            while True:
                back.append(await call(c, *job))

        loops = [asyncio.ensure_future(repeat(j)) for j in background]
        if loops:
            await asyncio.sleep(1.0)  # the long generations are decoding
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        for t in loops:
            t.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    return results, wall, back


def summary(results: list[dict], wall: float) -> dict:
    """Per kind: requests, failures, throughput, p50/p99 latency (ms), new tokens."""

    def pct(xs: list[float], p: float) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")

    out = {}
    for kind in KINDS:
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            continue
        lat = [r["seconds"] for r in rs]
        out[kind] = {
            "requests": len(rs),
            "failed": sum(not r["ok"] for r in rs),
            "failures_sample": [r["error"] for r in rs if not r["ok"]][:3],
            "throughput_rps": len(rs) / wall,
            "p50_ms": pct(lat, 0.5),
            "p99_ms": pct(lat, 0.99),
            "new_tokens": sum(r["tokens"] for r in rs),
        }
        first = [r["first_s"] for r in rs if "first_s" in r]
        if first:
            out[kind]["first_piece_p50_ms"] = pct(first, 0.5)
    return out


def run_mix(args, folder: Path, names: list[str], texts: list[str]) -> dict:
    """The mixed workload, all phases on one server in one run (see --mix)."""
    import httpx

    rng = random.Random(args.seed)
    adapters = names[: args.adapters]
    mix = [(KINDS[i % len(KINDS)], rng.choice(adapters), texts[i % len(texts)], args.max_tokens)
           for i in range(args.requests)]  # fmt: skip
    rng.shuffle(mix)
    quiet_jobs = [("classify", rng.choice(adapters), texts[i % len(texts)], 0)
                  for i in range(args.classify_requests)]  # fmt: skip
    loaded_jobs = [("classify", rng.choice(adapters), texts[-1 - i % len(texts)], 0)
                   for i in range(args.classify_requests)]  # fmt: skip
    long_jobs = [("completion", adapters[i % len(adapters)], texts[i], args.long_tokens)
                 for i in range(args.long_clients)]  # fmt: skip
    gen = [j for j in mix if j[0] != "classify"]
    serial_jobs = gen[: args.serial_requests]
    proc, url = start_server(args, folder)
    out: dict = {}
    try:
        for name in names[1:]:
            httpx.post(f"{url}/v1/adapters", json={"path": f"more/{name}"}, timeout=60).raise_for_status()  # fmt: skip
        warm = [(k, a, texts[i], 4) for i, (a, k) in enumerate(itertools.product(adapters, KINDS))]  # fmt: skip
        asyncio.run(drive(url, warm, args.clients))
        log(f"mix: {len(mix)} requests ({', '.join(KINDS)}) over {len(adapters)} adapters, {args.clients} clients")  # fmt: skip
        res, wall, _ = asyncio.run(drive(url, mix, args.clients))
        out["mix"] = summary(res, wall) | {"seconds": wall}
        new_tokens = sum(r["tokens"] for r in res)
        out["mix_generation_tokens_per_s"] = new_tokens / wall
        log(f"classify alone: {len(quiet_jobs)} requests")
        res, wall, _ = asyncio.run(drive(url, quiet_jobs, args.clients))
        out["classify_quiet"] = summary(res, wall)["classify"]
        log(f"classify while {len(long_jobs)} generations of {args.long_tokens} tokens run")
        res, wall, back = asyncio.run(drive(url, loaded_jobs, args.clients, long_jobs))
        out["classify_loaded"] = summary(res, wall)["classify"]
        out["background_generations"] = {"finished": sum(r["ok"] for r in back),
                                         "failed": sum(not r["ok"] and "CancelledError" not in str(r["error"]) for r in back)}  # fmt: skip
        log(f"one request at a time: {len(serial_jobs)} of the mix's generation requests")
        res, wall, _ = asyncio.run(drive(url, serial_jobs, 1))
        out["serial"] = summary(res, wall) | {"seconds": wall}
        out["serial_generation_tokens_per_s"] = sum(r["tokens"] for r in res) / wall
    finally:
        stop_server(proc)
    out["classify_p99_ratio_loaded_vs_quiet"] = out["classify_loaded"]["p99_ms"] / out["classify_quiet"]["p99_ms"]  # fmt: skip
    out["generation_throughput_ratio_mix_vs_serial"] = (
        out["mix_generation_tokens_per_s"] / out["serial_generation_tokens_per_s"]
    )
    out["failed"] = (
        sum(k["failed"] for k in out["mix"].values() if isinstance(k, dict))
        + out["classify_quiet"]["failed"] + out["classify_loaded"]["failed"]
        + sum(k["failed"] for k in out["serial"].values() if isinstance(k, dict))
        + out["background_generations"]["failed"]
    )  # fmt: skip
    return out


def print_mix(args, out: dict) -> None:
    m = out["mix"]
    total = sum(v["requests"] for v in m.values() if isinstance(v, dict))
    print(f"mixed workload: {total} requests over {args.adapters} adapters, {args.clients} clients, "
          f"max_tokens {args.max_tokens}, greedy: {m['seconds']:.1f} s")  # fmt: skip
    for kind in KINDS:
        if kind in m:
            k = m[kind]
            first = f", first piece p50 {k['first_piece_p50_ms']:.0f} ms" if "first_piece_p50_ms" in k else ""  # fmt: skip
            print(f"  {kind:<12} {k['requests']:>5} requests, failed {k['failed']}, "
                  f"{k['throughput_rps']:.1f} req/s, p50 {k['p50_ms']:.0f} ms, p99 {k['p99_ms']:.0f} ms{first}")  # fmt: skip
    q, ld = out["classify_quiet"], out["classify_loaded"]
    print(f"classify p99 with no generations: {q['p99_ms']:.0f} ms (p50 {q['p50_ms']:.0f}); while "
          f"{args.long_clients} generations of max_tokens {args.long_tokens} run: {ld['p99_ms']:.0f} ms "
          f"(p50 {ld['p50_ms']:.0f}); ratio {out['classify_p99_ratio_loaded_vs_quiet']:.2f}x "
          f"({out['background_generations']['finished']} long generations finished meanwhile)")  # fmt: skip
    print(f"generation: {out['mix_generation_tokens_per_s']:.1f} new tokens/s over the mix vs "
          f"{out['serial_generation_tokens_per_s']:.1f} tokens/s one request at a time "
          f"({sum(v['requests'] for v in out['serial'].values() if isinstance(v, dict))} requests); "
          f"ratio {out['generation_throughput_ratio_mix_vs_serial']:.2f}x")  # fmt: skip
    print(f"failures: {out['failed']}")


def cpu_list(text: str) -> list[int]:
    """'1', '0,2' or '2-3' as a list of CPU numbers this process may use."""
    cpus: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.partition("-")
            cpus += range(int(a), int(b or a) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list like 1, 0,2 or 2-3") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not set(cpus) <= allowed:
        raise argparse.ArgumentTypeError(
            f"CPUs {text!r} are not among this machine's {sorted(allowed)}"
        )
    return cpus


def run_rounds(args, folder: Path, names: list[str], requests) -> dict:
    """Each --server-src's server on the same requests, --rounds times, alternating."""
    srcs = [Path(x) for x in args.server_src]
    runs = []
    for r in range(args.rounds):
        for src in srcs:
            log(f"round {r + 1}: the server from {src}")
            load = run_softprompt(args, folder, names, requests, src)["load"]
            runs.append({"round": r + 1, "src": str(src), **{k: v for k, v in load.items() if k != "answers"}})  # fmt: skip
            print(f"round {r + 1} {src}: {load['throughput_rps']:.2f} req/s, p50 {load['p50_ms']:.0f} ms, "
                  f"p99 {load['p99_ms']:.0f} ms, failed {load['failed']}", flush=True)  # fmt: skip
    means = {str(s): sum(x["throughput_rps"] for x in runs if x["src"] == str(s)) / args.rounds for s in srcs}  # fmt: skip
    for s, m in means.items():
        print(f"mean {s}: {m:.2f} req/s over {args.rounds} runs")
    return {"runs": runs, "mean_rps": means}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--requests", type=int, default=10_000, help="classification requests for softprompt"
    )
    p.add_argument("--peft-requests", type=int, default=None,
                   help="the first N of the same requests for PEFT (default: all; fewer is extrapolated)")  # fmt: skip
    p.add_argument("--peft-generate-requests", type=int, default=200,
                   help="the first N requests also through PEFT's generate (the guide's inference); 0: skip")  # fmt: skip
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--num-virtual-tokens", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--kv-cache-mb", type=float, default=256.0,
                   help="server KV cache budget (1 keeps ~2 adapters' KV for the default model)")  # fmt: skip
    p.add_argument(
        "--train-epochs", type=int, default=0, help="train the adapters (default: init only)"
    )
    p.add_argument("--method", choices=["prompt", "prefix"], default="prompt",
                   help="adapters of prompt tuning or deep prompts (prefix tuning), both for PEFT too")  # fmt: skip
    p.add_argument("--adapters-dir", default=None,
                   help="default: bench/results/serve_adapters (prompt) or serve_adapters_prefix")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-cpus", type=cpu_list, default=None,
                   help="CPUs for the server and for PEFT, e.g. 1 or 2-3 (default: all, shared)")  # fmt: skip
    p.add_argument("--client-cpus", type=cpu_list, default=None,
                   help="CPUs for the load generator, e.g. 0 (default: all, shared)")  # fmt: skip
    p.add_argument("--mix", action="store_true",
                   help="the mixed workload instead (classify, completions, chat, streamed chat; no PEFT)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=32, help="--mix: max_tokens of its generations")  # fmt: skip
    p.add_argument("--long-tokens", type=int, default=256,
                   help="--mix: max_tokens of the long generations classify is measured against")  # fmt: skip
    p.add_argument("--long-clients", type=int, default=8, help="--mix: long generations at once")
    p.add_argument("--classify-requests", type=int, default=500,
                   help="--mix: classify requests alone and again while long generations run")  # fmt: skip
    p.add_argument("--serial-requests", type=int, default=64,
                   help="--mix: generation requests of the mix sent again one at a time")  # fmt: skip
    p.add_argument("--dtype", default="auto", help="the server's --dtype (auto: bfloat16 where the CPU has it)")  # fmt: skip
    p.add_argument("--server-src", action="append", default=None,
                   help="run the server from this src folder (repeatable: each in turn, no PEFT)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="with --server-src: runs of each, alternating")  # fmt: skip
    p.add_argument("--out", default=None,
                   help="default: bench/results/serve.json (serve_mix.json with --mix)")  # fmt: skip
    args = p.parse_args()
    name = (
        "serve_mix.json" if args.mix else "serve_rounds.json" if args.server_src else "serve.json"
    )
    args.out = args.out or str(ROOT / "bench" / "results" / name)
    sys.path.insert(0, str(ROOT / "src"))

    suffix = "" if args.method == "prompt" else f"_{args.method}"
    folder = Path(args.adapters_dir or ROOT / "bench" / "results" / f"serve_adapters{suffix}")
    names = make_adapters(folder, args.adapters, args.num_virtual_tokens, args.train_epochs, args.method)  # fmt: skip
    with open(DEMO, newline="") as f:
        texts = [row["Tweet text"] for row in csv.DictReader(f)]
    if args.mix:
        if args.adapters < 4:
            raise SystemExit("--mix needs --adapters 4 or more")
        out = run_mix(args, folder, names, texts)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), **out}, indent=2) + "\n")
        print_mix(args, out)
        print(f"wrote {args.out}")
        raise SystemExit(1 if out["failed"] else 0)
    rng = random.Random(args.seed)
    requests = [(rng.choice(names), texts[i % len(texts)]) for i in range(args.requests)]
    if args.server_src:
        out = run_rounds(args, folder, names, requests)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": vars(args), **out}, indent=2) + "\n")
        print(f"wrote {args.out}")
        raise SystemExit(1 if any(r["failed"] for r in out["runs"]) else 0)
    peft_n = min(args.peft_requests or args.requests, args.requests)

    sp = run_softprompt(args, folder, names, requests)
    if args.server_cpus:  # PEFT runs here, on the server's CPUs
        import torch

        os.sched_setaffinity(0, args.server_cpus)
        torch.set_num_threads(len(args.server_cpus))
    pf = run_peft(args, folder, names, requests[:peft_n])
    gen_n = min(args.peft_generate_requests, args.requests)
    pg = run_peft_generate(folder, names, requests[:gen_n]) if gen_n else None
    both = [i for i in pf["answers"] if i in sp["load"]["answers"]]
    diff = max(
        (abs(sp["load"]["answers"][i][k] - pf["answers"][i][k]) for i in both for k in LABELS),
        default=float("nan"),
    )
    extrapolated = peft_n < args.requests
    m1, mn = sp["memory_1"], sp["memory_n"]
    result = {
        "settings": vars(args) | {"peft_requests": peft_n},
        "adapters_made_by": f"training {args.train_epochs} epochs" if args.train_epochs else f"init_{args.method}(vocab, seed=i) + save_adapter (untrained)",
        "softprompt": {k: v for k, v in sp["load"].items() if k != "answers"}
        | {"mean_batch_rows": sp["mean_batch_rows"], "mean_batch_adapters": sp["mean_batch_adapters"]},
        "peft": {k: v for k, v in pf.items() if k != "answers"}
        | {"extrapolated_seconds_for_all": args.requests / pf["throughput_rps"], "extrapolated": extrapolated},
        "throughput_ratio": sp["load"]["throughput_rps"] / pf["throughput_rps"],
        "peft_generate": pg,
        "throughput_ratio_vs_peft_generate": sp["load"]["throughput_rps"] / pg["throughput_rps"] if pg else None,
        "max_abs_probability_difference": diff,
        "compared_requests": len(both),
        "memory": {"one_adapter": m1, "all_adapters": mn,
                   "rss_delta_bytes": mn["rss_bytes"] - m1["rss_bytes"],
                   "prompt_delta_bytes": mn["prompt_bytes"] - m1["prompt_bytes"],
                   "kv_cache_delta_bytes": mn["kv_cache_bytes"] - m1["kv_cache_bytes"]},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    s, m = result["softprompt"], result["memory"]
    note = f" (measured on {peft_n}, extrapolated to {args.requests})" if extrapolated else ""
    print(
        f"adapters: {len(names)} x {args.num_virtual_tokens} virtual tokens ({args.method}), {result['adapters_made_by']}"
    )
    print(f"softprompt serve: {s['requests']} requests, {args.clients} clients: "
          f"{s['throughput_rps']:.1f} req/s, p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, "
          f"failed {s['failed']}, mean batch {s['mean_batch_rows']:.1f} rows / "
          f"{s['mean_batch_adapters']:.1f} adapters")  # fmt: skip
    print(f"PEFT, one adapter at a time (offline, no HTTP): {pf['throughput_rps']:.1f} req/s{note}; "
          f"{args.requests} requests would take {result['peft']['extrapolated_seconds_for_all']:.0f} s")  # fmt: skip
    print(f"throughput ratio softprompt/PEFT: {result['throughput_ratio']:.2f}x")
    if pg:
        print(f"PEFT generate (the guide's inference), one adapter at a time: {pg['throughput_rps']:.1f} "
              f"req/s on {pg['requests']} requests ({pg['valid_labels']} valid labels); ratio "
              f"softprompt/PEFT generate: {result['throughput_ratio_vs_peft_generate']:.2f}x")  # fmt: skip
    print(f"agreement: max |p_softprompt - p_PEFT| = {diff:.2e} over {len(both)} requests")
    print(f"memory, 1 adapter -> {len(names)}: RSS {m1['rss_bytes'] / 1e6:.1f} -> {mn['rss_bytes'] / 1e6:.1f} MB "
          f"(+{m['rss_delta_bytes'] / 1e6:.2f} MB); prompts {m1['prompt_bytes'] / 1e3:.0f} -> "
          f"{mn['prompt_bytes'] / 1e3:.0f} kB (+{m['prompt_delta_bytes'] / 1e3:.0f} kB); KV cache "
          f"{m1['kv_cache_bytes'] / 1e3:.0f} -> {mn['kv_cache_bytes'] / 1e3:.0f} kB "
          f"(+{m['kv_cache_delta_bytes'] / 1e3:.0f} kB, {mn['kv_cache_entries']} entries)")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Measure a deep prompt with suffix tokens before building it in: a prefix (keys and values in
every layer, P positions) and S soft tokens after the text, trained together, scored by label
scoring on a dev file. `softprompt train` refuses `--suffix-tokens` with `--method prefix`; this
says whether the pair would beat either alone. By hand (15-30 minutes per seed on one core,
about half of it scoring the 1,000 dev tweets, each label as its own padded row):

    python bench/prefix_suffix.py --data-dir ../shared/data/raft_twitter_complaints --seeds 42 1 2

It runs the library's own pieces on the padded path (`kernels.kv.run_after_prefix`, whose suffix
placeholders take the suffix vectors): `init_prefix` / `init_prompt` from the init text,
`encode_rows` / `collate_train`, AdamW with a linear schedule, class-balanced loss as
`--balance`. `--suffix-tokens 0` is the plain prefix (as `softprompt train --method prefix`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GUIDE = "Classify if the tweet is a complaint or not:"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="train.csv and dev.csv")
    p.add_argument("--text-column", default="Tweet text")
    p.add_argument("--label-column", default="Label")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--prefix-tokens", type=int, default=8, help="at least 1")
    p.add_argument("--suffix-tokens", type=int, default=32)
    p.add_argument("--prefix-lr", type=float, default=1e-2)
    p.add_argument("--suffix-lr", type=float, default=3e-2)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--init-text", default=GUIDE)
    p.add_argument("--dev-rows", type=int, default=0, help="first N dev rows (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON of the results")
    args = p.parse_args()

    import torch
    from sklearn.metrics import f1_score, roc_auc_score
    from transformers import get_linear_schedule_with_warmup

    from softprompt.data import (
        Task,
        collate_train,
        encode_rows,
        input_budget,
        input_token_ids,
        label_token_ids,
        load_table,
    )
    from softprompt.kernels.kv import prefix_to_kv, run_after_prefix
    from softprompt.kernels.loss import _padded_loss
    from softprompt.modeling.load import load_base
    from softprompt.prompt import init_prefix, init_prompt
    from softprompt.training.setup import row_weights

    torch.set_num_threads(args.threads)
    model, tok, _ = load_base(None)
    model.requires_grad_(False)
    d = Path(args.data_dir)
    train = load_table(str(d / "train.csv"), args.text_column, args.label_column)
    dev = load_table(str(d / "dev.csv"), args.text_column, args.label_column)
    names = sorted(set(train.labels))
    task = Task(
        text_column=args.text_column,
        label_names=names,
        label_column=args.label_column,
        suffix_tokens=args.suffix_tokens,
    )
    rows = encode_rows(tok, task, train.texts, train.labels)
    weights = row_weights(train.labels, True)
    n_dev = args.dev_rows or len(dev.texts)
    budget = input_budget(tok, task)
    dev_ids = [input_token_ids(tok, task, t, budget) for t in dev.texts[:n_dev]]
    gold = [names.index(y) for y in dev.labels[:n_dev]]
    label_ids = [label_token_ids(tok, n) for n in names]
    pad = tok.pad_token_id

    def run(prefix, suffix, ids, mask):
        return run_after_prefix(model, prefix_to_kv(model, prefix), ids, mask, prompts=suffix)[0]

    @torch.no_grad()
    def score(prefix, suffix) -> list[list[float]]:
        out = []
        for i in range(0, n_dev, 16):
            seqs, spans = [], []
            for ids in dev_ids[i : i + 16]:
                for c in label_ids:
                    seqs.append(ids + c)
                    spans.append((len(ids), c))
            T = max(len(s) for s in seqs)
            x = torch.full((len(seqs), T), pad, dtype=torch.long)
            m = torch.zeros((len(seqs), T), dtype=torch.long)
            for j, s in enumerate(seqs):
                x[j, : len(s)] = torch.tensor(s)
                m[j, : len(s)] = 1
            hidden = run(prefix, suffix, x, m)
            # the LM head only where a label token is predicted
            at = [(j, p, t) for j, (n, c) in enumerate(spans) for p, t in enumerate(c, n - 1)]
            rows_, pos_, tgt = (torch.tensor(v) for v in zip(*at, strict=True))
            logits = model.get_output_embeddings()(hidden[rows_, pos_]).float()
            tok_lp = torch.log_softmax(logits, -1)[torch.arange(len(at)), tgt]
            per_seq = torch.zeros(len(seqs)).index_add_(0, rows_, tok_lp)
            for j in range(0, len(seqs), len(names)):
                row = per_seq[j : j + len(names)].tolist()
                out.append(row)
        return out

    results = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        rng = random.Random(seed)
        prefix = init_prefix(model, tok, args.prefix_tokens, "text", text=args.init_text,
                             label_names=names, seed=seed).requires_grad_(True)  # fmt: skip
        groups = [{"params": [prefix], "lr": args.prefix_lr}]
        suffix = None
        if args.suffix_tokens:
            suffix = init_prompt(model, tok, args.suffix_tokens, "text", text=args.init_text,
                                 label_names=names, seed=seed).requires_grad_(True)  # fmt: skip
            groups.append({"params": [suffix], "lr": args.suffix_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.01)
        steps = args.epochs * -(-len(rows) // args.batch_size)
        sched = get_linear_schedule_with_warmup(opt, 0, steps)
        t0 = time.time()
        for epoch in range(args.epochs):
            order = list(range(len(rows)))
            rng.shuffle(order)
            total = 0.0
            for b in range(0, len(order), args.batch_size):
                idx = order[b : b + args.batch_size]
                batch = collate_train([rows[i] for i in idx], pad)
                w = torch.tensor([weights[i] for i in idx])
                hidden = run(prefix, suffix, batch["input_ids"], batch["attention_mask"])
                loss = _padded_loss(model, hidden, batch["labels"], w, "mean")
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            print(f"seed {seed} epoch {epoch + 1}: train loss {total / len(rows):.4f}", flush=True)
        train_s = time.time() - t0
        s = score(prefix, suffix)
        pred = [max(range(len(names)), key=r.__getitem__) for r in s]
        probs = torch.softmax(torch.tensor(s), -1)
        pos = names.index("complaint") if "complaint" in names else 0
        r = {
            "seed": seed,
            "macro_f1": f1_score(gold, pred, average="macro"),
            "accuracy": sum(a == b for a, b in zip(gold, pred, strict=True)) / len(gold),
            "auc": roc_auc_score([int(g == pos) for g in gold], probs[:, pos].tolist()),
            "train_seconds": train_s,
        }
        results.append(r)
        print(json.dumps(r), flush=True)
    f1 = [r["macro_f1"] for r in results]
    sd = statistics.stdev(f1) if len(f1) > 1 else 0.0
    print(
        f"P={args.prefix_tokens} prefix + S={args.suffix_tokens} suffix, {len(f1)} seeds, "
        f"{n_dev} dev rows: macro-F1 {' / '.join(f'{x:.3f}' for x in f1)}, "
        f"mean {statistics.mean(f1):.3f} ± {sd:.3f}; AUC mean "
        f"{statistics.mean(r['auc'] for r in results):.3f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

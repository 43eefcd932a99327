"""Does a change keep training bit for bit? Train four tiny recipes, save their prompts, compare.

    git stash / git checkout OLD;  python bench/same_prompt.py save /tmp/before
    git checkout NEW;              python bench/same_prompt.py save /tmp/after
    python bench/same_prompt.py compare /tmp/before /tmp/after

The recipes (tiny random Llama / GPT-2 from tests/conftest.py, the demo tweets, 2 epochs, one
thread): label words with suffix tokens and a balanced loss; the guide's settings with an eval
file, --grad-accum 2 and warm-up; a deep prompt (--method prefix); an MLP-reparameterised
prompt; a pooled classification head (with an eval file); a linear head after a deep prompt.
The prompt and any head are compared. The same machine must run both sides: floats round
differently on other CPUs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))

RECIPES = {
    "words_llama": ("llama", dict(head="none", suffix_tokens=32)),
    "guide_gpt2": (
        "gpt2",
        dict(
            head="none",
            suffix_tokens=0,
            balance=False,
            eval_data="complaints_test.csv",
            grad_accum=2,
            warmup_ratio=0.1,
        ),  # fmt: skip
    ),
    "prefix_llama": ("llama", dict(head="none", method="prefix", suffix_tokens=0, lr=1e-2)),
    "mlp_gpt2": ("gpt2", dict(head="none", reparam="mlp", num_virtual_tokens=4, suffix_tokens=4)),
    "pooled_llama": (
        "llama",
        dict(head="pooled", method="prompt", suffix_tokens=0, eval_data="complaints_test.csv"),
    ),  # fmt: skip
    "linear_prefix_gpt2": ("gpt2", dict(head="linear", method="prefix", suffix_tokens=0, lr=1e-2)),
}


def save(out: Path) -> None:
    from conftest import DEMO, make_model, make_tokenizer
    from softprompt import TrainConfig, train

    torch.set_num_threads(1)
    tok = make_tokenizer()
    for name, (arch, kw) in RECIPES.items():
        if "eval_data" in kw:
            kw = {**kw, "eval_data": str(DEMO / kw["eval_data"])}
        cfg = TrainConfig(
            data=str(DEMO / "complaints_train.csv"),
            text_column="Tweet text",
            label_column="Label",
            epochs=2,
            progress=False,
            out=str(out / name),
            **kw,
        )
        result = train(cfg, make_model(arch, len(tok)), tok)
        head = {} if result.head is None else result.head.tensors()
        torch.save({"prompt": result.prompt, **head}, out / f"{name}.pt")


def compare(a: Path, b: Path) -> int:
    same = True
    for name in RECIPES:
        x, y = torch.load(a / f"{name}.pt"), torch.load(b / f"{name}.pt")
        for part in sorted(set(x) | set(y)):
            if part not in x or part not in y:
                print(f"{name} {part}: only on one side")
                same = False
                continue
            equal = torch.equal(x[part], y[part])
            same &= equal
            d = (x[part] - y[part]).abs().max() if x[part].shape == y[part].shape else "shape"
            print(f"{name} {part}: {'bit-identical' if equal else f'DIFFERENT (max |d| {d})'}")
    return 0 if same else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("save").add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    if args.what == "save":
        args.out.mkdir(parents=True, exist_ok=True)
        save(args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())

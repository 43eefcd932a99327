"""Shared fixtures: tiny models and a tiny tokenizer built in the test session (no network);
the test tiers (markers) and the dtype that `--dtype auto` resolves to in this run.

Tiers: every test lands in exactly one of TIERS, each runnable alone (`pytest -m parity`). A
test's own marker (`@pytest.mark.server`, or a module's `pytestmark`) decides; otherwise its
file's entry in FILE_TIERS; otherwise DEFAULT_TIER, so a new test file runs with the unit tier
until it says otherwise. `.ci/run` runs every tier and prints each one's time.

dtype: `--auto-dtype bfloat16` (or float32) sets SOFTPROMPT_AUTO_DTYPE for this run and its
subprocesses, so every `--dtype auto` (CLI, API, server) resolves to that type, whatever the
CPU has; without it, the machine decides (bfloat16 where the CPU has AVX512-BF16 or AMX).
Tests that compare two doors load both sides in that type (`auto_dtype`) and use the bound of
tests/bounds.py for it; parity tests against PEFT and the reference pin float32.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TIERS = ("unit", "parity", "server", "browser", "slow")
"""unit: fast tests of one piece (data, CLI, training loop, metrics, ...); parity: our fast
paths against PEFT and the reference forward, and every door against every other (tiny models,
float32 parity pinned); server: `softprompt serve` over HTTP (TestClient, uvicorn subprocesses);
browser: the playground page in headless Chromium; slow: the real built-in model."""

FILE_TIERS = {
    "test_adapters.py": "parity",
    "test_doors.py": "parity",
    "test_dtype.py": "parity",
    "test_families.py": "parity",
    "test_head.py": "parity",
    "test_model.py": "parity",
    "test_prefix.py": "parity",
    "test_suffix.py": "parity",
    "test_serve.py": "server",
    "test_real_model.py": "slow",
}
"""The tier of a file's tests that carry no tier marker of their own."""

DEFAULT_TIER = "unit"


def pytest_addoption(parser):
    parser.addoption(
        "--auto-dtype",
        choices=("float32", "bfloat16"),
        help="what --dtype auto resolves to in this run (sets SOFTPROMPT_AUTO_DTYPE, which "
        "subprocesses inherit); default: the machine's pick",
    )


def pytest_configure(config):
    forced = config.getoption("--auto-dtype")
    if forced:
        os.environ["SOFTPROMPT_AUTO_DTYPE"] = forced


def pytest_report_header(config):
    from softprompt.modeling.load import dtype_line

    return f"softprompt --dtype auto: {dtype_line('auto')}"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        own = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(own) > 1:
            raise pytest.UsageError(f"{item.nodeid} is in {len(own)} tiers {sorted(own)}: mark one")
        if not own:
            item.add_marker(FILE_TIERS.get(item.path.name, DEFAULT_TIER))


DEMO = Path(__file__).resolve().parents[1] / "src" / "softprompt" / "demo"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "raft_twitter_complaints"


def make_tokenizer():
    """A byte-level BPE tokenizer (vocab 400) trained on the demo tweets; eos = pad = <|end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(DEMO / "complaints_train.csv", newline="") as f:
        for row in csv.DictReader(f):
            texts.append(f"Tweet text : {row['Tweet text']} Label : {row['Label']}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>")


def make_model(arch: str, vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.requires_grad_(False)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny(request, tokenizer):
    """(model, tokenizer) for each architecture: Llama-like (rotary) and GPT-2-like (learned positions)."""
    return make_model(request.param, len(tokenizer)), tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved as a local model folder, for the CLI (`--model <folder>`)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def demo_train() -> Path:
    return DEMO / "complaints_train.csv"


@pytest.fixture(scope="session")
def demo_test() -> Path:
    return DEMO / "complaints_test.csv"


@pytest.fixture(scope="session")
def auto_dtype() -> torch.dtype:
    """What `--dtype auto` resolves to in this run (the CLI, `SoftPrompt.load`, `serve`): a
    test that compares a door with an in-process model loads that model in this type."""
    from softprompt.modeling.load import DTYPES, resolve_dtype

    return DTYPES[resolve_dtype("auto")]


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model is far faster on one thread (and does not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

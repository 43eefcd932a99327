"""Training that scales out and survives: data parallel, precision, checkpointing, resume after
a kill, non-finite losses, failed writes (tiny Llama, CPU)."""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bounds import train_bounds
from softprompt.adapters import load_adapter
from softprompt.cli import main
from softprompt.errors import SoftpromptError
from softprompt.modeling.load import dtype_name, pick_device
from softprompt.modeling.sharding import set_gradient_checkpointing
from softprompt.readouts.words import label_loss
from test_cli import cli_error, prompt_of, train_args

SRC = Path(__file__).resolve().parents[1] / "src"


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The trained numbers a run saved: its prompt and, with `--head`, the head's (a pooled
    head's feature scaling and layers, fitted once before training, are compared too)."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return {
        k: v for k, v in tensors.items() if k == "prompt_embeddings" or "head" in k or "score" in k
    }


def assert_same_tensors(a: Path, b: Path, bound) -> None:
    """Two runs' saved prompts (entry by entry where `bound.prompt` is set) and heads agree."""
    ta, tb = trained_tensors(a), trained_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        limit = bound.prompt if key == "prompt_embeddings" else bound.head
        if limit is not None:
            gap = (ta[key].float() - tb[key].float()).abs().max()
            assert gap <= limit, (key, gap, bound)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def without(argv: list[str], *flags: str) -> list[str]:
    out = list(argv)
    for flag in flags:
        i = out.index(flag)
        del out[i : i + 2]
    return out


# --------------------------------------------------------------------------- data parallel


@pytest.mark.parametrize(
    "fsdp,head", [(False, "none"), (True, "none"), (False, "pooled"), (True, "linear")],
    ids=["ddp", "fsdp", "ddp-pooled", "fsdp-linear"],
)  # fmt: skip
def test_two_processes_train_the_same_prompt_as_one(
    tmp_path, tiny_model_dir, demo_train, fsdp, head, auto_dtype
):
    """torchrun, 2 CPU processes (gloo): same global batch and seed, same prompt, in the type
    --dtype auto resolves to: in float32 within 1e-5 and the same metrics; in bfloat16 within
    `bounds.TRAIN_BFLOAT16` (each process runs half of each batch, which rounds differently),
    with a head within `bounds.TRAIN_BFLOAT16_HEAD`.
    The last training batch has 1 row, so process 1's share of it is empty (ddp: 120 rows in
    batches of 7; fsdp: 125 in batches of 4). With --fsdp the base model's weights are sharded
    over the 2 processes (FSDP2, no prompt KV cache) and every process must run every batch:
    35 eval rows one per batch give process 0 18 batches and process 1 17 plus an empty one.
    With a classification head (`--head`) its weights are summed over the processes as the
    prompt's are, and a pooled head's probe (fitted by every process on all training rows)
    starts the same everywhere: the head must agree as the prompt does."""
    bound = train_bounds(auto_dtype, head=head != "none")
    if fsdp:
        extra = ["--batch-size", "4", "--eval-fraction", "0.22", "--eval-batch-size", "1"]
        rows = 125
    else:
        extra = ["--batch-size", "7", "--eval-fraction", "0.25"]
        rows = 120
    one = tmp_path / "one"
    argv = without(train_args(demo_train, tiny_model_dir, one), "--batch-size")
    argv += [*extra, "--grad-accum", "2", "--head", head]
    assert main(argv) == 0
    two = tmp_path / "two"
    argv2 = [a if a != str(one) else str(two) for a in argv] + (["--fsdp"] if fsdp else [])
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        + ["--standalone", "-m", "softprompt.cli", *argv2],  # --standalone: a free port
        capture_output=True,
        text=True,
        timeout=400,
        env=subprocess_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data parallel: 2 processes" in r.stdout
    held = re.search(
        r"FSDP: base model sharded over 2 processes; each holds about ([\d,]+) of its ([\d,]+) weights",
        r.stdout,
    )
    assert bool(held) == fsdp
    if fsdp:
        part, whole = (int(x.replace(",", "")) for x in held.groups())
        assert whole > 0 and part <= whole / 2 + 64  # half, give or take uneven rows
    assert r.stdout.count("best prompt (epoch") == 1  # only the main process prints
    assert f"train rows: {rows}" in r.stdout
    for run in (one, two):
        assert json.loads((run / "train_config.json").read_text())["dtype"] == dtype_name(
            auto_dtype
        )
    _same_training(one, two, bound, eval_rows=160 - rows)


def _same_training(one: Path, two: Path, bound, eval_rows: int) -> None:
    """Two runs' saved prompts (best and last) and per-epoch records agree within `bound`
    (`bounds.TrainBounds`); `eval_rows`: the size of their evaluation set."""
    for sub in ("", "last"):
        assert_same_tensors(one / sub, two / sub, bound)
    for ra, rb in zip(records(one), records(two), strict=True):
        assert ra["step"] == rb["step"]
        for key in ("train_loss", "eval_loss"):
            assert ra[key] == pytest.approx(rb[key], abs=bound.loss), (key, ra, rb, bound)
        changed = round(abs(ra["eval_accuracy"] - rb["eval_accuracy"]) * eval_rows)
        assert changed <= bound.eval_rows, (ra, rb, bound)
        if bound.eval_rows == 0 or changed == 0:
            assert ra["eval_macro_f1"] == pytest.approx(rb["eval_macro_f1"], abs=1e-12), (ra, rb)


# --------------------------------------------------------------------------- resume


KILL_AT_STEP = """
import os, signal, sys
import softprompt.training as training

class Kill(training.Callback):
    def on_step(self, run, state):
        if state.step == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)

real = training.train
training.train = lambda cfg, *a, **kw: real(cfg, *a, callbacks=[Kill()], **kw)
from softprompt.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_mid_epoch_then_resume_is_bit_identical(tmp_path, tiny_model_dir, demo_train):
    """SIGKILL a real training process one optimiser step after a mid-epoch checkpoint (a
    callback kills it); --resume finishes it; the prompt equals that of an uninterrupted run
    bit for bit."""
    # 16 batches per epoch, 2 per step: 8 steps per epoch; checkpoints at steps 3, 6, 8, 9, 12...
    extra = ["--epochs", "3", "--save-steps", "3", "--grad-accum", "2"]
    killed = tmp_path / "killed"
    argv = without(train_args(demo_train, tiny_model_dir, killed), "--epochs") + extra
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP, "13", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert len(records(killed)) == 1
    state = torch.load(killed / "checkpoint" / "state.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["done"]) == (2, 12, 8)  # mid-epoch 2

    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert main(without(train_args(demo_train, tiny_model_dir, straight), "--epochs") + extra) == 0
    for sub in ("", "last"):
        assert torch.equal(prompt_of(killed / sub), prompt_of(straight / sub))
    drop = {"epoch_seconds"}
    got = [{k: v for k, v in r.items() if k not in drop} for r in records(killed)]
    want = [{k: v for k, v in r.items() if k not in drop} for r in records(straight)]
    assert got == want
    assert not [p for p in killed.rglob(".*") if p.is_file()]  # no temp files left

    # resuming a finished run changes nothing
    before = prompt_of(killed)
    assert main(["train", "--resume", str(killed), "--no-progress"]) == 0
    assert torch.equal(prompt_of(killed), before)
    assert len(records(killed)) == 3


def test_resume_refuses_contradicting_flags(tmp_path, tiny_model_dir, demo_train, capsys):
    out = tmp_path / "run"
    assert main(train_args(demo_train, tiny_model_dir, out, "--epochs", "1")) == 0
    line = cli_error(capsys, ["train", "--resume", str(out), "--lr", "0.5", "--seed", "3"])
    assert "--lr 0.5 (the run has 0.03)" in line and "--seed 3 (the run has 42)" in line
    cli_error(capsys, ["train", "--resume", str(out), "--overwrite"], "--overwrite", "--resume")
    cli_error(capsys, ["train", "--resume", str(out), "--out", str(tmp_path / "x")], "--out")
    # flags equal to the saved ones, and harmless ones, are fine
    argv = ["train", "--resume", str(out), "--lr", "0.03", "--eval-batch-size", "4"]
    assert main([*argv, "--no-progress"]) == 0


def test_resume_without_checkpoint_says_what_to_do(tmp_path, tiny_model_dir, demo_train, capsys):
    out = tmp_path / "run"
    assert main(train_args(demo_train, tiny_model_dir, out, "--epochs", "1")) == 0
    (out / "checkpoint" / "state.pt").unlink()
    cli_error(capsys, ["train", "--resume", str(out)], "no checkpoint", "--overwrite")
    (out / "checkpoint" / "state.pt").write_bytes(b"garbage")
    cli_error(capsys, ["train", "--resume", str(out)], "corrupt", "--overwrite")
    cli_error(capsys, ["train", "--resume", str(tmp_path)], "not a softprompt run")
    cli_error(capsys, ["train", "--resume", str(tmp_path / "nope")], "not found")
    cli_error(capsys, ["train", "--epochs", "1"], "--data is required")


# --------------------------------------------------------------------------- failures


def test_nan_loss_stops_and_keeps_the_last_good_prompt(
    tmp_path, tiny_model_dir, demo_train, capsys
):
    out = tmp_path / "run"
    argv = train_args(demo_train, tiny_model_dir, out, "--lr", "1e30", "--epochs", "1")
    line = cli_error(capsys, argv, "training stopped", "step", "--lr")
    assert "last good prompt is saved in" in line
    for folder in (out, out / "last"):  # no best yet: the run folder holds it too
        adapter = load_adapter(folder)
        assert torch.isfinite(adapter.prompt).all()


def test_nan_loss_later_keeps_best_and_last_good(
    tmp_path, tiny_model_dir, demo_train, capsys, monkeypatch
):
    train_mod = importlib.import_module("softprompt.training.step")
    calls = {"n": 0}
    real = train_mod.rows_loss

    def flaky(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 20:  # epoch 2 (16 batches per epoch), batch 4
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod, "rows_loss", flaky)
    out = tmp_path / "run"
    line = cli_error(capsys, train_args(demo_train, tiny_model_dir, out), "loss became nan")
    assert "epoch 2, batch 4 (step 20)" in line
    assert "the best one (epoch 1)" in line
    last = load_adapter(out / "last").prompt
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["epoch"] == 1
    assert not torch.equal(last, state["prompt"])  # 3 more steps were taken and kept
    assert torch.equal(load_adapter(out).prompt, state["prompt"])


def test_failed_write_keeps_the_previous_adapter(tmp_path, tiny_model_dir, demo_train, monkeypatch):
    """A crash while saving (here: the rename fails) leaves the old, valid adapter."""
    import softprompt.adapters as adapters
    import softprompt.files as files

    out = tmp_path / "run"
    assert main(train_args(demo_train, tiny_model_dir, out, "--epochs", "1")) == 0
    before = load_adapter(out)
    renames = {"n": 0}
    real_replace = os.replace

    def failing_replace(src, dst):
        renames["n"] += 1
        if renames["n"] == 1:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError):
        adapters.save_adapter(out, torch.zeros_like(before.prompt), before.config, before.task)
    after = load_adapter(out)
    assert torch.equal(after.prompt, before.prompt)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    def failing_write(*args, **kwargs):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(files.os, "fsync", failing_write)
    with pytest.raises(OSError):
        adapters.save_adapter(out, torch.zeros_like(before.prompt), before.config, before.task)
    assert torch.equal(load_adapter(out).prompt, before.prompt)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_damaged_adapter_files_are_one_line_errors(tmp_path, tiny_model_dir, demo_train, demo_test, command, capsys):  # fmt: skip
    out = tmp_path / "run"
    assert main(train_args(demo_train, tiny_model_dir, out, "--epochs", "1")) == 0
    tail = ["--data", str(demo_test)] if command == "eval" else ["hello"]
    weights = out / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])
    cli_error(capsys, [command, str(out), *tail], str(weights), "corrupt or truncated")
    weights.write_bytes(b"")
    cli_error(capsys, [command, str(out), *tail], str(weights), "corrupt or truncated")
    weights.write_bytes(good)
    config = out / "adapter_config.json"
    for garbage in (b"\x00\xff garbage {{", b"[1, 2, 3]", b'"a string"', b""):
        config.write_bytes(garbage)
        cli_error(capsys, [command, str(out), *tail], str(config), "corrupt")


# --------------------------------------------------------------------------- precision, memory


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_base_keeps_prompt_and_optimizer_in_float32(
    tmp_path, tiny_model_dir, demo_train, dtype
):
    out = tmp_path / dtype
    assert main(train_args(demo_train, tiny_model_dir, out, "--dtype", dtype, "--epochs", "1")) == 0
    prompt = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    assert prompt.dtype == torch.float32 and torch.isfinite(prompt).all()
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["prompt"].dtype == torch.float32
    assert all(
        t.dtype == torch.float32
        for s in state["optimizer"]["state"].values()
        for t in s.values()
        if t.dim() > 0
    )
    config = json.loads((out / "train_config.json").read_text())
    assert config["dtype"] == config["dtype_requested"] == dtype


def test_gradient_checkpointing_gives_the_same_loss_and_gradient(tiny, monkeypatch):
    """Checkpointed layers (recomputed in backward, dropout off) give exactly the loss and
    prompt gradient of the same forward without checkpointing, and those equal the fast path's."""
    from test_model import _batch

    model, tokenizer = tiny
    _, batch = _batch(tokenizer)
    prompt = torch.nn.Parameter(torch.randn(5, model.config.hidden_size) * 0.1)
    layer = model.get_decoder().layers[0] if hasattr(model.get_decoder(), "layers") else None
    layer = layer or model.get_decoder().h[0]
    mlp = layer.mlp
    calls = {"n": 0}
    real_forward = mlp.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", counting)
    results = {}
    try:
        for name, ckpt, shared in [("fast", False, True), ("plain", False, False), ("ckpt", True, False)]:  # fmt: skip
            set_gradient_checkpointing(model, ckpt)
            prompt.grad = None
            calls["n"] = 0
            loss = label_loss(model, prompt, **batch, shared_prefix=shared)
            loss.backward()
            results[name] = (loss.detach(), prompt.grad.clone(), calls["n"])
    finally:
        set_gradient_checkpointing(model, False)
    assert not model.training and not any(m.training for m in model.modules())
    assert results["ckpt"][2] == 2 and results["plain"][2] == 1  # recomputed in backward
    assert torch.equal(results["ckpt"][0], results["plain"][0])
    assert torch.equal(results["ckpt"][1], results["plain"][1])
    assert torch.allclose(results["fast"][0], results["plain"][0], atol=1e-5)
    assert torch.allclose(results["fast"][1], results["plain"][1], atol=1e-6)


@pytest.mark.parametrize("head", ["none", "pooled"])
def test_gradient_checkpointing_flag_trains(tmp_path, tiny_model_dir, demo_train, auto_dtype, head):
    """One epoch with and without --gradient-checkpointing, in the type --dtype auto resolves
    to: float32 within 1e-4 (as always); bfloat16 within `bounds.TRAIN_BFLOAT16` (checkpointed
    layers run the concatenated forward, not the shared-prefix one, and round differently);
    with the pooled head, its numbers too (bfloat16: `bounds.TRAIN_BFLOAT16_HEAD`)."""
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    # checkpointing trains an input prompt; the plain run names it (with the pooled head the
    # default would be a deep prompt)
    flags = ("--epochs", "1", "--head", head, "--method", "prompt")
    assert main(train_args(demo_train, tiny_model_dir, plain, *flags)) == 0
    argv = train_args(demo_train, tiny_model_dir, ckpt, *flags, "--gradient-checkpointing")
    assert main(argv) == 0
    bound = train_bounds(auto_dtype, float32_prompt=1e-4, head=head != "none")
    assert len(trained_tensors(plain)) == (1 if head == "none" else 6)
    assert_same_tensors(plain, ckpt, bound)
    for ra, rb in zip(records(plain), records(ckpt), strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=max(bound.loss, 1e-4))
    config = json.loads((ckpt / "train_config.json").read_text())
    assert config["gradient_checkpointing"] is True and config["dtype"] == dtype_name(auto_dtype)


def test_device_is_chosen_automatically(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")


# --------------------------------------------------------------------------- reparameterisation


def test_prompt_encoder_starts_at_the_init_and_trains_its_mlp():
    from softprompt.prompt import PromptEncoder

    init = torch.randn(4, 16)
    enc = PromptEncoder(init, "mlp", hidden=8)
    assert torch.equal(enc.export(), init)  # zero last layer: the init, exactly
    (enc() ** 2).sum().backward()
    assert enc.mlp[2].weight.grad.abs().sum() > 0 and enc.embedding.grad is not None
    plain = PromptEncoder(init)
    assert plain.mlp is None and torch.equal(plain(), init)
    assert [n for n, _ in plain.named_parameters()] == ["embedding"]


def test_reparam_mlp_saves_the_encoded_prompt(tmp_path, tiny_model_dir, demo_train):
    """The adapter holds exactly what the trained encoder outputs, and it is a plain prompt."""
    from softprompt.prompt import PromptEncoder

    out = tmp_path / "mlp"
    argv = train_args(demo_train, tiny_model_dir, out, "--reparam", "mlp", "--eval-fraction", "0")
    assert main(argv) == 0
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    enc = PromptEncoder(state["encoder"]["embedding"], "mlp")
    enc.load_state_dict(state["encoder"])
    assert enc.mlp[2].weight.abs().sum() > 0  # the encoder did train
    exported = enc.export()
    assert torch.equal(prompt_of(out / "last"), exported)
    assert torch.equal(prompt_of(out), exported)  # no eval set: best = last
    assert not torch.equal(exported, enc.embedding)  # the MLP changes what is saved
    a = load_adapter(out)
    assert a.config["peft_type"] == "PROMPT_TUNING" and tuple(a.prompt.shape) == tuple(
        exported.shape
    )


def test_balance_flag_trains_and_changes_the_prompt(tmp_path, tiny_model_dir, demo_train):
    plain, bal = tmp_path / "plain", tmp_path / "bal"
    assert main(train_args(demo_train, tiny_model_dir, plain, "--epochs", "1")) == 0
    assert main(train_args(demo_train, tiny_model_dir, bal, "--epochs", "1", "--balance")) == 0
    assert not torch.equal(prompt_of(plain / "last"), prompt_of(bal / "last"))
    assert json.loads((bal / "train_config.json").read_text())["balance"] is True


# --------------------------------------------------------------------------- Python API


def test_rows_in_memory_train_the_same_prompt_and_callbacks_see_each_step(
    tmp_path, tokenizer, demo_train
):
    """train(data=rows) equals train from the file bit for bit; callbacks run after every
    optimiser step and every epoch (with the prompt just saved), then once at the end."""
    from conftest import make_model
    from softprompt import TrainConfig, train
    from softprompt.training import Callback

    model = make_model("llama", len(tokenizer))
    cfg = TrainConfig(
        data=str(demo_train),
        text_column="Tweet text",
        label_column="Label",
        num_virtual_tokens=4,
        suffix_tokens=2,
        epochs=2,
        progress=False,
        out=str(tmp_path / "file"),
    )
    from_file = train(cfg, model, tokenizer)
    with open(demo_train, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    seen = []

    class Spy(Callback):
        def on_step(self, run, state):
            seen.append(("step", state.step))

        def on_epoch(self, run, state, record):
            saved = load_adapter(run.out / "last").prompt
            seen.append(("epoch", record["epoch"], torch.equal(state.prompt, saved)))

        def on_train_end(self, run, state):
            seen.append(("end", len(state.history)))

    out = tmp_path / "rows"
    in_memory = train(
        TrainConfig(**{**cfg.__dict__, "data": None, "out": str(out)}),
        model,
        tokenizer,
        data=rows,
        callbacks=[Spy()],
    )
    assert torch.equal(from_file.prompt, in_memory.prompt)
    assert json.loads((out / "train_config.json").read_text())["data"] == "<in memory>"
    steps = len(rows) // 8  # 160 rows, batch 8
    want = [("step", s) for s in range(1, steps + 1)] + [("epoch", 1, True)]
    want += [("step", s) for s in range(steps + 1, 2 * steps + 1)] + [
        ("epoch", 2, True),
        ("end", 2),
    ]
    assert seen == want

    with pytest.raises(SoftpromptError, match="row 1 has no 'Label' key"):
        train(cfg, model, tokenizer, data=[rows[0], {"Tweet text": "x"}])

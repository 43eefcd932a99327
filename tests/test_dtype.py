"""bfloat16 against float32: the fast paths on a bfloat16 model give the float32 numbers within
stated tolerances, and `--dtype auto` picks bfloat16 only where the hardware has it.

On a CPU without bfloat16 hardware torch emulates it (slower, same rounding), so these run on
every machine. The tiny models' logits are sharpened (final norm weight x8, logit std ~0.9
instead of ~0.1) so that bfloat16's rounding shows in the numbers being compared.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F

from fast import generate
from softprompt.cli import main
from softprompt.data import collate_left, collate_train, encode_rows
from softprompt.engine import Engine
from softprompt.errors import SoftpromptError
from softprompt.forward.kv import prompt_kv
from softprompt.forward.reference import concat_forward, reference_loss
from softprompt.modeling.load import AUTO_DTYPE_ENV, dtype_line, resolve_dtype
from softprompt.predictors import ClassifyRow, predictor_for_prompt
from softprompt.prompt import init_prompt
from softprompt.readouts.words import label_loss
from test_cli import train_args

pytestmark = pytest.mark.usefixtures("one_thread")

from test_model import LABELS, TEXTS, tweet_task  # noqa: E402 - the same four tweets

# Tolerances (bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding), each 2.5-4x the largest
# error seen on the tiny models: loss 2.7e-4 relative, gradient 0.84% of its largest entry
# (cosine 0.99998), label probabilities 2.2e-3, logits 0.013 (std ~0.9). On these random tiny
# models a prompt moves the loss and the probabilities little; the gradient is the sharp
# check (scaling the prompt by 1.1 moves it by 5-13%).
LOSS_REL = 1e-3
GRAD_REL = 0.025
GRAD_COS = 0.9995
PROB_ABS = 0.006
LOGIT_ABS = 0.04


def _final_norm(model):
    return model.model.norm if hasattr(model, "model") else model.transformer.ln_f


@pytest.fixture
def pair(tiny):
    """(float32 model, the same model in bfloat16, tokenizer), logits sharpened (x8)."""
    model, tok = tiny
    f32 = copy.deepcopy(model)
    with torch.no_grad():
        _final_norm(f32).weight.mul_(8)
    bf16 = copy.deepcopy(f32).to(torch.bfloat16)
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    return f32, bf16, tok


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("suffix", [0, 3])
def test_bf16_fast_loss_and_gradient_match_float32_reference(pair, suffix):
    f32, bf16, tok = pair
    b = collate_train(encode_rows(tok, tweet_task(suffix), TEXTS, LABELS), tok.pad_token_id)
    prompt = init_prompt(f32, tok, 5 + suffix, "random", seed=3).requires_grad_(True)
    ref = reference_loss(f32, prompt, **b)
    (g_ref,) = torch.autograd.grad(ref, prompt)
    fast = label_loss(bf16, prompt, **b)
    (g_fast,) = torch.autograd.grad(fast, prompt)
    fast32 = label_loss(f32, prompt.detach(), **b)
    # float32 out (the loss is taken in float32), from a model that really ran in bfloat16
    assert fast.dtype == g_fast.dtype == torch.float32
    assert fast.item() != fast32.item()
    assert abs(fast.item() - ref.item()) <= LOSS_REL * ref.item()
    assert _rel(g_fast, g_ref) <= GRAD_REL
    assert F.cosine_similarity(g_fast.flatten(), g_ref.flatten(), dim=0) >= GRAD_COS
    # the unshared path (gradient checkpointing, FSDP) too
    plain = label_loss(bf16, prompt, **b, shared_prefix=False)
    (g_plain,) = torch.autograd.grad(plain, prompt)
    assert abs(plain.item() - ref.item()) <= LOSS_REL * ref.item()
    assert _rel(g_plain, g_ref) <= GRAD_REL


@torch.no_grad()
def test_bf16_label_scoring_matches_float32(pair):
    f32, bf16, tok = pair
    task = tweet_task()
    prompt = init_prompt(f32, tok, 5, "random", seed=3)
    probs, names = {}, {}
    for key, model in (("f32", f32), ("bf16", bf16)):
        engine = Engine(model, tok)
        pred = predictor_for_prompt(model, tok, prompt, task)
        rows = [ClassifyRow(pred, engine.encode(pred, t)[0]) for t in TEXTS]
        probs[key] = torch.stack(engine.label_probabilities(rows))
        assert torch.allclose(engine.classify(pred, TEXTS), probs[key])
        names[key] = probs[key].argmax(-1)
    assert probs["bf16"].dtype == torch.float32
    assert (probs["bf16"] - probs["f32"]).abs().max() <= PROB_ABS
    assert not torch.equal(probs["bf16"], probs["f32"])  # it did run in bfloat16
    # the predicted labels agree wherever float32's margin is wider than the tolerance allows
    clear = (probs["f32"][:, 0] - probs["f32"][:, 1]).abs() > 2 * PROB_ABS
    assert clear.any()
    assert torch.equal(names["bf16"][clear], names["f32"][clear])


@torch.no_grad()
def test_bf16_logits_and_greedy_generation_match_float32(pair):
    f32, bf16, tok = pair
    prompt = init_prompt(f32, tok, 5, "random", seed=3)
    seqs = [tok(f"Tweet text : {t} Label : ")["input_ids"] for t in TEXTS]
    ids, mask = collate_left(seqs, tok.pad_token_id)
    new = {
        key: generate(m, prompt_kv(m, prompt), ids, mask, max_new_tokens=6, eos_token_id=None)
        for key, m in (("f32", f32), ("bf16", bf16))
    }
    compared = 0
    for s, t32, t16 in zip(seqs, new["f32"], new["bf16"], strict=True):
        # logits along float32's greedy path, each model run on the same tokens
        seq = torch.tensor([s + t32])
        ones = torch.ones_like(seq)
        l32 = concat_forward(f32, prompt, seq, ones)[0, 5 + len(s) - 1 : -1]  # [6, V]
        l16 = concat_forward(bf16, prompt, seq, ones)[0, 5 + len(s) - 1 : -1].float()
        assert (l16 - l32).abs().max() <= LOGIT_ABS
        # where float32's top-2 margin exceeds twice the bound, both pick the same token; the
        # tokens agree up to the first step where it does not (later ones may differ after that)
        top = l32.topk(2, -1).values
        for step in range(len(t32)):
            if top[step, 0] - top[step, 1] <= 2 * LOGIT_ABS:
                break
            assert t16[step] == t32[step], (step, t16, t32)
            compared += 1
    assert compared >= 4  # the check is not empty


# --------------------------------------------------------------------------- --dtype auto


@pytest.fixture
def hardware_decides(monkeypatch):
    """For tests of the hardware probe: SOFTPROMPT_AUTO_DTYPE (which `pytest --auto-dtype`
    sets) is unset."""
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)


@pytest.fixture
def no_torch_probes(monkeypatch, hardware_decides):
    """Hide torch's own CPU probes (present in some releases) so /proc/cpuinfo decides."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch._C._cpu, name, lambda: False, raising=False)


@pytest.mark.parametrize(
    ("flags", "want", "why"),
    [
        ({"avx2", "fma", "amx_bf16", "amx_tile"}, "bfloat16", "the CPU has AMX bf16"),
        ({"avx512f", "avx512_bf16"}, "bfloat16", "the CPU has AVX512-BF16"),
        ({"fp", "asimd", "bf16"}, "bfloat16", "the CPU has Arm BF16"),
        ({"avx2", "fma", "avx512f"}, "float32", "no bfloat16 hardware found on cpu"),
        (set(), "float32", "no bfloat16 hardware found on cpu"),
    ],
)
def test_auto_dtype_on_cpu_follows_the_cpu_flags(monkeypatch, no_torch_probes, flags, want, why):
    import softprompt.modeling.load as sm

    monkeypatch.setattr(sm, "_cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == want
    assert dtype_line("auto", cpu) == f"dtype: {want} (auto: {why})"
    for explicit in ("float32", "bfloat16", "float16"):  # an explicit type is kept
        assert resolve_dtype(explicit, cpu) == explicit
        assert dtype_line(explicit, cpu) == f"dtype: {explicit} (--dtype {explicit})"


def test_auto_dtype_asks_torch_first_on_cpu(monkeypatch, hardware_decides):
    import softprompt.modeling.load as sm

    monkeypatch.setattr(sm, "_cpu_flags", lambda: set())
    monkeypatch.setattr(torch._C._cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_dtype("auto", torch.device("cpu")) == "bfloat16"
    assert "AMX" in dtype_line("auto", torch.device("cpu"))


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_dtype_on_cuda_and_mps(monkeypatch, hardware_decides, bf16):
    asked = {}

    def supported(including_emulation=True):
        asked["emulation"] = including_emulation
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Test GPU")
    want = "bfloat16" if bf16 else "float32"
    assert resolve_dtype("auto", torch.device("cuda")) == want
    assert asked["emulation"] is False  # an emulated bfloat16 (pre-Ampere) does not count
    line = dtype_line("auto", torch.device("cuda"))
    assert line == (
        "dtype: bfloat16 (auto: the GPU (Test GPU) has bfloat16)"
        if bf16
        else "dtype: float32 (auto: no bfloat16 hardware found on cuda)"
    )
    assert resolve_dtype("auto", torch.device("mps")) == "float32"


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx512f", "avx512_bf16"}])
@pytest.mark.parametrize("forced", ["float32", "bfloat16"])
def test_the_environment_forces_what_auto_resolves_to(monkeypatch, no_torch_probes, flags, forced):
    """SOFTPROMPT_AUTO_DTYPE decides `auto` whatever the CPU has (the suite's bfloat16 pass on
    AVX2 machines, its float32 pass on bfloat16 ones); an explicit --dtype still wins."""
    import softprompt.modeling.load as sm

    monkeypatch.setattr(sm, "_cpu_flags", lambda: flags)
    monkeypatch.setenv(AUTO_DTYPE_ENV, forced)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == forced
    assert dtype_line("auto", cpu) == f"dtype: {forced} (auto: {AUTO_DTYPE_ENV}={forced})"
    assert resolve_dtype("float16", cpu) == "float16"
    assert dtype_line("float32", cpu) == "dtype: float32 (--dtype float32)"
    monkeypatch.setenv(AUTO_DTYPE_ENV, "")  # empty: the hardware decides
    want = "bfloat16" if "avx512_bf16" in flags else "float32"
    assert resolve_dtype("auto", cpu) == want
    monkeypatch.setenv(AUTO_DTYPE_ENV, "fp8")
    with pytest.raises(SoftpromptError, match=rf"{AUTO_DTYPE_ENV}='fp8' is not one of float32"):
        resolve_dtype("auto", cpu)
    assert resolve_dtype("float32", cpu) == "float32"  # not read when auto is not asked for


def test_the_suite_runs_in_the_auto_dtype_it_reports(auto_dtype):
    """`pytest --auto-dtype X` (or SOFTPROMPT_AUTO_DTYPE) is what every door resolves auto to."""
    import os

    from softprompt.modeling.load import DTYPES

    forced = os.environ.get(AUTO_DTYPE_ENV)
    if forced:
        assert auto_dtype == DTYPES[forced]
    assert DTYPES[resolve_dtype("auto")] == auto_dtype


def test_unknown_dtype_names_the_flag():
    with pytest.raises(SoftpromptError, match=r"--dtype 'fp8' is not one of auto, float32"):
        resolve_dtype("fp8", torch.device("cpu"))
    from softprompt.config import TrainConfig

    problems = TrainConfig(data="x.csv", dtype="fp8").problems()
    assert any(p.startswith("--dtype must be one of auto, float32") for p in problems)


def test_cli_train_records_the_resolved_dtype_and_prints_it(
    monkeypatch, no_torch_probes, tmp_path, tiny_model_dir, demo_train, capsys
):
    """--dtype auto (the default) on a CPU said to have AMX: the run trains in bfloat16 (torch
    emulates it here), records it, and says so once; eval/predict say it on stderr (not with
    --no-progress)."""
    import softprompt.modeling.load as sm

    monkeypatch.setattr(sm, "_cpu_flags", lambda: {"avx2", "amx_bf16"})
    out = tmp_path / "auto"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(train_args(demo_train, tiny_model_dir, out, "--epochs", "1")) == 0
    said = buf.getvalue().splitlines()
    assert said.count("dtype: bfloat16 (auto: the CPU has AMX bf16)") == 1
    config = json.loads((out / "train_config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["dtype_requested"] == "auto"
    keys = list(config)
    assert keys.index("dtype_requested") == keys.index("dtype") + 1
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert state["prompt"].dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in state["encoder"].values())
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if t.dim()]
    assert moments and all(t.dtype == torch.float32 for t in moments)

    capsys.readouterr()
    assert main(["predict", str(out), "thanks!", "--dtype", "float32"]) == 0
    got = capsys.readouterr()
    assert got.err.splitlines().count("dtype: float32 (--dtype float32)") == 1
    assert json.loads(got.out)["label"] in ("complaint", "no complaint")  # stdout: results only
    assert main(["predict", str(out), "thanks!", "--no-progress"]) == 0
    assert "dtype:" not in capsys.readouterr().err  # --no-progress: a quiet stderr

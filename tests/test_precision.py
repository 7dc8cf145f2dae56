"""Mixed precision: bf16 forward passes over float32 masters, and the choice of precision."""

import numpy as np
import pytest
import torch

import twist_fl.core.precision as precision
from twist_fl.core.config import RunConfig, preset
from twist_fl.core.model import GPT
from twist_fl.core.precision import current_precision, precision_scope, resolve_precision
from twist_fl.tools.cli import main

from .helpers import final_weights, run_local

CPU = torch.device("cpu")


def test_forward_under_bf16_runs_matmuls_in_bf16_and_returns_float32():
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=257))
    idx = torch.randint(0, 257, (2, 16))
    seen = []
    hook = model.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    ref, _ = model(idx)
    with precision_scope("bf16"):
        logits, loss = model(idx, idx)
    hook.remove()

    assert seen == [torch.float32, torch.bfloat16] and current_precision() == "fp32"
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters stay float32
    # bf16 keeps 8 bits of mantissa: logits agree to about 1% of their spread
    assert (logits - ref).abs().max() < 0.02 * ref.std() * 10


def test_auto_picks_bf16_only_where_the_cpu_has_fast_bf16(monkeypatch, caplog):
    caplog.set_level("INFO")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert resolve_precision("auto", CPU) == "bf16"
    assert "precision auto -> bf16 on cpu (CPU flags ['avx512_bf16'])" in caplog.text
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"


def test_fp16_on_a_cpu_is_refused_before_round_1(tmp_path):
    with pytest.raises(ValueError, match="run-config precision='fp16' needs a CUDA device"):
        run_local(tmp_path, "fp16", num_nodes=2, precision="fp16", device="cpu")
    assert not (tmp_path / "fp16").exists()
    with pytest.raises(ValueError, match=r"run-config precision='fp64' is not allowed; allowed: \['fp32', 'bf16'"):
        RunConfig.from_flat({"precision": "fp64"})


def test_true_and_masked_agree_under_bf16(tmp_path):
    # Both run the same bf16 matmuls on the kept blocks; the masked model's extra terms are exact
    # zeros, so they differ only by the order of float32 accumulation inside the kernels. After 2
    # rounds of 2 steps the weights agree to well within one bf16 rounding step of an update
    # (lr 3e-3 x Adam's unit-size steps: updates are ~1e-3; 2**-8 of that is ~4e-6).
    _, _, d_true = run_local(tmp_path, "true", num_nodes=3, mode="true", keep=2, precision="bf16")
    _, _, d_masked = run_local(tmp_path, "masked", num_nodes=3, mode="masked", keep=2, precision="bf16")
    _, _, d_fp32 = run_local(tmp_path, "fp32", num_nodes=3, mode="true", keep=2)

    a, b, c = final_weights(d_true), final_weights(d_masked), final_weights(d_fp32)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-4)
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # bf16 did change the arithmetic


def test_bf16_runs_are_deterministic(tmp_path):
    _, _, one = run_local(tmp_path, "one", num_nodes=2, precision="bf16")
    _, _, two = run_local(tmp_path, "two", num_nodes=2, precision="bf16")

    a, b = final_weights(one), final_weights(two)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_verbs_take_a_precision(tmp_path, capsys):
    run_local(tmp_path, "run", num_nodes=2)
    ppl = {}
    for p in ("fp32", "bf16"):
        assert main(["evaluate", str(tmp_path / "run"), "--eval-tokens", "2048", "--precision", p]) == 0
        ppl[p] = float(capsys.readouterr().out.split("perplexity ")[1].split()[0])
    assert main(["generate", str(tmp_path / "run"), "--prompt", "A", "--max-new-tokens", "5",
                 "--precision", "bf16"]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--precision", "fp16"]) == 2
    assert "--precision='fp16' needs a CUDA device" in capsys.readouterr().err

    assert ppl["bf16"] == pytest.approx(ppl["fp32"], rel=0.01)

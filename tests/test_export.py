"""`twist-fl export`: Hugging Face transformers folders and ONNX Runtime models (fp32, int8)."""

import json

import pytest
import torch

from twist_fl.core.data import ByteTokenizer
from twist_fl.core.model import GPT
from twist_fl.export.onnx import weight_bytes
from twist_fl.tools.cli import main

from .helpers import run_local


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A trained tiny TwIST run, and a subnet pruned from it."""
    root = tmp_path_factory.mktemp("export")
    run_local(root, "run", num_nodes=2, keep=2)
    assert main(["prune", str(root / "run"), "--keep", "2", "--out", str(root / "pruned")]) == 0
    return root


def no_pickles(folder):
    for f in folder.rglob("*"):
        if f.is_file():
            assert f.suffix not in (".bin", ".pt", ".pth", ".pkl", ".ckpt"), f
            assert not f.read_bytes()[:2].startswith(b"\x80"), f  # a pickle's protocol opcode


@pytest.mark.parametrize("which, kind", [("run", "GPT2LMHeadModel"), ("pruned", "TwistGPTForCausalLM")])
def test_hf_export_loads_in_transformers_with_the_same_logits_and_tokens(models, tmp_path, capsys, which, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["export", str(models / which), "--format", "hf", "--out", str(out)]) == 0
    remote = kind != "GPT2LMHeadModel"
    assert ("trust_remote_code=True" in capsys.readouterr().out) == remote

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    ours = GPT.load(models / which / ("model" if which == "run" else ""))
    idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=1e-5)
    assert type(hf).__name__ == kind and (out / "configuration_twist_gpt.py").exists() == remote

    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=remote)
    prompt = "ROMEO: É"
    assert tok(prompt)["input_ids"] == ByteTokenizer().encode(prompt)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    greedy = hf.generate(ids, max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
    assert main(["generate", str(models / which), "--prompt", prompt, "--max-new-tokens", "16"]) == 0
    assert tok.decode(greedy[0]) == capsys.readouterr().out.rstrip("\n")  # the same tokens as twist-fl generate
    no_pickles(out)


def test_a_gpt2_export_comes_back_with_init_from(models, tmp_path):
    from twist_fl.core.config import RunConfig
    from twist_fl.core.model import initial_model

    out = tmp_path / "hf"
    assert main(["export", str(models / "run"), "--format", "hf", "--out", str(out)]) == 0

    back = initial_model(RunConfig.from_flat({"model": "tiny", "seq-len": 32, "init-from": str(out)}))
    ours = GPT.load(models / "run" / "model")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_an_exported_folder_holds_a_model_card_naming_its_source(models, tmp_path):
    for which in ("run", "pruned"):
        out = tmp_path / which
        assert main(["export", str(models / which), "--format", "hf", "--out", str(out)]) == 0
        card = (out / "README.md").read_text()
        assert f"Exported by twist-fl from `{(models / which).resolve()}`" in card
        assert "## Training" in card and "lr " in card and "## Command" in card and "twist-fl export" in card
        assert ("a subnet cut from" in card) == (which == "pruned")
    summary = json.loads((models / "run" / "summary.json").read_text())
    assert f"| full model | {summary['final']['full']['ppl']:.3f} |" in (tmp_path / "run" / "README.md").read_text()


@pytest.mark.parametrize("which", ["run", "pruned"])
def test_onnx_export_runs_in_onnxruntime_like_torch(models, tmp_path, capsys, which):
    from twist_fl.export.onnx import OnnxLM

    out = tmp_path / "onnx"
    assert main(["export", str(models / which), "--format", "onnx", "--out", str(out)]) == 0
    capsys.readouterr()
    ours = GPT.load(models / which / ("model" if which == "run" else ""))
    onnx = OnnxLM(out)
    idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(onnx(idx)[0], ours(idx)[0], atol=1e-4, rtol=1e-4)

    # evaluate and generate take the ONNX folder; the same results as the twist-fl model
    for model in (models / which, out):
        js = tmp_path / f"{model.name}.json"
        assert main(["evaluate", str(model), "--eval-tokens", "2048", "--json", str(js)]) == 0
    a, b = (json.loads((tmp_path / f"{m.name}.json").read_text()) for m in (models / which, out))
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5) and b["file_bytes"] == (out / "model.onnx").stat().st_size
    texts = []
    for model in (models / which, out):
        capsys.readouterr()
        assert main(["generate", str(model), "--prompt", "ROMEO:", "--max-new-tokens", "80"]) == 0
        texts.append(capsys.readouterr().out)
    # 80 greedy tokens through the KV cache: the prefill, one token at a time, and past the
    # tiny model's 64 positions the context window restarted as GPT.generate does
    assert texts[0] == texts[1]
    assert main(["evaluate", str(out), "--keeps", "2"]) == 2
    assert main(["prune", str(out), "--keep", "1", "--out", str(tmp_path / "x")]) == 2
    no_pickles(out)


def test_int8_onnx_is_smaller_and_costs_little_perplexity(models, tmp_path, capsys):
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    assert main(["export", str(models / "run"), "--format", "onnx", "--out", str(fp32)]) == 0
    assert main(["export", str(models / "run"), "--format", "onnx", "--int8", "--out", str(int8)]) == 0
    ppl = {}
    for d in (fp32, int8):
        assert main(["evaluate", str(d), "--eval-tokens", "4096", "--json", str(tmp_path / f"{d.name}.json")]) == 0
        ppl[d.name] = json.loads((tmp_path / f"{d.name}.json").read_text())["ppl"]

    # the stored weights: int8 (and the embedding uint8) with float32 scales, biases and norms; the
    # graph itself (names, nodes) is most of the file on this tiny model, none of it at GPT-2 size
    w32, w8 = (sum(weight_bytes(d / "model.onnx").values()) for d in (fp32, int8))
    assert w8 < 0.35 * w32 and (int8 / "model.onnx").stat().st_size < (fp32 / "model.onnx").stat().st_size
    assert ppl["int8"] == pytest.approx(ppl["fp32"], rel=0.02)
    assert json.loads((int8 / "config.json").read_text())["onnx"]["int8"] is True


def test_export_refuses_its_input_an_existing_out_and_int8_for_hf(models, tmp_path, capsys):
    assert main(["export", str(models / "run"), "--format", "hf", "--out", str(models / "run" / "hf")]) == 2
    assert main(["export", str(models / "run"), "--format", "hf", "--int8", "--out", str(tmp_path / "a")]) == 2
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("mine")
    assert main(["export", str(models / "run"), "--format", "onnx", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "is inside" in err and "--int8 quantizes an ONNX export" in err and "already exists" in err
    assert not (models / "run" / "hf").exists() and not (tmp_path / "a").exists()

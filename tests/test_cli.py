"""The `twist-fl` verbs on tiny models trained by the app in-process."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from twist_fl.core.model import GPT
from twist_fl.tools.cli import main

from .helpers import run_local


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run_local(root, "twist", num_nodes=2, keep=2)
    run_local(root, "dense", num_nodes=2, strategy="fedavg")
    run_local(root, "twist1", num_nodes=2, keep=2, seed=1)
    run_local(root, "dense1", num_nodes=2, strategy="fedavg", seed=1)
    return root


def test_prune_saves_a_standalone_smaller_model(trained, tmp_path, capsys):
    assert main(["prune", str(trained / "twist"), "--keep", "1", "--out", str(tmp_path / "p1")]) == 0
    res_line = capsys.readouterr().out

    pruned = GPT.load(tmp_path / "p1")
    full = GPT.load(trained / "twist" / "model")
    ratio = (tmp_path / "p1" / "model.safetensors").stat().st_size / \
        (trained / "twist" / "model" / "model.safetensors").stat().st_size
    assert pruned.num_params() < full.num_params()
    assert ratio == pytest.approx(pruned.num_params() / full.num_params(), rel=0.02)
    assert all(len(pruned.blueprint.heads[i]) == 1 for i in (1,))
    idx = torch.randint(0, 257, (1, 9))
    torch.testing.assert_close(pruned(idx)[0], full(idx, mask=pruned.blueprint)[0], atol=1e-5, rtol=1e-5)
    assert "pruned to keep 1 (random)" in res_line


@pytest.mark.parametrize("method", ["best-of-k", "magnitude", "wanda"])
def test_prune_methods(trained, tmp_path, method):
    assert main(["prune", str(trained / "twist"), "--keep", "2", "--method", method, "--k", "2",
                 "--calib-tokens", "512", "--out", str(tmp_path / method)]) == 0
    assert GPT.load(tmp_path / method).blueprint is not None


def test_evaluate_writes_consistent_json(trained, tmp_path):
    out = tmp_path / "e.json"

    assert main(["evaluate", str(trained / "twist"), "--keeps", "1,3", "--draws", "2", "--eval-tokens", "1024",
                 "--json", str(out)]) == 0

    res = json.loads(out.read_text())
    assert res["removed_of_block_params"] == 0 and res["params"] == res["params_full"]
    assert res["file_bytes"] > 0 and res["ppl"] > 1 and res["tokens"] == 1024
    assert set(res["keeps"]) == {"1", "3"} and len(res["keeps"]["1"]["draws"]) == 2
    k1, k3 = res["keeps"]["1"], res["keeps"]["3"]
    assert k1["removed_of_block_params"] > k3["removed_of_block_params"] > 0
    assert k1["removed_of_all_params"] < k1["removed_of_block_params"]
    assert k1["mean"] == pytest.approx(sum(k1["draws"]) / 2)


def test_generate_from_a_pruned_model_is_deterministic_when_greedy(trained, tmp_path, capsys):
    main(["prune", str(trained / "twist"), "--keep", "2", "--out", str(tmp_path / "p")])
    capsys.readouterr()

    main(["generate", str(tmp_path / "p"), "--prompt", "ROMEO:", "--max-new-tokens", "20"])
    a = capsys.readouterr().out
    main(["generate", str(tmp_path / "p"), "--prompt", "ROMEO:", "--max-new-tokens", "20"])
    b = capsys.readouterr().out
    sampled = []
    for _ in range(2):
        main(["generate", str(tmp_path / "p"), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--temperature", "0.8"])
        sampled.append(capsys.readouterr().out)

    assert a == b and a.startswith("ROMEO:") and len(a.rstrip("\n")) > len("ROMEO:")  # 20 new tokens
    assert sampled[0] == sampled[1] and sampled[0].startswith("ROMEO:")  # sampling is seeded (--seed 0)


def test_heatmap_and_report(trained, tmp_path):
    assert main(["heatmap", str(trained / "twist"), str(trained / "dense"), "--keeps", "1,2,3", "--draws", "1",
                 "--eval-tokens", "512", "--out", str(tmp_path / "hm")]) == 0
    rows = json.loads((tmp_path / "hm" / "heatmap.json").read_text())
    assert [r["trained_keep"] for r in rows] == [2, 4] and (tmp_path / "hm" / "heatmap.png").is_file()

    assert main(["report", "--twist", str(trained / "twist"), "--dense", str(trained / "dense"), "--draws", "2",
                 "--k", "2", "--eval-tokens", "512", "--calib-tokens", "512", "--out", str(tmp_path / "rep")]) == 0
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    text = (tmp_path / "rep" / "REPORT.md").read_text()
    assert set(res["structured"]) == {"TwIST random", "TwIST best-of-k", "TwIST magnitude", "dense random",
                                      "dense best-of-k", "dense magnitude", "dense Wanda", "dense Taylor",
                                      "dense FLAP"}
    assert set(res["unstructured"]) == {"dense magnitude", "dense Wanda", "dense SparseGPT"}
    for series in res["unstructured"].values():  # at every keep, the structured methods' share
        assert [p["keep"] for p in series] == [1, 2, 3]
        assert [p["sparsity_in_pruned_matrices"] for p in series] == [0.75, 0.5, 0.25]
        assert [p["removed_of_block_params"] for p in series] == \
            [p["removed_of_block_params"] for p in res["structured"]["dense random"]]
    assert "Ratio TwIST / best" in text and 'strategy=\\"fedavg\\"' in text and "dense (FedAvg)" in text
    # the paper's headline (TwIST / SparseGPT = 0.73) is set beside the same ratio here, never beside FLAP's
    sg = [p["ppl"] for p in res["unstructured"]["dense SparseGPT"] if p["keep"] == 2][0]
    tw = [p["ppl"] for p in res["structured"]["TwIST random"] if p["keep"] == 2][0]
    assert f"here TwIST / SparseGPT = {tw / sg:.3f}: {'reversed' if tw > sg else 'the same direction'}" in text
    assert "is 0.73)" not in text
    assert (tmp_path / "rep" / "comparison.png").is_file()

    # one pair per seed: each cell is the mean over the seeds, its spread their std
    assert main(["report", "--twist", str(trained / "twist"), str(trained / "twist1"),
                 "--dense", str(trained / "dense"), str(trained / "dense1"), "--keeps", "2", "--draws", "2", "--k", "2",
                 "--eval-tokens", "512",
                 "--calib-tokens", "512", "--out", str(tmp_path / "rep2")]) == 0
    res2 = json.loads((tmp_path / "rep2" / "results.json").read_text())
    text2 = (tmp_path / "rep2" / "REPORT.md").read_text()
    assert res2["seeds"] == 2 and "mean ± std over 2 seeds" in text2
    assert text2.count('--federation-config "num-supernodes=2"') == 4  # the nodes the runs used, not a constant
    for kind in ("structured", "unstructured"):
        for label, series in res2[kind].items():
            single = next(p for p in res[kind][label] if p["keep"] == 2)
            assert single["ppl"] in [pytest.approx(v) for v in series[0]["per_seed"]]
            assert series[0]["ppl"] == pytest.approx(np.mean(series[0]["per_seed"]))


def test_report_refuses_unpaired_runs_and_a_twist_run_as_dense(trained, tmp_path, capsys):
    common = ["--keeps", "2", "--draws", "1", "--eval-tokens", "512", "--out", str(tmp_path / "r")]
    assert main(["report", "--twist", str(trained / "twist"), "--dense", str(trained / "dense"),
                 str(trained / "dense1"), *common]) == 2
    assert "one run folder per seed, paired: 1 and 2 given" in capsys.readouterr().err
    assert main(["report", "--twist", str(trained / "twist"), "--dense", str(trained / "twist"), *common]) == 2
    assert "was trained with strategy 'twist'; it needs a dense run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,match", [
    (["prune", "{twist}", "--keep", "9", "--out", "{tmp}/x"], "keep=9 is out of range for this model: allowed 1..4"),
    (["evaluate", "{tmp}"], "is not a twist-fl model directory"),
    (["evaluate", "{twist}", "--tokenizer", "gpt2"], "vocab_size 257, but tokenizer 'gpt2' has 50257"),
    (["evaluate", "{twist}", "--keeps", "0,2"], r"--keeps entry=0 is out of range for this model: allowed 1..4"),
])
def test_bad_inputs_give_clear_errors(trained, tmp_path, capsys, argv, match):
    argv = [a.format(twist=trained / "twist", tmp=tmp_path) for a in argv]

    assert main(argv) == 2

    import re
    assert re.search(match, capsys.readouterr().err)


def test_module_entry_point_has_help_for_every_verb():
    for verb in ("prune", "evaluate", "generate", "heatmap", "report"):
        out = subprocess.run([sys.executable, "-m", "twist_fl", verb, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: twist-fl " + verb in out.stdout

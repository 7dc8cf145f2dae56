"""The second bad-input probe, one test per reproduction: each is refused with exit 2 and one
line naming the thing, no traceback, before any work, and nothing is written."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from twist_fl.baselines.ddp import ddp_run_config, parse_overrides, run_ddp
from twist_fl.core.config import RunConfig, parse_run_config
from twist_fl.core.model import initial_model
from twist_fl.tools.cli import main

from .helpers import TINY, run_local


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    run_local(root, "twist", num_nodes=2, keep=2, num_server_rounds=1)
    run_local(root, "dense", num_nodes=2, strategy="fedavg", num_server_rounds=1)
    return root


def one_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def copy_model(trained, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(trained / "twist" / "model", dst)
    return dst


def test_evaluate_data_path_is_not_ignored(trained, tmp_path, capsys):
    assert main(["evaluate", str(trained / "twist"), "--data-path", str(tmp_path)]) == 2
    one_line(capsys, "--data-path", "no meaning for dataset 'shakespeare'")


def test_report_refuses_one_run_given_as_two_seeds(trained, tmp_path, capsys):
    t, d = str(trained / "twist"), str(trained / "dense")
    assert main(["report", "--twist", t, t + "/model", "--dense", d, d, "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "--twist names the same model twice")
    assert not (tmp_path / "r").exists()


def test_report_keeps_are_checked_before_the_evaluation(trained, tmp_path, capsys):
    assert main(["report", "--twist", str(trained / "twist"), "--dense", str(trained / "dense"), "--keeps", ",",
                 "--out", str(tmp_path / "r")]) == 2
    one_line(capsys, "--keeps ',' names no subnet size")
    assert not (tmp_path / "r").exists()


def test_force_never_swaps_a_file_for_a_folder(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("mine\n")
    (tmp_path / "folder").mkdir()
    assert main(["prune", str(trained / "twist"), "--keep", "2", "--out", str(tmp_path / "file"), "--force"]) == 2
    one_line(capsys, "is an existing file; it takes a folder")
    assert main(["evaluate", str(trained / "twist"), "--json", str(tmp_path / "folder"), "--force"]) == 2
    one_line(capsys, "is an existing folder; it takes a file path")
    assert (tmp_path / "file").read_text() == "mine\n" and (tmp_path / "folder").is_dir()


def test_a_model_with_absurd_weights_is_refused(trained, tmp_path, capsys):
    m = copy_model(trained, tmp_path)
    state = load_file(str(m / "model.safetensors"))
    state["h.1.mlp.c_fc.weight"][0, 0] = 1e37  # finite, and no trained model's
    save_file(state, str(m / "model.safetensors"), metadata={"format": "twist-fl/model-v1"})
    for verb in (["evaluate", str(m)], ["generate", str(m), "--prompt", "To be"],
                 ["export", str(m), "--format", "onnx", "--out", str(tmp_path / "onnx")]):
        assert main(verb) == 2
        one_line(capsys, "absurd weights", "h.1.mlp.c_fc.weight up to 1e+37")
    assert not (tmp_path / "onnx").exists()


def test_an_onnx_model_whose_outputs_overflow_is_refused(trained, tmp_path, capsys):
    assert main(["export", str(trained / "twist"), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    capsys.readouterr()
    import onnx
    from onnx import numpy_helper

    path = tmp_path / "onnx" / "model.onnx"
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:  # an ONNX file edited by hand: its weights overflow
        if init.name.endswith("wte.weight") or "wte" in init.name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1e37, init.name))
    onnx.save(proto, str(path))
    assert main(["evaluate", str(tmp_path / "onnx")]) == 2
    one_line(capsys, str(tmp_path / "onnx"), "non-finite")


def test_an_exported_subnet_is_no_starting_point(trained, tmp_path, capsys):
    assert main(["prune", str(trained / "twist"), "--keep", "2", "--out", str(tmp_path / "p")]) == 0
    assert main(["export", str(tmp_path / "p"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    run = RunConfig.from_flat({**TINY, "init-from": str(tmp_path / "hf")})
    with pytest.raises(ValueError, match=r"'twist_gpt' Hugging Face folder \(a pruned subnet .*pass the full model"):
        initial_model(run)
    with pytest.raises(ValueError, match="is a pruned subnet; training needs a full model"):
        initial_model(RunConfig.from_flat({**TINY, "init-from": str(tmp_path / "p")}))


def test_deploy_local_checks_its_run_config_before_starting_anything(tmp_path, capsys):
    d = tmp_path / "dep"
    assert main(["deploy", "local", "--dir", str(d), "--run-config", "lr=-1"]) == 2
    one_line(capsys, "run-config lr=-1")
    assert main(["deploy", "local", "--dir", str(d), "--timeout", "0"]) == 2
    one_line(capsys, "--timeout=0.0 is not allowed")
    assert not d.exists()  # no certificates, no SuperLink, nothing to refuse later


def test_run_config_text_is_parsed_as_flwr_run_parses_it():
    assert parse_run_config('run-name="a b" lr=0.1 eval-keeps="2,4" mode=true') == \
        {"run-name": "a b", "lr": 0.1, "eval-keeps": "2,4", "mode": True}
    with pytest.raises(ValueError, match=r"gives 'lr' twice \(0.1 and 0.2\)"):
        parse_run_config("lr=0.1 lr=0.2")
    with pytest.raises(ValueError, match="entry lr= has no value"):
        parse_overrides("lr=")
    with pytest.raises(ValueError, match="entry 'b\"' is not key=value"):
        parse_overrides('run-name=a b"')


def test_ddp_refuses_bad_eval_tokens_before_training_and_leaves_no_folder(tmp_path):
    run = ddp_run_config({**TINY, "eval-tokens": 3, "out-dir": str(tmp_path), "run-name": "d"})
    with pytest.raises(ValueError, match=r"eval-tokens=3 at seq-len=32: .* too few"):
        run_ddp(run, 1)
    assert not (tmp_path / "d").exists()


def test_ddp_does_not_advise_resuming_a_ddp_run(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    run = ddp_run_config({**TINY, "out-dir": str(tmp_path), "run-name": "d"})
    with pytest.raises(ValueError, match=r"already exists .*a DDP run is not resumed") as e:
        run_ddp(run, 1)
    assert "resume-from" not in str(e.value)


def test_the_sweep_prints_one_line_for_a_refused_value(tmp_path):
    out = subprocess.run([sys.executable, "-m", "twist_fl.tools.sweep", "run.lr=-1", f"hydra.run.dir={tmp_path}/s"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1] == \
        "twist-fl sweep: error: run-config lr=-1.0 must be a positive finite number"


def test_num_nodes_above_the_ready_nodes_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="twist_fl"):
        _, _, run_dir = run_local(tmp_path, "n", num_nodes=2, num_server_rounds=1, **{"num-nodes": 5})
    assert "num-nodes=5 but only 2 node(s) are ready" in caplog.text
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert len(row["nodes"]) == 2  # the round row records who trained


@pytest.mark.parametrize("edit, needle", [
    (lambda meta: meta.update(run="x"), "its 'run' entry is str 'x'"),
    (lambda meta: meta["run"].update(tokenizer="words"), "run tokenizer='words' is not allowed"),
])
@pytest.mark.parametrize("verb", ["evaluate", "prune"])
def test_a_damaged_config_json_is_refused(trained, tmp_path, capsys, edit, needle, verb):
    m = copy_model(trained, tmp_path)
    meta = json.loads((m / "config.json").read_text())
    edit(meta)
    (m / "config.json").write_text(json.dumps(meta))
    argv = ["evaluate", str(m)] if verb == "evaluate" else \
        ["prune", str(m), "--keep", "2", "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    one_line(capsys, needle)
    assert not (tmp_path / "p").exists()


def test_an_offline_wikitext_is_one_line(trained, capsys, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["evaluate", str(trained / "twist"), "--dataset", "wikitext-2"]) == 2
    one_line(capsys, "dataset 'wikitext-2' could not be fetched", "pass data-path")


def test_certificates_for_too_many_days_are_refused_before_any_file(tmp_path, capsys):
    assert main(["deploy", "certs", "--out", str(tmp_path / "c"), "--days", "10000000"]) == 2
    one_line(capsys, "--days=10000000 is not allowed; allowed: 1..36500")
    assert not (tmp_path / "c").exists()

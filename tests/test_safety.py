"""Nothing lost, nothing silently wrong: the verbs and run folders under bad input.

One test per reproduction: the exit code, a message that names the thing, nothing written on
refusal, and every file that existed before byte-identical afterwards."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from twist_fl.core.config import RunConfig
from twist_fl.core.data import load_tokens
from twist_fl.core.model import FORMAT, GPT, initial_model
from twist_fl.core.progress import enable as enable_progress
from twist_fl.evaluation.compare import _full_models, headline_keep
from twist_fl.tools.cli import main

from .helpers import run_local


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    run_local(root, "twist", num_nodes=2, keep=2)
    run_local(root, "dense", num_nodes=2, strategy="fedavg")
    return root


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained TwIST run folder: the tests may try to damage it."""
    return Path(shutil.copytree(trained / "twist", tmp_path / "run"))


@pytest.fixture(autouse=True)
def _quiet_progress():
    yield
    enable_progress(False)  # main() turns progress on for the process


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for r in roots if r.exists()
            for f in ([r] if r.is_file() else sorted(r.rglob("*"))) if f.is_file()}


def refused(argv: list[str], capsys, *names: str) -> str:
    """Run a verb that must refuse: exit code 2, one line on stderr naming each of `names`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)
    return err


# --- nothing overwritten unless asked ------------------------------------------------------------

@pytest.mark.parametrize("model, out", [("run/model", "run/model"), ("run/model", "run"), ("run", "run/model"),
                                        ("run", "run/pruned"), ("run", "run")])
def test_prune_never_writes_onto_inside_or_around_its_input(run, capsys, model, out):
    before = snapshot(run)
    root = run.parent

    err = refused(["prune", str(root / model), "--keep", "2", "--out", str(root / out), "--force"], capsys,
                  str(root / out))

    assert "is, is inside, or contains the input" in err
    assert snapshot(run) == before and not (run / "pruned").exists()


def test_prune_refuses_an_existing_out_without_force(run, tmp_path, capsys):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(run, out)

    refused(["prune", str(run), "--keep", "2", "--out", str(out)], capsys, str(out), "already exists", "--force")
    assert snapshot(run, out) == before

    assert main(["prune", str(run), "--keep", "2", "--out", str(out), "--force"]) == 0
    assert GPT.load(out).blueprint is not None and (out / "notes.txt").read_text() == "mine"


def test_node_key_refuses_a_pub_path_existing_keys_and_a_folder(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    refused(["deploy", "node-key", "--out", str(keys / "node.key.pub")], capsys, "node.key.pub", "ends in .pub")
    assert list(keys.iterdir()) == []

    assert main(["deploy", "node-key", "--out", str(keys / "node.key")]) == 0
    capsys.readouterr()
    before = snapshot(keys)
    refused(["deploy", "node-key", "--out", str(keys / "node.key")], capsys, "node.key", "already exists")
    assert snapshot(keys) == before

    refused(["deploy", "node-key", "--out", str(keys)], capsys, str(keys), "is a folder")
    assert snapshot(keys) == before  # no stray private-key temporary file beside it
    assert main(["deploy", "node-key", "--out", str(keys / "node.key"), "--force"]) == 0
    assert snapshot(keys) != before


def test_certs_refuse_existing_files_bad_days_and_bad_hosts(tmp_path, capsys):
    certs = tmp_path / "certs"
    assert main(["deploy", "certs", "--out", str(certs)]) == 0
    capsys.readouterr()
    before = snapshot(certs)

    refused(["deploy", "certs", "--out", str(certs)], capsys, "ca.crt", "already exists", "--force")
    refused(["deploy", "certs", "--out", str(tmp_path / "c2"), "--days", "0"], capsys, "--days", "'0'")
    refused(["deploy", "certs", "--out", str(tmp_path / "c3"), "--host", "http://x:9/y"], capsys, "--host",
            "'http://x:9/y' is neither an IP address nor a DNS name")

    assert snapshot(certs) == before and not (tmp_path / "c2").exists() and not (tmp_path / "c3").exists()


def test_a_new_run_never_writes_into_a_folder_that_holds_files(tmp_path):
    folder = tmp_path / "out" / "mine"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"precious")
    before = snapshot(folder)

    with pytest.raises(ValueError, match="already exists and is not empty"):
        run_local(tmp_path / "out", "mine", num_nodes=2)
    with pytest.raises(ValueError, match="run-name='/abs/elsewhere' must be a folder name, not a path"):
        RunConfig.from_flat({"run-name": "/abs/elsewhere"})

    assert snapshot(folder) == before


# --- no silent wrong results ----------------------------------------------------------------------

def test_report_takes_n_from_the_model_and_compares_equal_shares(trained, tmp_path, capsys):
    # the tiny model has N = 4; keeps 1 and 3 leave no "half" to talk about
    assert main(["report", "--twist", str(trained / "twist"), "--dense", str(trained / "dense"), "--keeps", "1,3",
                 "--draws", "1", "--k", "2", "--eval-tokens", "512", "--calib-tokens", "512",
                 "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "REPORT.md").read_text()
    res = json.loads((tmp_path / "r" / "results.json").read_text())

    assert res["n_blocks"] == 4 and "N = 4" in text and "keep 1 of 4" in text and "keep 3 of 4" in text
    assert "## At keep 1 of 4 (3 of the 4 blocks of every pruned layer removed" in text and "half" not in text
    assert "75% of each pruned matrix" in text  # the unstructured baselines are there, at keep 1's share
    for series in res["unstructured"].values():
        assert [p["removed_of_block_params"] for p in series] == \
            [p["removed_of_block_params"] for p in res["structured"]["TwIST random"]]
    assert headline_keep([2, 4], 8) == 4 and headline_keep([1, 3], 4) == 1 and headline_keep([5, 6], 8) == 5


def test_report_checks_each_runs_recorded_strategy(trained, tmp_path, capsys):
    common = ["--keeps", "2", "--draws", "1", "--eval-tokens", "512"]
    refused(["report", "--twist", str(trained / "twist"), "--dense", str(trained / "twist"), *common,
             "--out", str(tmp_path / "a")], capsys, "--dense", "strategy 'twist'", "needs a dense run")
    refused(["report", "--twist", str(trained / "dense"), "--dense", str(trained / "dense"), *common,
             "--out", str(tmp_path / "b")], capsys, "--twist", "strategy 'fedavg'")
    pruned = tmp_path / "p"
    GPT.load(trained / "dense" / "model").save(pruned)  # a model folder that records no strategy
    refused(["report", "--twist", str(trained / "twist"), "--dense", str(pruned), *common,
             "--out", str(tmp_path / "c")], capsys, "strategy None")
    assert not any((tmp_path / x).exists() for x in "abc")


def test_the_full_models_sentence_says_what_the_figures_say():
    assert "same perplexity" in _full_models({"twist_full_ppl": 7.0001, "dense_full_ppl": 7.0002})
    assert "The TwIST model's full perplexity is the lower" in _full_models({"twist_full_ppl": 6.0,
                                                                             "dense_full_ppl": 7.0})
    assert "The dense model's full perplexity is the lower" in _full_models({"twist_full_ppl": 8.0,
                                                                             "dense_full_ppl": 7.0})


def test_a_non_finite_weight_is_an_error_naming_the_tensor(run, capsys):
    w = run / "model" / "model.safetensors"
    state = load_file(str(w))
    state["h.1.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(state, str(w), metadata={"format": FORMAT})

    refused(["evaluate", str(run)], capsys, str(w), "non-finite", "h.1.mlp.c_fc.weight")
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.weight"):
        GPT.load(run / "model")


@pytest.mark.parametrize("argv, names", [
    (["evaluate", "{run}", "--draws", "0", "--keeps", "2"], ["--draws", "'0'"]),
    (["evaluate", "{run}", "--eval-tokens", "0"], ["--eval-tokens", "'0'"]),
    (["evaluate", "{run}", "--seq-len", "0"], ["--seq-len", "'0'"]),
    (["evaluate", "{run}", "--seq-len", "65"], ["--seq-len 65", "allowed 1..64"]),
    (["heatmap", "{run}", "--keeps", "2", "--draws", "0", "--out", "{tmp}/h"], ["--draws", "'0'"]),
    (["prune", "{run}", "--keep", "2", "--method", "best-of-k", "--k", "0", "--out", "{tmp}/p"], ["--k", "'0'"]),
    (["prune", "{run}", "--keep", "2", "--method", "wanda", "--calib-tokens", "-3", "--out", "{tmp}/p"],
     ["--calib-tokens", "'-3'"]),
    (["generate", "{run}", "--prompt", "A", "--temperature", "-1"], ["--temperature", "'-1'"]),
    (["generate", "{run}", "--prompt", "A", "--temperature", "nan"], ["--temperature", "'nan'"]),
    (["generate", "{run}", "--prompt", "A", "--top-k", "-1"], ["--top-k", "'-1'"]),
    (["generate", "{run}", "--prompt", "A", "--max-new-tokens", "-5"], ["--max-new-tokens", "'-5'"]),
    (["generate", "{run}", "--prompt", "A", "--max-new-tokens", "0"], ["--max-new-tokens", "'0'"]),
    (["evaluate", "{run}", "--json", "{tmp}/missing/e.json"], ["--json", "missing", "does not exist"]),
])
def test_bad_arguments_are_refused_before_any_work(run, tmp_path, capsys, argv, names):
    before = snapshot(run)

    refused([a.format(run=run, tmp=tmp_path) for a in argv], capsys, *names)

    assert snapshot(run) == before and not (tmp_path / "h").exists() and not (tmp_path / "p").exists()


def test_no_nan_is_printed_or_written_as_a_result(run, tmp_path, capsys):
    # --draws 0 is refused above; a model whose outputs overflow gives no perplexity at all
    big = GPT.load(run / "model")
    with torch.no_grad():
        big.ln_f.weight.fill_(3e38)
        big.ln_f.bias.fill_(3e38)
    big.save(tmp_path / "overflow", extra={"run": json.loads((run / "model" / "config.json").read_text())["run"]})

    assert main(["evaluate", str(tmp_path / "overflow"), "--eval-tokens", "256", "--json",
                 str(tmp_path / "e.json")]) == 2
    out, err = capsys.readouterr()
    assert "absurd weights" in err and "overflow its outputs" in err and "perplexity nan" not in out + err
    assert not (tmp_path / "e.json").exists()
    from twist_fl.core.io import write_json

    write_json(tmp_path / "v.json", {"ppl": float("nan"), "inf": [float("inf")], "ok": 1.5})
    assert json.loads((tmp_path / "v.json").read_text(), parse_constant=pytest.fail) == \
        {"ppl": None, "inf": [None], "ok": 1.5}


def test_top_k_zero_samples_without_a_limit_and_generate_streams(run, capsys, monkeypatch):
    writes = []

    class Recorder:
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", Recorder())
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "1",
                 "--top-k", "0"]) == 0
    text = "".join(writes)
    assert text.startswith("ROMEO:") and text.endswith("\n")
    assert len([w for w in writes if w]) > 3  # the prompt, then pieces as they come, not one write at the end


# --- raw tracebacks that did not name the file -----------------------------------------------------

@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_weights_file_is_an_error_naming_it(run, capsys, damage):
    w = run / "model" / "model.safetensors"
    w.write_bytes(b"" if damage == "empty" else w.read_bytes()[: w.stat().st_size // 2])

    refused(["evaluate", str(run)], capsys, str(w), "not a readable safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GPT.load(run / "model")
    with pytest.raises(ValueError, match=r"run-config init-from=.*not a readable safetensors file"):
        initial_model(RunConfig.from_flat({"model": "tiny", "seq-len": 32, "init-from": str(run / "model")}))


def test_a_config_without_its_entries_is_an_error_naming_it(run, capsys):
    c = run / "model" / "config.json"
    meta = json.loads(c.read_text())
    del meta["gpt"]
    c.write_text(json.dumps(meta))

    refused(["evaluate", str(run)], capsys, str(c), "lacks its 'gpt' entry")


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"  \n\n", "is empty"),
                                              (b"To be\xff or not", "is not UTF-8 text: byte 5")])
def test_an_empty_or_non_utf8_text_file_is_an_error_naming_it(tmp_path, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_bytes(content)
    (data / "valid.txt").write_text("valid text\n")
    (data / "test.txt").write_text("test text\n")

    with pytest.raises(ValueError, match=f"{data / 'train.txt'} {message}"):
        load_tokens("text", "bytes", str(data))


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(tmp_path, caplog):
    overrides = dict(num_nodes=2, num_server_rounds=3, optimizer_state="reset")
    _, _, straight = run_local(tmp_path, "straight", **overrides)

    class Crash(BaseException):
        pass

    def crash_in_round_3(sent, reply, node):
        if sent.metadata.message_type == "train" and sent.content["config"]["server-round"] == 3:
            raise Crash()
        return reply

    with pytest.raises(Crash):
        run_local(tmp_path, "torn", reply_hook=crash_in_round_3, **overrides)
    metrics = tmp_path / "torn" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"round": 3, "train_loss": 4.')  # the line of a round whose checkpoint was never written

    run_local(tmp_path, "unused", resume_from=str(tmp_path / "torn"), **overrides)

    assert "dropping its last line" in caplog.text
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(tmp_path / "torn" / "model" /
                                                                                 "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_metrics_line_before_the_last_is_refused_on_resume(run, tmp_path):
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(["{broken", *lines]) + "\n")
    before = snapshot(run)
    rc = {**json.loads((run / "config.json").read_text())["run"], "resume-from": str(run),
          "num-server-rounds": 5}

    with pytest.raises(ValueError, match=r"metrics.jsonl line 1 is not valid JSON"):
        run_local(tmp_path, "x", **{k.replace("-", "_"): v for k, v in rc.items() if k not in ("out-dir", "run-name")})
    assert snapshot(run) == before


# --- resume --------------------------------------------------------------------------------------

def _resume(run: Path, tmp_path: Path, **changes):
    rc = {**json.loads((run / "config.json").read_text())["run"], "resume-from": str(run), **changes}
    return run_local(tmp_path, "unused", **{k.replace("-", "_"): v for k, v in rc.items()
                                            if k not in ("out-dir", "run-name")})


def test_resuming_a_finished_run_with_no_more_rounds_is_refused(run, tmp_path):
    before = snapshot(run)

    for rounds in (1, 2):  # the run finished its 2 rounds
        with pytest.raises(ValueError, match=f"has finished round 2, and num-server-rounds={rounds} asks for no "
                                             "round after it"):
            _resume(run, tmp_path, **{"num-server-rounds": rounds})

    assert snapshot(run) == before


def test_resuming_a_missing_folder_creates_nothing(tmp_path):
    missing = tmp_path / "no-such-run"

    with pytest.raises(ValueError, match="is not a run folder"):
        run_local(tmp_path, "x", num_nodes=2, resume_from=str(missing))

    assert not missing.exists() and not (tmp_path / "x").exists()


# --- progress -------------------------------------------------------------------------------------

def test_long_evaluations_report_progress_without_a_terminal(run, caplog, monkeypatch):
    import twist_fl.core.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level("INFO")

    assert main(["evaluate", str(run), "--keeps", "2", "--draws", "2", "--eval-tokens", "4096"]) == 0

    lines = [r.getMessage() for r in caplog.records if r.name == "twist_fl.core.progress"]
    assert any(m.startswith("evaluating on valid: ") for m in lines)
    assert any(m.startswith("keep 2: random subnets: 2/2") for m in lines)

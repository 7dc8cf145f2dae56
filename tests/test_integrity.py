"""The third bad-input probe: one writer per output, never into an input, locks that name their
holder, no accepted value that the run then ignores, one seed counted once, and every refusal
one line with exit code 2 before any work (each input byte-identical afterwards)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twist_fl.core.config import RunConfig
from twist_fl.core.io import HolderLock, claim_output, lock_path, release_claims
from twist_fl.tools.cli import main

from .helpers import TINY, run_local

ROOT = Path(__file__).resolve().parents[1]


def snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for r in roots for f in sorted(r.rglob("*")) if f.is_file()}


def one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
             and "usage:" not in line and not line.startswith(" ")]
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    run_local(root, "twist", num_nodes=2, keep=2, num_server_rounds=1)
    run_local(root, "dense", num_nodes=2, strategy="fedavg", num_server_rounds=1)
    return root


# --- never into an input -------------------------------------------------------------------------


def test_a_sweep_never_writes_into_a_model_folder(trained, tmp_path, capsys):
    model = trained / "twist" / "model"
    before = snapshot(trained / "twist")
    assert main(["sweep", "run.model=tiny", f"run.init_from={model}", f"hydra.run.dir={model}"]) == 2
    one_line(capsys, "hydra.run.dir", "is, is inside, or contains the input")
    assert main(["sweep", "run.model=tiny", f"hydra.run.dir={trained / 'twist' / 'x'}"]) == 2
    one_line(capsys, "is inside the model or run folder")
    assert snapshot(trained / "twist") == before and not (trained / "twist" / "x").exists()


def test_a_sweep_refuses_what_it_cannot_run_in_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    (tmp_path / "file").write_text("x")
    cases = [(["num_supernodes=0"], "num_supernodes=0 must be a whole number >= 1"),
             (["run.min_nodes=5", "num_supernodes=2"], "min-nodes=5 waits for more nodes than the 2 there are"),
             (["run.full-nodes=2", "num_supernodes=2"], "full-nodes=2 would have every one of the 2 nodes"),
             ([f"hydra.run.dir={tmp_path / 'file' / 'x'}"], "is a file, not a folder")]
    for n, (extra, needle) in enumerate(cases):
        where = [] if any(a.startswith("hydra.run.dir=") for a in extra) else [f"hydra.run.dir={tmp_path / str(n)}"]
        assert main(["sweep", "run.model=tiny", *extra, *where]) == 2
        one_line(capsys, needle)
    if os.geteuid() != 0:  # root writes through permissions; a read-only folder refuses everyone else
        ro.chmod(0o500)
        assert main(["sweep", "run.model=tiny", f"hydra.run.dir={ro / 'x'}"]) == 2
        one_line(capsys, "not writable")


@pytest.mark.slow
def test_a_sweep_takes_dashed_keys_and_records_the_model_it_trained(trained, tmp_path, capsys):
    dense = trained / "dense"
    assert main(["sweep", "run.model=cpu-small", f"run.init-from={dense}", "run.num-server-rounds=1",
                 "run.local-steps=1", "run.eval-tokens=512", "num-supernodes=2",
                 f"hydra.run.dir={tmp_path / 's'}"]) == 0
    conf = json.loads((tmp_path / "s" / "run" / "config.json").read_text())
    assert conf["run"]["model"] == "tiny" and conf["run"]["local-steps"] == 1  # init-from's architecture, recorded
    out = capsys.readouterr().out + capsys.readouterr().err
    assert out.count("[ROUND 1/1]") <= 1  # Flower's log lines once, not twice


def test_ddp_never_writes_into_a_model_folder_and_checks_its_app(trained, tmp_path, capsys):
    before = snapshot(trained / "twist")
    rc = f"model='tiny' init-from='{trained / 'twist'}' out-dir='{trained / 'twist' / 'model'}'"
    assert main(["ddp", "--nproc", "2", "--run-config", rc]) == 2
    one_line(capsys, "is, is inside, or contains the input")
    assert main(["ddp", "--nproc", "2", "--run-config", f"model='tiny' out-dir='{trained / 'twist'}'"]) == 2
    one_line(capsys, "is inside the model or run folder")
    (tmp_path / "f").write_text("x")
    assert main(["ddp", "--nproc", "2", "--run-config", f"model='tiny' out-dir='{tmp_path / 'f'}'"]) == 2
    one_line(capsys, "is a file, not a folder")
    assert main(["ddp", "--app", str(tmp_path / "missing"), "--run-config", "model='tiny'"]) == 2
    one_line(capsys, "--app", "is not a folder")
    assert snapshot(trained / "twist") == before


def test_an_output_through_a_symlinked_parent_is_the_folder_it_points_into(trained, tmp_path, capsys):
    (tmp_path / "link").symlink_to(trained / "twist")
    before = snapshot(trained / "twist")
    assert main(["export", str(trained / "twist"), "--format", "hf", "--out", str(tmp_path / "link" / "hf")]) == 2
    one_line(capsys, "is, is inside, or contains the input")
    assert snapshot(trained / "twist") == before


def test_other_paths_that_are_files_or_too_long_are_one_line(trained, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["deploy", "local", "--dir", str(tmp_path / "f")]) == 2
    one_line(capsys, "is a file")
    assert main(["tune", "run", "--out", str(tmp_path / "f"), "--methods", "twist"]) == 2
    one_line(capsys, "is a file")
    long = tmp_path / ("x" * 300)
    assert main(["prune", str(trained / "twist"), "--keep", "2", "--out", str(long)]) == 2
    one_line(capsys, "bytes long; the file system allows")
    assert main(["evaluate", str(trained / "twist"), "--json", str(long) + ".json"]) == 2
    one_line(capsys, "bytes long")


# --- locks that know their holder ----------------------------------------------------------------


HOLD = ("import sys, time; from twist_fl.core.io import claim_output; claim_output(sys.argv[1], force=True); "
        "print('locked', flush=True); time.sleep(600)")


def test_a_held_output_names_its_holder_and_a_dead_one_is_taken_over(tmp_path, caplog, monkeypatch):
    env = {**os.environ, "TWIST_FL_CACHE": os.environ["TWIST_FL_CACHE"]}
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "locked"
        for _ in range(3):  # the same answer every time
            with pytest.raises(ValueError, match=rf"--out '{out}' is being written by another process \(PID {p.pid} "
                                                 r"on .*, started "):
                claim_output(out, force=True)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    for _ in range(3):
        claim_output(out, force=True)  # its holder is dead: taken over at once, whatever the timing
        release_claims()
    assert f"taking over the lock of PID {p.pid}" in caplog.text and caplog.text.count("taking over") == 1
    assert lock_path(out.resolve()).read_text() == ""  # released cleanly: no record left to warn about


def test_a_lock_file_with_a_record_but_no_holder_is_taken_over_once(tmp_path, caplog):
    f = tmp_path / "x.lock"
    f.write_text(json.dumps({"pid": 999999, "host": "h", "started": "then"}) + "\n")
    lock = HolderLock(f, "thing").acquire()
    assert "taking over the lock of PID 999999 on h, started then, which has ended" in caplog.text
    assert json.loads(f.read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.slow
def test_two_writers_of_one_output_end_with_exactly_one_of_them(trained, tmp_path):
    """Every pair of the verbs that write a folder, started together on one --out: exactly one
    exits 0 and the folder holds exactly that writer's files."""
    verbs = {
        "prune": (["prune", str(trained / "twist"), "--keep", "2", "--method", "random"],
                  {"config.json", "model.safetensors"}),
        "export": (["export", str(trained / "twist"), "--format", "hf"],
                   {"config.json", "model.safetensors", "generation_config.json", "README.md"}),
        "heatmap": (["heatmap", str(trained / "twist"), "--keeps", "1,2", "--draws", "1", "--eval-tokens", "256"],
                    {"heatmap.png", "heatmap.md", "heatmap.json"}),
        "report": (["report", "--twist", str(trained / "twist"), "--dense", str(trained / "dense"), "--keeps", "2",
                    "--draws", "1", "--eval-tokens", "256", "--calib-tokens", "256"],
                   {"REPORT.md", "results.json", "comparison.png"}),
    }
    names = list(verbs)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i:]]
    for n, (a, b) in enumerate(pairs):
        out = tmp_path / f"out{n}"
        procs = [subprocess.Popen([sys.executable, "-m", "twist_fl", *verbs[v][0], "--out", str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in (a, b)]
        codes = [p.wait(timeout=600) for p in procs]
        assert sorted(codes) == [0, 2], (a, b, codes, [p.stderr.read()[-500:] for p in procs])
        winner = (a, b)[codes.index(0)]
        files = {f.name for f in out.iterdir() if not f.name.startswith(".")}
        assert verbs[winner][1] <= files and not (files - verbs[winner][1] - {"tokenizer.json", "vocab.json",
                                                                                "merges.txt", "tokenizer_config.json",
                                                                                "special_tokens_map.json"}), \
            (a, b, winner, files)


# --- values that would be ignored ----------------------------------------------------------------


def test_full_nodes_must_leave_a_node_a_subnet():
    with pytest.raises(ValueError, match=r"full-nodes=5 would have every one of the num-nodes=2 nodes"):
        RunConfig.from_flat({**TINY, "full-nodes": 5, "num-nodes": 2})
    run = RunConfig.from_flat({**TINY, "full-nodes": 2})
    with pytest.raises(ValueError, match=r"full-nodes=2 would have every one of the 2 nodes of a round train the "
                                         r"full model \(FedAvg, not TwIST\); allowed: 0..1"):
        run.check_nodes(2)
    run.check_nodes(3)


def test_a_run_with_full_nodes_for_every_node_is_refused_before_it_trains(tmp_path):
    with pytest.raises(ValueError, match="full-nodes=2 would have every one of the 2 nodes"):
        run_local(tmp_path, "r", num_nodes=2, full_nodes=2)
    assert not (tmp_path / "r" / "model").exists()


def test_prefix_of_a_random_run_says_what_it_means(trained, tmp_path, caplog):
    assert main(["prune", str(trained / "twist"), "--keep", "2", "--method", "prefix", "--out",
                 str(tmp_path / "p")]) == 0
    assert "was trained with subnet-policy 'random', whose subnets are not nested" in caplog.text


def test_sizes_are_bounded_and_a_tiny_temperature_is_greedy(trained, capsys):
    assert main(["evaluate", str(trained / "twist"), "--keeps", "2", "--draws", "100000"]) == 2
    one_line(capsys, "--draws", "allowed: 1..100 draws")
    assert main(["generate", str(trained / "twist"), "--prompt", "a", "--max-new-tokens", "10000000"]) == 2
    one_line(capsys, "allowed: 1..100,000 tokens")
    assert main(["generate", str(trained / "twist"), "--prompt", "To be", "--max-new-tokens", "5",
                 "--temperature", "1e-45"]) == 0
    tiny = capsys.readouterr().out
    assert main(["generate", str(trained / "twist"), "--prompt", "To be", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == tiny  # underflow is greedy decoding, not a crash


def test_bench_checks_its_options(tmp_path, capsys):
    assert main(["bench", "step", "--keeps", "0"]) == 2
    one_line(capsys, "--keeps entry 0 is out of range for --shape gpt2")
    assert main(["bench", "bytes", "--json", str(tmp_path)]) == 2
    one_line(capsys, "is an existing folder; it takes a file path")
    from twist_fl.tools.bench import _step_keeps, build_parser

    assert _step_keeps(build_parser(), "", "default") == (2, 4, 6)  # its own default keeps fit its 8 blocks


# --- one seed counts once; tables never overwritten without --force --------------------------------


def test_a_table_over_two_roots_counts_each_seed_once_and_keeps_what_exists(trained, tmp_path, capsys, caplog):
    root = tmp_path / "runs"
    shutil.copytree(trained, root / "a")
    assert main(["tune", "table", str(root / "a"), str(root / "a"), "--out", str(tmp_path / "t"), "--draws", "1",
                 "--test-tokens", "256"]) == 0
    res = json.loads((tmp_path / "t" / "tuning.json").read_text())
    assert all(len(r["seeds"]) == len(set(r["seeds"])) == 1 for r in res["tuned"])
    assert "it is counted once" in caplog.text
    before = snapshot(tmp_path / "t")
    assert main(["tune", "table", str(root / "a"), "--out", str(tmp_path / "t")]) == 2
    one_line(capsys, "already exists; pass --force")
    assert snapshot(tmp_path / "t") == before
    assert main(["tune", "finetune-table", str(root / "a"), "--out", str(tmp_path / "f")]) == 2
    one_line(capsys, "has no plan.json")


def test_tune_run_refuses_a_folder_of_another_setting(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"runs": [{"command": "twist-fl tune run --out t", "run_config": {},
                                                         "nodes": 4, "capacities": None}]}))
    before = snapshot(out)
    assert main(["tune", "run", "--out", str(out), "--methods", "twist", "--run-config", "model='tiny'"]) == 2
    one_line(capsys, "holds the jobs of another setting")
    assert snapshot(out) == before


def test_the_sweep_keys_are_normalized_and_hydra_options_left_alone():
    from twist_fl.tools.sweep import normalize_overrides

    assert normalize_overrides(["--multirun", "run.local-steps=1,5", "+run.full-nodes=1", "num-supernodes=2",
                                "hydra.run.dir=a-b", "run.init_from=/x/a-b"]) == \
        ["--multirun", "run.local_steps=1,5", "+run.full_nodes=1", "num_supernodes=2", "hydra.run.dir=a-b",
         "run.init_from=/x/a-b"]


def test_lock_records_say_nothing_of_a_clean_release(tmp_path):
    lock = HolderLock(tmp_path / "l", "x").acquire()
    rec = json.loads((tmp_path / "l").read_text())
    assert rec["pid"] == os.getpid() and rec["host"] and rec["started"] and time.strftime("%Y") in rec["started"]
    lock.release()
    assert (tmp_path / "l").read_text() == ""
    assert ROOT.is_dir()

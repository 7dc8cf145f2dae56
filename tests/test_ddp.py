"""`twist-fl ddp`: DDP on torch.distributed (gloo, real worker processes) against one process
at N x batch, its run folder, its refusals, and a worker killed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from twist_fl.baselines.ddp import ddp_run_config, parse_overrides, run_ddp
from twist_fl.core.data import random_batches
from twist_fl.core.model import GPT, initial_model
from twist_fl.core.node import node_tokens
from twist_fl.core.rng import Stream, generator
from twist_fl.core.train import OptimConfig, make_optimizer, train_steps
from twist_fl.deploy.procs import alive, cmdline, tree_pids
from twist_fl.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "tiny", "seq-len": 32, "batch-size": 4, "local-steps": 3, "num-server-rounds": 2, "eval-every": 1,
        "eval-tokens": 1024, "eval-draws": 1, "lr": 0.003}


def tiny_run(tmp_path, name="run", **changes):
    return ddp_run_config({**TINY, "out-dir": str(tmp_path), "run-name": name, **changes})


@pytest.fixture(scope="module")
def ddp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run = tiny_run(root)
    return run, run_ddp(run, 2, threads=1)


def one_process_at_n_times_batch(run, n):
    """What DDP over n workers computes: one model, each step on the n workers' batches side by side."""
    model = initial_model(run)
    opt = make_optimizer(model, OptimConfig(lr=run.lr, weight_decay=run.weight_decay, grad_clip=run.grad_clip))
    toks = [node_tokens(run, n, i) for i in range(n)]
    for rnd in range(1, run.num_server_rounds + 1):
        for g in opt.param_groups:
            g["lr"] = run.lr_at(rnd)
        streams = [random_batches(toks[i], run.batch_size, run.seq_len,
                                  generator(run.seed, Stream.NODE_BATCHES, i, rnd)) for i in range(n)]
        joined = (tuple(np.concatenate(parts) for parts in zip(*(next(s) for s in streams), strict=True))
                  for _ in iter(int, 1))
        train_steps(model, joined, run.local_steps, opt, grad_clip=run.grad_clip)
    return model


def test_n_workers_equal_one_process_at_n_times_batch(ddp2):
    run, summary = ddp2
    ddp_model = GPT.load(Path(summary["run_folder"]) / "model")
    reference = one_process_at_n_times_batch(run, 2)
    start = initial_model(run)

    moved = max((reference.state_dict()[k] - start.state_dict()[k]).abs().max().item() for k in start.state_dict())
    assert moved > 1e-3  # six AdamW steps changed the weights, so the comparison below means something
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(ddp_model.state_dict()[k], v, atol=2e-5, rtol=1e-4, msg=k)


def test_run_folder_is_a_twist_fl_run(ddp2, capsys):
    run, summary = ddp2
    folder = Path(summary["run_folder"])
    cfg = json.loads((folder / "config.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    params = GPT.load(folder / "model").num_params()

    assert cfg["run"]["strategy"] == "ddp" and summary["strategy"] == "ddp"
    assert summary["keep"] == summary["n_blocks"] == 4  # every worker trains every block
    assert [r["round"] for r in rows] == [1, 2] and all("valid" in r for r in rows)
    # every step all-reduces each worker's whole gradient, float32, once
    assert summary["ddp"]["grad_bytes_per_step"] == 4 * params
    assert rows[0]["bytes_up_per_node"] == 4 * params * run.local_steps
    assert summary["ddp"]["ring_bytes_sent_per_step"] == pytest.approx(4 * params)  # 2 (n-1)/n = 1 for n = 2
    assert len(summary["ddp"]["step_s_median_per_worker"]) == 2 and summary["ddp"]["step_s_median"] > 0
    assert summary["final"]["full"]["ppl"] == rows[-1]["valid"]["full"]["ppl"]
    assert (folder / "rounds.png").is_file() and (folder / "keeps.png").is_file()

    assert main(["evaluate", str(folder), "--eval-tokens", "1024"]) == 0
    line = capsys.readouterr().out
    assert f"perplexity {summary['final']['full']['ppl']:.3f} on valid" in line


def test_heatmap_reads_a_ddp_run_as_dense(ddp2, tmp_path):
    _, summary = ddp2
    assert main(["heatmap", summary["run_folder"], "--keeps", "2,4", "--draws", "1", "--eval-tokens", "512",
                 "--out", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "heatmap.json").read_text())[0]["trained_keep"] == 4


@pytest.mark.parametrize(("argv", "expected"), [
    (["--nproc", "0"], "argument --nproc: '0' is not allowed; allowed: 1 or more"),
    (["--nproc", "35", "--run-config", 'partitioning="document"'], "--nproc 35 is more workers than"),
    (["--run-config", "keep=2"], "keep=2 has no meaning for DDP"),
    (["--run-config", "resume-from='x'"], "resume-from='x' has no meaning for DDP"),
    (["--run-config", "lr=-1"], "lr=-1.0 must be a positive finite number"),
    (["--threads", "-1"], "--threads=-1"),
    (["--backend", "nccl"], "--backend nccl needs one GPU per worker"),
])
def test_refused_before_anything_starts(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    run_config = f"out-dir='{out}' model='tiny' seq-len=32"
    if "--run-config" in argv:
        i = argv.index("--run-config") + 1
        argv = [*argv[:i], f"{argv[i]} {run_config}", *argv[i + 1:]]
    else:
        argv = [*argv, "--run-config", run_config]

    assert main(["ddp", "--app", str(ROOT), *argv]) == 2

    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not out.exists()


def test_overrides_parse_like_flwr_run():
    assert parse_overrides("lr=0.002 eval-keeps='2,4' mode=\"true\" run-name=abc") == {
        "lr": 0.002, "eval-keeps": "2,4", "mode": "true", "run-name": "abc"}
    with pytest.raises(ValueError, match="'lr' is not key=value"):
        parse_overrides("lr")


def test_a_dead_worker_fails_the_run_and_leaves_nothing_behind(tmp_path):
    rc = f"out-dir='{tmp_path}' run-name='r' model='tiny' seq-len=32 batch-size=4 num-server-rounds=400 eval-every=400"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "twist_fl", "ddp", "--app", str(ROOT), "--nproc", "2",
                                 "--threads", "1", "--run-config", rc], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "r" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
            assert launcher.poll() is None, launcher.communicate()
            time.sleep(0.2)
        family = [p for p in tree_pids(launcher.pid) if p != launcher.pid]
        workers = [p for p in family if "spawn_main" in cmdline(p) and "resource_tracker" not in cmdline(p)]
        assert len(workers) == 2, [cmdline(p) for p in family]

        os.kill(workers[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()

    assert launcher.returncode == 1
    assert "DDP worker" in err and "died (signal SIGKILL)" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "model").exists()
    deadline = time.monotonic() + 10  # the resource tracker ends once the launcher's pipe to it closes
    while [p for p in family if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [cmdline(p) for p in family if alive(p)]


def test_latency_benchmark_runs_each_mode_on_real_workers():
    from twist_fl.core.config import preset
    from twist_fl.tools.bench_ddp import reply_bytes, run_mode

    cfg = preset("tiny", vocab_size=257)
    res = {m: run_mode(cfg, m, 2, 1, 2, 1, 4, 32, 2 if m == "twist" else 4) for m in ("twist", "fedavg", "ddp")}
    full = res["fedavg"]["params"][0]

    assert res["ddp"]["grad_bytes_per_step"] == 4 * full  # one all-reduce of every float32 gradient per step
    assert res["fedavg"]["grad_bytes_per_step"] == res["twist"]["grad_bytes_per_step"] == 0  # no exchange in a round
    assert all(p < full for p in res["twist"]["params"]) and res["ddp"]["params"] == [full, full]
    assert all(r["step_s"] > 0 and len(r["step_s_per_worker"]) == 2 for r in res.values())
    assert 4 * full < reply_bytes(cfg, 4, 2) < 4 * full * 1.2  # a dense reply: the tensors and their framing
    assert reply_bytes(cfg, 2, 2) < reply_bytes(cfg, 4, 2)

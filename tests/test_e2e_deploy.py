"""Deployment on real processes: a SuperLink and SuperNodes on free loopback ports, with TLS and
registered node keys, each test with its own FLWR_HOME and every process stopped at the end.

Flower starts a fresh `flwr-clientapp` process per message, so a round takes ~10-15 s here even
on the tiny model; the runs are kept to the rounds each scenario needs.
"""

from __future__ import annotations

import os
import re
import signal
import time

import numpy as np
import pytest
import torch

from twist_fl.core.blocks import coverage_average, slice_state
from twist_fl.core.blueprint import Blueprint
from twist_fl.core.config import RunConfig
from twist_fl.core.model import initial_model
from twist_fl.deploy.certs import make_certificates
from twist_fl.deploy.local import LocalDeployment
from twist_fl.federated.client import make_client_app
from twist_fl.federated.localgrid import LocalGrid
from twist_fl.federated.server import run_server

from .deployment import FAULTY, ROOT, by_partition, rows, run_config, start, stop_and_check
from .helpers import checkpoint_weights, final_weights

pytestmark = pytest.mark.slow


@pytest.fixture
def deployment(tmp_path):
    d = start(tmp_path)
    try:
        yield d
    finally:
        stop_and_check(d)


def coverage_mask(weights: dict[str, np.ndarray], cfg, blueprints: list[Blueprint]) -> dict[str, np.ndarray]:
    """1 where at least one of `blueprints` holds an entry, 0 elsewhere."""
    zeros = {k: np.zeros_like(v) for k, v in weights.items()}
    ones = {k: np.ones_like(v) for k, v in weights.items()}
    return coverage_average(zeros, cfg, [(bp, slice_state(ones, cfg, bp), 1.0) for bp in blueprints])


def assert_only_covered_entries_changed(before, after, cfg, live: list[Blueprint]) -> None:
    """Entries no live node held keep their values bit for bit; the live nodes' entries moved."""
    mask = coverage_mask(before, cfg, live)
    moved = 0
    for k in before:
        kept = mask[k] == 0
        assert np.array_equal(after[k][kept], before[k][kept]), k
        moved += int(np.sum(after[k][~kept] != before[k][~kept]))
    assert moved > 0


def initial_weights(rc: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in initial_model(RunConfig.from_flat(rc)).state_dict().items()}


# --- 1, 2: TLS, registered nodes; unregistered key and wrong CA refused -------------------------

@pytest.fixture(scope="class")
def secure_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    d = start(tmp)
    try:
        good = d.start_nodes(2)
        unregistered = d.start_node("unregistered", {"partition-id": 0, "num-partitions": 2},
                                    key=d.node_key("unregistered", register=False))
        other_ca = make_certificates(tmp / "other-ca")["ca"]
        wrong_ca = d.start_node("wrong-ca", {"partition-id": 1, "num-partitions": 2}, root_certificates=other_ca)
        deadline = time.monotonic() + 90
        while (unregistered.alive() or wrong_ca.alive()) and time.monotonic() < deadline:
            time.sleep(0.5)
        d.wait_online(2)
        online = d.online_nodes()
        rc = run_config(tmp, "secure", num_server_rounds=2, eval_every=1)
        res = d.run(ROOT, rc, timeout=600)
        yield {"d": d, "res": res, "run_dir": tmp / "out" / "secure", "good": good, "online": online,
               "unregistered": unregistered, "wrong_ca": wrong_ca}
    finally:
        stop_and_check(d)


class TestSecureDeployment:
    """One deployment for both (its fixture ends with the class)."""

    def test_happy_path_over_tls_with_registered_nodes(self, secure_run):
        d, res, run_dir = secure_run["d"], secure_run["res"], secure_run["run_dir"]

        assert res.ok, (res.status, res.details, res.output[-3000:])
        superlink_cmd = d.superlink.log_text().splitlines()[0]
        for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                     "--disable-runtime-dependency-installation"):
            assert flag in superlink_cmd
        assert "--insecure" not in superlink_cmd
        r = rows(run_dir)
        assert [x["round"] for x in r] == [1, 2] and all(x["updated"] and not x["rejected"] for x in r)
        assert all(sorted(by_partition(x)) == [0, 1] for x in r)
        assert r[-1]["valid"]["full"]["ppl"] < 257
        for f in ("model/model.safetensors", "model/config.json", "summary.json", "rounds.png", "config.json"):
            assert (run_dir / f).is_file(), f
        assert "round 2: 2 valid, 0 rejected replies" in res.output

    def test_unregistered_key_and_wrong_ca_are_refused_and_the_run_completes(self, secure_run):
        unregistered, wrong_ca, res = secure_run["unregistered"], secure_run["wrong_ca"], secure_run["res"]

        assert unregistered.popen.returncode not in (None, 0)
        assert "Failed to activate SuperNode" in unregistered.log_text()
        assert wrong_ca.popen.returncode not in (None, 0)
        assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.log_text()
        assert len(secure_run["online"]) == 2  # only the registered nodes with the right CA
        assert res.ok and all(len(x["nodes"]) == 2 for x in rows(secure_run["run_dir"]))


# --- 3: a SuperNode killed mid-round ------------------------------------------------------------

def test_supernode_killed_mid_round(deployment, tmp_path):
    d = deployment
    for p in (0, 1):
        d.start_node(str(p), {"partition-id": p, "num-partitions": 3, "num-threads": 1})
    # the victim is surely mid-round when killed: its ClientApp sleeps in round 1
    victim = d.start_node("victim", {"partition-id": 2, "num-partitions": 3, "num-threads": 1,
                                     "twist-fault": "1:hang", "twist-hang-s": 600}, env=FAULTY)
    d.wait_online(3)
    # keep 1 of 4 with 3 nodes: each node holds blocks nobody else holds, and one block has no holder
    rc = run_config(tmp_path, "kill", num_server_rounds=2, keep=1, min_nodes=2, round_timeout=150)
    killed = {}

    def kill_when_training(line: str) -> bool:
        if "round 1: 3 nodes" in line and not killed:
            deadline = time.monotonic() + 60
            while not victim.children("flwr-clientapp") and time.monotonic() < deadline:
                time.sleep(0.2)
            killed["clientapp"] = bool(victim.children("flwr-clientapp"))
            os.killpg(victim.pid, signal.SIGKILL)
            killed["at"] = time.monotonic()
        return False

    res = d.run(ROOT, rc, timeout=600, on_line=kill_when_training)

    assert killed.get("clientapp"), "the victim never started training"
    assert res.ok, (res.status, res.details, res.output[-3000:])
    run_dir = tmp_path / "out" / "kill"
    r1, r2 = rows(run_dir)
    nodes1 = by_partition(r1)
    assert nodes1[2]["status"] == "rejected" and [n["status"] for p, n in nodes1.items() if p != 2] == ["ok", "ok"]
    reason = next(x["reason"] for x in r1["rejected"] if x["partition_id"] == 2)
    assert "error reply (code 5)" in reason  # NODE_UNAVAILABLE, from the SuperLink's heartbeat check
    assert r1["updated"] and sorted(by_partition(r2)) == [0, 1]  # later rounds: live nodes only
    assert all(n["status"] == "ok" for n in r2["nodes"])
    cfg = RunConfig.from_flat(rc).model_config()
    live = [Blueprint.from_dict(nodes1[p]["blueprint"]) for p in (0, 1)]
    assert_only_covered_entries_changed(initial_weights(rc), checkpoint_weights(run_dir, 1), cfg, live)


# --- 4: a ClientApp that raises, one that hangs past the round timeout --------------------------

def test_raising_and_hanging_clientapps_are_handled_alike(deployment, tmp_path):
    d = deployment
    d.start_node("0", {"partition-id": 0, "num-partitions": 3, "num-threads": 1})
    d.start_node("1", {"partition-id": 1, "num-partitions": 3, "num-threads": 1, "twist-fault": "1:raise"}, env=FAULTY)
    d.start_node("2", {"partition-id": 2, "num-partitions": 3, "num-threads": 1, "twist-fault": "1:hang",
                       "twist-hang-s": 75}, env=FAULTY)
    d.wait_online(3)
    # A round timeout with room for a loaded machine (the healthy node must answer within it);
    # the hang outlasts it by 15 s.
    rc = run_config(tmp_path, "hang", num_server_rounds=2, keep=1, min_nodes=3, round_timeout=60)

    res = d.run(ROOT, rc, timeout=600)

    assert res.ok, (res.status, res.details, res.output[-3000:])
    run_dir = tmp_path / "out" / "hang"
    r1, r2 = rows(run_dir)
    reasons = {x["partition_id"]: x["reason"] for x in r1["rejected"]}
    assert "injected ClientApp failure" in reasons[1] and "error reply (code 2)" in reasons[1]
    # The train message expires with the round timeout: the SuperLink answers for the hanging node
    # (MESSAGE_UNAVAILABLE, code 3), or the round times out first; either way it is recorded.
    assert reasons[2] == "no reply before the round timeout" or reasons[2].startswith("error reply (code 3)")
    assert [by_partition(r1)[p]["status"] for p in (0, 1)] == ["ok", "rejected"]
    assert by_partition(r1)[2]["status"] in ("rejected", "no reply")
    cfg = RunConfig.from_flat(rc).model_config()
    live = [Blueprint.from_dict(by_partition(r1)[0]["blueprint"])]
    assert_only_covered_entries_changed(initial_weights(rc), checkpoint_weights(run_dir, 1), cfg, live)
    # The hanging node's round-1 reply comes ~15 s into round 2: the SuperLink refuses it (its
    # message has expired), so it never reaches the strategy, let alone round 2's average. The
    # SuperLink logs each refusal; the SuperNode logs "Failed to push reply message" only in
    # some timings.
    assert "Message TTL has expired" in d.superlink.log_text()
    assert len(r2["nodes"]) == 3 and r2["updated"]
    assert not any("unknown message" in x["reason"] or "stale" in x["reason"] for x in r2["rejected"])
    assert all(x["partition_id"] == 2 for x in r2["rejected"])  # only the late node may miss round 2


# --- 5: malformed replies: every kind, with its reason, in the chaos soak (test_e2e_chaos.py) ----


# --- 6: every node fails in a round ------------------------------------------------------------

def test_rounds_where_every_node_fails_keep_the_model_then_stop_the_run(deployment, tmp_path):
    d = deployment
    for p in (0, 1):
        d.start_node(str(p), {"partition-id": p, "num-partitions": 2, "num-threads": 1,
                              "twist-fault": "2:raise,3:raise"}, env=FAULTY)
    d.wait_online(2)
    rc = run_config(tmp_path, "allfail", num_server_rounds=4, max_failed_rounds=2)

    res = d.run(ROOT, rc, timeout=600)

    assert res.status == "finished:failed" and not res.ok
    assert "stopping: 2 consecutive rounds without a valid reply (max-failed-rounds=2)" in res.details
    run_dir = tmp_path / "out" / "allfail"
    r = rows(run_dir)
    # round 2 failed and the run went on; round 3 failed too, was recorded with its reason, and stopped it
    assert [(x["round"], x["updated"]) for x in r] == [(1, True), (2, False), (3, False)]
    assert all("every reply was rejected" in x["failed"] for x in r[1:])
    w2, w3 = checkpoint_weights(run_dir, 2), checkpoint_weights(run_dir, 3)  # (the last two are kept)
    assert all(np.array_equal(w2[k], w3[k]) for k in w2)
    assert not (run_dir / "model").exists()


# --- 7: the ServerApp killed mid-run, resumed ----------------------------------------------------

def test_killed_serverapp_resumes_to_the_uninterrupted_weights(deployment, tmp_path):
    # optimizer-state = "keep" (the default): the nodes find their AdamW moments in twist-state-dir
    d = deployment
    d.start_nodes(2)
    d.wait_online(2)
    rc = run_config(tmp_path, "resume", num_server_rounds=3, min_nodes=2)
    killed = []

    def kill_after_round_1(line: str) -> bool:
        if "[ROUND 2/3]" in line:  # round 1's checkpoint is written before this line
            killed.extend(d.serverapp_pids())
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            return True
        return False

    first = d.run(ROOT, rc, timeout=600, on_line=kill_after_round_1)
    assert killed, first.output[-3000:]
    run_dir = tmp_path / "out" / "resume"
    assert [x["round"] for x in rows(run_dir)] == [1]
    # A checkpoint being written when the process died, and a corrupt one LATEST points to:
    ckpts = run_dir / "checkpoints"
    (ckpts / ".tmp-round-00002-999").mkdir()
    (ckpts / ".tmp-round-00002-999" / "weights.safetensors").write_bytes(b"\0" * 100)
    (ckpts / "round-00002").mkdir()
    (ckpts / "round-00002" / "weights.safetensors").write_bytes(b"partial")
    (ckpts / "round-00002" / "state.json").write_text('{"round": 2, "weights_sha256": "0"}')
    (ckpts / "LATEST").write_text("round-00002\n")

    second = d.run(ROOT, {**rc, "resume-from": str(run_dir)}, timeout=600)

    assert second.ok, (second.status, second.details, second.output[-3000:])
    assert "from round 1" in second.output
    # resumed at once, while the nodes were still busy with the dead run: the rounds waited for them
    assert [(x["round"], x["updated"], len(x["nodes"])) for x in rows(run_dir)] == [(1, True, 2), (2, True, 2),
                                                                                    (3, True, 2)]
    # The same run without interruption, in this process: nodes with one thread, as above.
    threads = torch.get_num_threads()
    try:
        flat = {**rc, "run-name": "reference"}
        grid = LocalGrid(make_client_app(flat), 2, node_configs=[{"num-threads": 1}] * 2)
        run_server(grid, RunConfig.from_flat(flat))
    finally:
        torch.set_num_threads(threads)
    resumed, reference = final_weights(run_dir), final_weights(tmp_path / "out" / "reference")
    assert sorted(resumed) == sorted(reference)
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)


# --- 8, 9: too few nodes, bad configuration -------------------------------------------------------

def test_too_few_nodes_fail_after_a_bounded_wait(deployment, tmp_path):
    d = deployment
    d.start_nodes(1)
    d.wait_online(1)
    t = time.monotonic()

    res = d.run(ROOT, run_config(tmp_path, "few", min_nodes=2, node_wait_timeout=5), timeout=300)

    assert res.status == "finished:failed"
    # the one node is ready once it has answered the node-info query (a ClientApp process starts for
    # it: on a loaded machine that may take longer than the 5 s wait)
    assert re.search(r"round 1: only [01] node\(s\) ready after waiting 5 s \(node-wait-timeout\); the run needs "
                     r"min-nodes=2\. Connected: 1", res.details), res.details
    assert time.monotonic() - t < 120


@pytest.mark.parametrize("override, message", [  # every other key's check: tests/test_config.py
    ({"keep": 9}, "run-config keep=9 is out of range for model 'tiny': allowed 1..4"),
    ({"dataset": "text", "data-path": "/nonexistent/corpus"}, "/nonexistent/corpus"),
])
def test_bad_configuration_is_refused_before_round_1(deployment, tmp_path, override, message):
    res = deployment.run(ROOT, {**run_config(tmp_path, "bad"), **override}, timeout=300)

    assert res.status == "finished:failed"
    assert message in res.details, res.details
    assert "[ROUND 1" not in res.output and not (tmp_path / "out" / "bad" / "metrics.jsonl").exists()


def test_insecure_mode_only_when_asked_and_with_a_warning(tmp_path, caplog):
    d = LocalDeployment(tmp_path / "deploy", secure=False)
    try:
        d.start_superlink()
        d.start_nodes(1)
        d.wait_online(1)
        cmd = d.superlink.log_text().splitlines()[0]
        config = (d.home / "config.toml").read_text()
    finally:
        stop_and_check(d)

    assert "INSECURE deployment: no TLS and no SuperNode authentication" in caplog.text
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert "insecure = true" in config and not (tmp_path / "deploy" / "certs").exists()

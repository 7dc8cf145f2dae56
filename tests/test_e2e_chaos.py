"""A chaos soak on real localhost processes (TLS and registered node keys, as the other deployment
tests): over 8 short rounds, seeded faults of every kind — ClientApps that raise, hang past the
round timeout, or send each kind of malformed reply — a SuperNode killed mid-round and a new one
started for its partition, and the ServerApp killed once and resumed with `resume-from`.

It asserts that the run completes, every injected fault is recorded in metrics.jsonl with its
reason, no tensor is non-finite, and no file of the run folder is lost or corrupt. Bounded:
the round timeout caps every hang and every dead node. Flower starts a fresh ClientApp process
for every message, so a round of three nodes takes about 20 s on an idle 2-core machine and
much longer on a loaded one; the round timeout (90 s) allows for that.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import numpy as np
import pytest

from twist_fl.core.checkpoint import load_checkpoint
from twist_fl.core.model import GPT
from twist_fl.federated.faults import FAULTS

from .deployment import FAULTY, REASONS, ROOT, run_config, start, stop_and_check

pytestmark = pytest.mark.slow

SEED = 20261203
ROUNDS = 8
NODE_KILLED = (2, 3)  # partition 2's SuperNode is killed while it trains round 3
SERVER_KILLED_AFTER = 5  # the ServerApp is killed once round 5's checkpoint is written
ROUND_TIMEOUT = 90  # holds on a loaded 2-core machine (a ClientApp process starts for every message)
HANG_S = 100  # longer than the round timeout
REASONS = {**REASONS, "hang": ("no reply before the round timeout", "error reply (code 3)")}


def fault_schedule(seed: int) -> dict[tuple[int, int], str]:
    """{(round, partition): fault}: every kind once, on partitions 1 and 2 (0 stays honest), drawn
    from `seed`. No fault where the killed node cannot answer (its kill round and the next), and
    none for a node in the round after it hangs (it may still be busy)."""
    rng = random.Random(seed)
    slots = [(r, p) for r in range(1, ROUNDS + 1) for p in (1, 2)
             if not (p == NODE_KILLED[0] and r in (NODE_KILLED[1], NODE_KILLED[1] + 1))]
    kinds = ["hang", *[k for k in FAULTS if k != "hang"]]
    schedule: dict[tuple[int, int], str] = {}
    for kind in kinds:
        slot = rng.choice(slots)
        schedule[slot] = kind
        slots = [s for s in slots if s != slot and not (kind == "hang" and s == (slot[0] + 1, slot[1]))]
    return schedule


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU ticks a process has used (None once it is gone)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def test_fault_schedule_covers_every_kind_and_is_seeded():
    s = fault_schedule(SEED)

    assert sorted(s.values()) == sorted(FAULTS) and s == fault_schedule(SEED) and s != fault_schedule(SEED + 1)
    assert all(p in (1, 2) and 1 <= r <= ROUNDS for r, p in s)
    assert not any(p == NODE_KILLED[0] and r in (NODE_KILLED[1], NODE_KILLED[1] + 1) for r, p in s)


DEAD_RUN_WAIT = 300  # the SuperLink marks a run whose ServerApp died failed after ~60 s without a heartbeat;
# the nodes then drop its messages. Five times that holds on a loaded 2-core machine.
BUSY_SHARE = 0.1  # a ClientApp "works" while it uses more than this share of a core. One that imports torch
# or trains uses most of a core; an idle one left behind (its threads poll the SuperNode and its parent)
# still gains a tick every few seconds: 0.1-0.3% of a core, measured on an Intel Xeon with AMX.


def test_chaos_soak(tmp_path):
    schedule = fault_schedule(SEED)
    spec = {p: ",".join(f"{r}:{k}" for (r, q), k in sorted(schedule.items()) if q == p) for p in (0, 1, 2)}
    d = start(tmp_path)
    try:
        def node_config(p: int) -> dict:
            return {"partition-id": p, "num-partitions": 3, "num-threads": 1, "twist-hang-s": HANG_S,
                    "twist-state-dir": str(tmp_path / "node-state" / str(p)),
                    **({"twist-fault": spec[p]} if spec[p] else {})}

        victim = None
        for p in (0, 1, 2):
            proc = d.start_node(str(p), node_config(p), env=FAULTY)
            victim = proc if p == NODE_KILLED[0] else victim
        d.wait_online(3)
        rc = run_config(tmp_path, "chaos", num_server_rounds=ROUNDS, keep=2, min_nodes=2, eval_every=4,
                        round_timeout=ROUND_TIMEOUT)
        events: dict[str, object] = {}

        def chaos(line: str) -> bool:
            if f"round {NODE_KILLED[1]}: " in line and " nodes, keep" in line and "node_killed" not in events:
                deadline = time.monotonic() + 30
                while not victim.children("flwr-clientapp") and time.monotonic() < deadline:
                    time.sleep(0.2)
                events["node_killed"] = bool(victim.children("flwr-clientapp"))
                os.killpg(victim.pid, signal.SIGKILL)
                d.start_node("2-restarted", node_config(NODE_KILLED[0]), env=FAULTY)  # a new node, the same share
            if f"[ROUND {SERVER_KILLED_AFTER + 1}/{ROUNDS}]" in line:  # round 8's checkpoint is on disk
                events["serverapp"] = d.serverapp_pids()
                for pid in events["serverapp"]:
                    os.kill(pid, signal.SIGKILL)
                return True
            return False

        t0 = time.monotonic()
        first = d.run(ROOT, rc, timeout=600, on_line=chaos)
        assert events.get("node_killed") and events.get("serverapp"), first.output[-3000:]
        run_dir = tmp_path / "out" / "chaos"
        assert first.run_id, first.output[-3000:]

        def dead_run_over() -> tuple[bool, str]:
            """The operator resumes once the SuperLink has finished the dead run (`flwr ls`) and no
            node's ClientApp works on it any more. (A SuperNode may leave an idle `flwr-clientapp`
            behind: it starts one for a message of the dead run, then ignores the message because
            the run is no longer RUNNING. Such a process waits, using next to no CPU.)"""
            status, _ = d.run_status(first.run_id)
            apps = {name: n.children("flwr-clientapp") for name, n in d.nodes.items() if n.alive()}
            before = {pid: cpu_ticks(pid) for pids in apps.values() for pid in pids}
            window = 3.0
            time.sleep(window)
            budget = BUSY_SHARE * window * os.sysconf("SC_CLK_TCK")
            after = {pid: cpu_ticks(pid) for pid in before}
            used = {pid: 0 if None in (before[pid], after[pid]) else after[pid] - before[pid] for pid in before}
            busy = [name for name, pids in apps.items() if any(used[pid] > budget for pid in pids)]
            return status.startswith("finished") and not busy, f"status {status!r}, ClientApps working on {busy}"

        deadline = time.monotonic() + DEAD_RUN_WAIT
        over, why = dead_run_over()
        while not over and time.monotonic() < deadline:
            time.sleep(1.0)
            over, why = dead_run_over()
        assert over, f"the dead run was not over after {DEAD_RUN_WAIT} s: {why}"
        second = d.run(ROOT, {**rc, "resume-from": str(run_dir)}, timeout=600)
        elapsed = time.monotonic() - t0
    finally:
        stop_and_check(d)

    assert second.ok, (second.status, second.details, second.output[-3000:])
    assert f"from round {SERVER_KILLED_AFTER}" in second.output
    # Every file of the run folder is there and whole.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert config["run"]["num-server-rounds"] == ROUNDS and summary["rounds"] == ROUNDS
    model = GPT.load(run_dir / "model")  # refuses non-finite weights
    rnd, weights, _ = load_checkpoint(run_dir)
    assert rnd == ROUNDS and all(np.isfinite(w).all() for w in weights.values())
    assert all(np.isfinite(v.numpy()).all() for v in model.state_dict().values())
    assert all((run_dir / f).is_file() for f in ("rounds.png", "keeps.png"))
    # Every injected fault is recorded in its round, with its reason.
    for (r, p), kind in sorted(schedule.items()):
        row = rows[r - 1]
        reasons = [x["reason"] for x in row["rejected"] if x["partition_id"] == p]
        want = REASONS[kind] if isinstance(REASONS[kind], tuple) else (REASONS[kind],)
        assert any(w in reason for w in want for reason in reasons), (r, p, kind, row["rejected"])
    # The killed node's round is recorded, its partition trains again later, and the honest node
    # took part in every round.
    killed_round = rows[NODE_KILLED[1] - 1]
    assert any(x["partition_id"] == NODE_KILLED[0] for x in killed_round["rejected"])
    assert any(n["partition_id"] == NODE_KILLED[0] and n["status"] == "ok"
               for row in rows[NODE_KILLED[1]:] for n in row["nodes"])
    assert all(any(n["partition_id"] == 0 and n["status"] == "ok" for n in row["nodes"]) for row in rows)
    assert all(row["updated"] for row in rows)
    print(f"chaos soak: {ROUNDS} rounds, {len(schedule)} injected faults, a node and the ServerApp killed, "
          f"{elapsed:.0f} s")

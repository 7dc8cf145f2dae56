"""What the deployment tests share: a SuperLink with TLS and node auth on free loopback ports, a
tiny run config, the run folder's rows, and a stop that checks no process is left."""

from __future__ import annotations

import json
from pathlib import Path

from twist_fl.deploy.local import LocalDeployment
from twist_fl.deploy.procs import alive

ROOT = Path(__file__).resolve().parents[1]
FAULTY = {"TWIST_FL_ENABLE_FAULTS": "1"}  # a node process that may inject the faults its node config names
TINY_RUN = {"model": "tiny", "local-steps": 2, "seq-len": 32, "batch-size": 4, "eval-every": 100,
            "eval-tokens": 512, "eval-draws": 1, "lr-schedule": "constant"}
# What the server records for each injected fault (`twist_fl.federated.faults`).
REASONS = {"nan": "contains NaN or Inf", "inf": "contains NaN or Inf", "shape": "shape (",
           "dtype": "dtype float64, expected float32", "missing-key": "array keys differ: missing",
           "extra-key": "unexpected ['h.0.attn.extra.weight']", "stale-round": "stale reply: round",
           "nonce": "wrong nonce", "norm": "update norm", "num-examples": "num-examples=1000000000000",
           "raise": "injected ClientApp failure"}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_partition(row: dict) -> dict[int, dict]:
    return {n["partition_id"]: n for n in row["nodes"]}


def run_config(tmp: Path, name: str, **kw) -> dict:
    return {**TINY_RUN, "out-dir": str(tmp / "out"), "run-name": name,
            **{k.replace("_", "-"): v for k, v in kw.items()}}


def start(tmp: Path) -> LocalDeployment:
    d = LocalDeployment(tmp / "deploy")
    d.start_superlink()
    return d


def stop_and_check(d: LocalDeployment) -> None:
    """Stop everything and assert that no process of the deployment survives."""
    started = d.pids()
    d.stop()
    left = [pid for pid in started if alive(pid)]
    assert left == [], f"processes left after stop: {left}"

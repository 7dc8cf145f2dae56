"""The real `flwr run` simulation (Ray, a local SuperLink) on a tiny run: 20 SuperNodes, 4 sampled
per round, LEAF-style partitions, federated evaluation. The simulation SuperLink that `flwr run`
would start detached is started by the test, owned by PID and stopped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from twist_fl.deploy.local import SimulationSuperLink
from twist_fl.deploy.procs import alive, flwr_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_flwr_run_simulation_of_20_nodes_4_per_round_with_federated_evaluation(tmp_path):
    env = flwr_env(tmp_path / "flwr-home")
    out = tmp_path / "out"
    flwr = str(Path(sys.executable).with_name("flwr"))
    run_config = (f'model="tiny" num-server-rounds=2 local-steps=2 seq-len=32 batch-size=4 eval-every=1 '
                  f'eval-tokens=512 eval-draws=1 num-nodes=4 partitioning="character" fraction-evaluate=0.1 '
                  f'out-dir="{out}" run-name="e2e"')
    link = SimulationSuperLink(env, cwd=tmp_path)
    link.start()
    try:
        proc = subprocess.run([flwr, "run", str(ROOT), "--stream", "--run-config", run_config,
                               "--federation-config", "num-supernodes=20"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "Starting local SuperLink" not in log  # flwr run used ours
        run_dir = out / "e2e"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert [r["round"] for r in rows] == [1, 2] and all(r["updated"] for r in rows)
        assert all(len(r["nodes"]) == 4 and not r["rejected"] for r in rows)  # 4 of the 20 train each round
        assert all(r["fed_eval"]["nodes"] == 2 and not r["fed_eval"]["rejected"] for r in rows)  # 10% evaluate
        assert len(json.loads((run_dir / "config.json").read_text())["partitions"]["20"]) == 20
        assert summary["final"]["full"]["ppl"] < 257
        for f in ("model/model.safetensors", "model/config.json", "rounds.png", "keeps.png", "config.json"):
            assert (run_dir / f).is_file(), f
        assert "final validation perplexity" in log or "final validation perplexity" in \
            (tmp_path / "flwr-home" / "local-superlink" / "superlink.log").read_text()
    finally:
        started = link.pids()
        link.stop()
    assert started and [p for p in started if alive(p)] == []

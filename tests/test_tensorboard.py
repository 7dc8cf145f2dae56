"""run-config `tensorboard`: event files whose scalars, read back with TensorBoard's own reader,
are metrics.jsonl's; the federated run, its resume, and `twist-fl ddp` alike."""

from __future__ import annotations

import json

import pytest

from twist_fl.baselines.ddp import ddp_run_config, run_ddp
from twist_fl.core.config import RunConfig
from twist_fl.core.scalars import SUBFOLDER, scalars

from .helpers import TINY, run_local

pytest.importorskip("tensorboard")


def read_events(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / SUBFOLDER), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(run_dir, steps_per_round: int) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for tag, v in scalars(row).items():
            out.setdefault(tag, []).append((row["round"] * steps_per_round, v))
    return out


def assert_same(events, want):
    assert set(events) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 events


def test_federated_run_writes_the_rows_as_scalars(tmp_path):
    summary, _, run_dir = run_local(tmp_path, "tb", num_nodes=2, tensorboard=True, eval_every=1,
                                    num_server_rounds=3)
    events = read_events(run_dir)
    want = expected(run_dir, TINY["local-steps"])
    assert {"train/loss", "valid/ppl_full", "comm/bytes_down_per_node", "time/round_s",
            "nodes/rejected_replies"} <= set(want)
    assert any(t.startswith("valid/ppl_keep-") for t in want)
    assert_same(events, want)
    assert [s for s, _ in events["train/loss"]] == [2, 4, 6]  # optimizer steps per node
    assert summary["tensorboard_s"] >= 0


def test_off_by_default_writes_nothing(tmp_path):
    summary, _, run_dir = run_local(tmp_path, "plain", num_nodes=2)
    assert not (run_dir / SUBFOLDER).exists() and "tensorboard_s" not in summary


def test_a_resume_hides_the_steps_it_trains_again(tmp_path):
    """Rounds 1-3 logged, then the run resumed from its round-2 checkpoint: TensorBoard shows each
    step once, with the values of metrics.jsonl (the resumed run's)."""
    import shutil

    _, _, run_dir = run_local(tmp_path, "r", num_nodes=2, tensorboard=True, eval_every=1, num_server_rounds=3)
    shutil.rmtree(run_dir / "checkpoints" / "round-00003")
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "model")
    run_local(tmp_path, "r-again", num_nodes=2, tensorboard=True, eval_every=1, num_server_rounds=3,
              resume_from=str(run_dir), eval_tokens=256)  # round 3's validation differs from the first time
    events = read_events(run_dir)
    assert [s for s, _ in events["train/loss"]] == [2, 4, 6]
    assert_same(events, expected(run_dir, TINY["local-steps"]))


def test_ddp_writes_the_same_tags_on_the_same_axis(tmp_path):
    run = ddp_run_config({"model": "tiny", "seq-len": 32, "batch-size": 4, "local-steps": 3, "num-server-rounds": 2,
                          "eval-every": 1, "eval-tokens": 1024, "eval-draws": 1, "out-dir": str(tmp_path),
                          "run-name": "ddp", "tensorboard": True})
    summary = run_ddp(run, 2, threads=1)
    run_dir = tmp_path / "ddp"
    events = read_events(run_dir)
    assert_same(events, expected(run_dir, 3))
    assert [s for s, _ in events["train/loss"]] == [3, 6]
    assert summary["tensorboard_s"] >= 0


def test_refused_before_the_run_without_the_package(monkeypatch):
    import twist_fl.core.scalars as sc

    monkeypatch.setattr(sc, "available", lambda: False)
    with pytest.raises(ValueError, match=r"tensorboard=true needs the tensorboard package.*twist-fl\[tensorboard\]"):
        RunConfig.from_flat({"tensorboard": True})

import json

import numpy as np
import pytest

from twist_fl.core.checkpoint import load_checkpoint, rng_states, save_checkpoint

from .helpers import final_weights, run_local


def weights(v):
    return {"a": np.full((2, 3), v, dtype=np.float32), "b": np.arange(4, dtype=np.float32) * v}


def state(**kw):
    """What the ServerApp records beside the weights."""
    return {"rng": rng_states(), "config": {}, "strategy": {}, **kw}


def test_newest_complete_checkpoint_is_loaded(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, weights(r), state(note=r))

    rnd, w, st = load_checkpoint(tmp_path)

    assert rnd == 3 and st["note"] == 3 and np.array_equal(w["a"], weights(3)["a"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-00002", "round-00003"]


def test_interrupted_or_corrupt_checkpoint_is_never_loaded(tmp_path):
    save_checkpoint(tmp_path, 1, weights(1), state())
    save_checkpoint(tmp_path, 2, weights(2), state())
    ck = tmp_path / "checkpoints"
    # a write cut off before the rename: a temporary folder that is never a candidate
    (ck / ".tmp-round-00003-999").mkdir()
    (ck / ".tmp-round-00003-999" / "state.json").write_text('{"round": 3')
    # a newest checkpoint whose weights were damaged after it was written
    data = bytearray((ck / "round-00002" / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ck / "round-00002" / "weights.safetensors").write_bytes(bytes(data))

    rnd, w, _ = load_checkpoint(tmp_path)

    assert rnd == 1 and np.array_equal(w["b"], weights(1)["b"])


@pytest.mark.parametrize("damage", ["rng", "config", "rng.numpy"])
def test_a_checkpoint_whose_state_lacks_an_entry_is_skipped_like_a_corrupt_one(tmp_path, caplog, damage):
    save_checkpoint(tmp_path, 1, weights(1), state())
    save_checkpoint(tmp_path, 2, weights(2), state())
    path = tmp_path / "checkpoints" / "round-00002" / "state.json"
    st = json.loads(path.read_text())
    key, _, sub = damage.partition(".")
    del (st[key] if sub else st)[sub or key]
    path.write_text(json.dumps(st))

    rnd, _, _ = load_checkpoint(tmp_path)

    assert rnd == 1 and f"skipping checkpoint {path.parent}" in caplog.text


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no checkpoints/ folder"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="has no complete checkpoint"):
        load_checkpoint(tmp_path)


class Crash(BaseException):
    """Stands for the ServerApp process dying: not an Exception, so nothing catches it."""


@pytest.mark.parametrize("mode", ["true", "hybrid"])
def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, mode):
    overrides = dict(num_nodes=3, num_server_rounds=4, keep=2, mode=mode, lr_schedule="cosine", eval_every=2,
                     optimizer_state="reset")  # node-side moments are not in the server checkpoint
    _, _, straight = run_local(tmp_path, "straight", **overrides)

    def crash_in_round_3(sent, reply, node):
        if sent.metadata.message_type == "train" and sent.content["config"]["server-round"] == 3:
            raise Crash()
        return reply

    with pytest.raises(Crash):
        run_local(tmp_path, "broken", reply_hook=crash_in_round_3, **overrides)
    assert not (tmp_path / "broken" / "model").exists()
    run_local(tmp_path, "unused", resume_from=str(tmp_path / "broken"), **overrides)

    assert (tmp_path / "broken" / "model").is_dir() and not (tmp_path / "unused").exists()
    a, b = final_weights(straight), final_weights(tmp_path / "broken")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resumed_default_run_is_bit_identical_when_nodes_store_their_moments(tmp_path, precision):
    # optimizer-state = "keep" (the default): AdamW moments live on the nodes, in their Flower
    # context, which a resumed run (a new Flower run) does not have; twist-state-dir keeps them.
    overrides = dict(num_nodes=3, num_server_rounds=4, keep=2, lr_schedule="cosine", eval_every=2,
                     precision=precision)
    stores = [{"twist-state-dir": str(tmp_path / f"node-{i}")} for i in range(3)]
    _, _, straight = run_local(tmp_path, "straight", node_configs=stores, **overrides)

    def crash_in_round_3(sent, reply, node):  # after the first node trained round 3 and stored its moments
        if sent.metadata.message_type == "train" and sent.content["config"]["server-round"] == 3:
            raise Crash()
        return reply

    results = {}
    for name, node_configs in (("stored", stores), ("lost", None)):
        with pytest.raises(Crash):
            run_local(tmp_path, name, node_configs=node_configs, reply_hook=crash_in_round_3, **overrides)
        run_local(tmp_path, f"{name}-resume", node_configs=node_configs, resume_from=str(tmp_path / name),
                  **overrides)  # a new grid: every node's context starts empty
        results[name] = final_weights(tmp_path / name)

    a = final_weights(straight)
    for k in a:
        np.testing.assert_array_equal(results["stored"][k], a[k], err_msg=k)
    assert any(not np.array_equal(results["lost"][k], a[k]) for k in a)  # moments restarted from zero
    files = sorted(p.name for p in (tmp_path / "node-0").rglob("round-*.safetensors"))
    assert len(files) == 2 * 3  # two runs (straight, stored), the newest 3 rounds each


def test_resume_with_a_different_training_config_is_refused(tmp_path):
    run_local(tmp_path, "base", num_nodes=2)

    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \{'lr'"):
        run_local(tmp_path, "x", num_nodes=2, lr=0.5, resume_from=str(tmp_path / "base"))


def test_a_run_folder_is_never_overwritten(tmp_path):
    run_local(tmp_path, "once", num_nodes=2)

    before = {f: f.read_bytes() for f in (tmp_path / "once").rglob("*") if f.is_file()}

    with pytest.raises(ValueError, match="already exists and is not empty; choose another run-name, or continue it"):
        run_local(tmp_path, "once", num_nodes=2)
    assert {f: f.read_bytes() for f in (tmp_path / "once").rglob("*") if f.is_file()} == before

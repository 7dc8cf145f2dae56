import json
import os

import numpy as np
import pytest

from twist_fl.core.checkpoint import load_checkpoint, save_checkpoint

from .helpers import final_weights, run_local


def weights(v):
    return {"a": np.full((2, 3), v, dtype=np.float32), "b": np.arange(4, dtype=np.float32) * v}


def test_newest_complete_checkpoint_is_loaded(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, r, weights(r), {"note": r})

    rnd, w, state = load_checkpoint(tmp_path)

    assert rnd == 3 and state["note"] == 3 and np.array_equal(w["a"], weights(3)["a"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*")) == ["round-00002", "round-00003"]


def test_interrupted_or_corrupt_checkpoint_is_never_loaded(tmp_path):
    save_checkpoint(tmp_path, 1, weights(1), {})
    save_checkpoint(tmp_path, 2, weights(2), {})
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


def test_resume_with_a_different_training_config_is_refused(tmp_path):
    run_local(tmp_path, "base", num_nodes=2)

    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \{'lr'"):
        run_local(tmp_path, "x", num_nodes=2, lr=0.5, resume_from=str(tmp_path / "base"))


def test_a_run_folder_is_never_overwritten(tmp_path):
    run_local(tmp_path, "once", num_nodes=2)

    with pytest.raises(ValueError, match="already holds a run"):
        run_local(tmp_path, "once", num_nodes=2)
    assert os.path.isdir(tmp_path / "once" / "model")

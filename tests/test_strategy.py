"""TwistStrategy driven by Flower's own round loop over an in-process Grid (no Ray)."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from twist_fl.core.blocks import block_indices, slice_spec
from twist_fl.core.blueprint import Blueprint
from twist_fl.core.config import RunConfig
from twist_fl.federated.localgrid import LocalGrid
from twist_fl.federated.records import to_numpy, to_record

from .helpers import TINY, checkpoint_weights, final_weights, run_local


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sent_train(grid, round_):
    return [m for m in grid.sent
            if m.metadata.message_type == "train" and m.content["config"]["server-round"] == round_]


def test_records_are_flowers_own_arrays_and_read_back_exactly():
    arrays = {"w": np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32),
              "b": np.arange(5, dtype=np.uint16), "t": np.arange(6, dtype=np.float32).reshape(2, 3).T}

    record = to_record(arrays)
    flowers = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    back = to_numpy(record)

    for k in arrays:
        assert (record[k].dtype, record[k].shape, record[k].stype) == (flowers[k].dtype, flowers[k].shape,
                                                                       flowers[k].stype)
        assert record[k].data == flowers[k].data
        assert np.array_equal(record[k].numpy(), arrays[k]) and np.array_equal(back[k], arrays[k])
        assert back[k].dtype == arrays[k].dtype


def test_rounds_send_each_node_only_its_slices_and_cover_every_block(tmp_path):
    summary, grid, run_dir = run_local(tmp_path, "basic", num_nodes=2, num_server_rounds=2, eval_every=2)

    msgs = sent_train(grid, 1)
    cfg = RunConfig.from_flat(TINY).model_config()
    bps = [Blueprint.from_config(m.content["config"]) for m in msgs]
    first = {k: v.numpy() for k, v in msgs[0].content["arrays"].items()}
    assert len(msgs) == 2 and first["h.1.attn.c_attn.weight"].shape == (3 * 2 * 8, 32)  # 2 of 4 heads
    assert set(bps[0].heads[1]) | set(bps[1].heads[1]) == set(range(4))
    assert msgs[0].content["config"]["nonce"] == msgs[1].content["config"]["nonce"]
    assert summary["rounds"] == 2 and summary["rejected_replies"] == 0
    r = rows(run_dir)
    assert [x["round"] for x in r] == [1, 2] and all(x["updated"] for x in r)
    assert r[0]["bytes_down_total"] == sum(n["bytes_down"] for n in r[0]["nodes"]) > 0
    assert all(n["train_s"] > 0 for x in r for n in x["nodes"])  # each node's own training time
    assert r[0]["time"] <= r[1]["time"]
    # learnt: an untrained model is at the uniform 257 (256.8 at lr 1e-9); these two rounds reach about 157
    assert r[1]["valid"]["full"]["ppl"] < 200
    for f in ("config.json", "summary.json", "rounds.png", "keeps.png", "model/model.safetensors"):
        assert (run_dir / f).is_file(), f
    assert cfg.n_head == 4


def test_true_masked_and_hybrid_give_the_same_weights(tmp_path):
    _, _, d_true = run_local(tmp_path, "true", num_nodes=3, mode="true", keep=2)
    _, g_masked, d_masked = run_local(tmp_path, "masked", num_nodes=3, mode="masked", keep=2)
    _, g_hybrid, d_hybrid = run_local(tmp_path, "hybrid", num_nodes=3, mode="hybrid", keep=2)

    a, b, c = final_weights(d_true), final_weights(d_masked), final_weights(d_hybrid)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(c[k], a[k], atol=1e-5, rtol=1e-5)
    modes = sorted(m.content["config"]["mode"] for m in sent_train(g_hybrid, 1))
    assert modes == ["masked", "true", "true"]
    full = sent_train(g_masked, 1)[0].content["arrays"]["h.1.attn.c_attn.weight"].numpy()
    assert full.shape == (3 * 4 * 8, 32)  # masked nodes get the full tensors


def test_fedavg_baseline_sends_the_full_model_to_every_node(tmp_path):
    summary, grid, _ = run_local(tmp_path, "dense", num_nodes=2, strategy="fedavg")

    for m in sent_train(grid, 1):
        assert m.content["arrays"]["h.1.mlp.c_fc.weight"].numpy().shape == (4 * 32, 32)
        assert list(m.content["config"]["bp-heads-count"]) == [4, 4, 4]
    assert summary["strategy"] == "fedavg" and summary["rounds"] == 2


def test_optimizer_state_keep_stores_moments_on_the_node(tmp_path):
    _, grid, _ = run_local(tmp_path, "keepopt", num_nodes=2, optimizer_state="keep")

    state = next(iter(grid.contexts.values())).state
    assert "twist-opt-exp_avg" in state and int(state["twist-opt-meta"]["step"]) == 4  # 2 rounds x 2 steps
    m = state["twist-opt-exp_avg"]["h.0.attn.c_attn.weight"].numpy()
    assert m.shape == (3 * 4 * 8, 32) and np.abs(m).sum() > 0


# --- bad replies: one test per kind ------------------------------------------------------------

FAULTS = {
    "nan": "contains NaN or Inf", "inf": "contains NaN or Inf", "shape": "shape", "dtype": "dtype float64",
    "missing-key": "array keys differ: missing", "extra-key": "unexpected ['h.0.attn.extra.weight']",
    "stale-round": "stale reply: round 0, expected 1", "nonce": "wrong nonce", "norm": "update norm",
    "num-examples": "num-examples=1000000000000", "raise": "error reply (code 2): RuntimeError: injected",
}


def blocks_of(weights, cfg, bp):
    """Every sliced tensor of the non-shared layers, at bp's blocks."""
    out = {}
    for name, w in weights.items():
        spec = slice_spec(name)
        if spec is not None and spec.layer not in cfg.shared_layer_ids:
            out[name] = np.take(w, block_indices(cfg, spec, bp.ids(spec.kind, spec.layer)), axis=spec.axis)
    return out


def check_rejected_and_blocks_kept(grid, run_dir, reason, bad_node):
    cfg = RunConfig.from_flat(TINY).model_config()
    r = rows(run_dir)
    assert len(r) == 2 and r[1]["updated"]  # the run went on
    assert len(r[0]["rejected"]) == 1 and reason in r[0]["rejected"][0]["reason"]
    assert r[0]["rejected"][0]["node_id"] == bad_node
    msg = next(m for m in sent_train(grid, 1) if m.metadata.dst_node_id == bad_node)
    bp = Blueprint.from_config(msg.content["config"])
    after = blocks_of(checkpoint_weights(run_dir, 1), cfg, bp)
    # true mode: the message holds exactly the node's blocks, in order
    sent = {k: msg.content["arrays"][k].numpy() for k in after}
    assert len(after) > 0
    for k in after:
        assert after[k].tobytes() == sent[k].tobytes(), k
    assert np.all(np.isfinite(np.concatenate([w.ravel() for w in final_weights(run_dir).values()])))


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_reply_is_rejected_and_its_blocks_are_unchanged(tmp_path, monkeypatch, fault):
    monkeypatch.setenv("TWIST_FL_ENABLE_FAULTS", "1")

    # node 1 (partition 1) misbehaves in every round; keep 2 of 4 with 2 nodes: disjoint blocks
    summary, grid, run_dir = run_local(tmp_path, fault, num_nodes=2, keep=2, max_failed_rounds=0,
                                       node_configs=[{}, {"twist-fault": fault}])

    check_rejected_and_blocks_kept(grid, run_dir, FAULTS[fault], LocalGrid.node_id(1))
    assert summary["rejected_replies"] == 2


def test_faults_are_off_unless_enabled(tmp_path, monkeypatch):
    monkeypatch.delenv("TWIST_FL_ENABLE_FAULTS", raising=False)

    summary, _, _ = run_local(tmp_path, "nofault", num_nodes=2, node_configs=[{}, {"twist-fault": "nan"}])

    assert summary["rejected_replies"] == 0


SECOND = LocalGrid.node_id(1)


def _tamper(fn):
    """A reply hook that rewrites the reply of the second node (round 1 only)."""
    def hook(sent, reply, node):
        if sent.metadata.message_type != "train" or node != SECOND or sent.content["config"]["server-round"] != 1:
            return reply
        return fn(sent, reply)
    return hook


def test_lying_declared_shape_is_checked_against_the_real_array(tmp_path):
    def lie(sent, reply):
        arrays = reply.content["arrays"]
        name = sorted(arrays)[0]
        real = arrays[name].numpy()
        bogus = Array(np.zeros(7, dtype=np.float64))
        bogus.shape, bogus.dtype = list(real.shape), str(real.dtype)  # declared metadata says all is well
        arrays[name] = bogus
        return reply

    _, grid, run_dir = run_local(tmp_path, "lie", num_nodes=2, keep=2, reply_hook=_tamper(lie))

    check_rejected_and_blocks_kept(grid, run_dir, "dtype float64", SECOND)


def test_reply_to_unknown_message_and_extra_record_are_rejected(tmp_path):
    def unknown(sent, reply):  # a reply to a message the server never sent
        never_sent = Message(content=RecordDict(), dst_node_id=SECOND, message_type="train")
        return Message(content=reply.content, reply_to=never_sent)

    _, grid, run_dir = run_local(tmp_path, "unknown", num_nodes=2, keep=2, reply_hook=_tamper(unknown))
    r = rows(run_dir)
    assert any("unknown message" in x["reason"] for x in r[0]["rejected"])
    assert any("no reply" in x["reason"] for x in r[0]["rejected"])

    def extra(sent, reply):
        return Message(content=RecordDict({"arrays": reply.content["arrays"], "metrics": reply.content["metrics"],
                                           "more": MetricRecord({"x": 1})}), reply_to=sent)

    _, grid, run_dir = run_local(tmp_path, "extra", num_nodes=2, keep=2, reply_hook=_tamper(extra))
    check_rejected_and_blocks_kept(grid, run_dir, "reply records are ['arrays', 'metrics', 'more']", SECOND)


def test_bad_num_examples_values(tmp_path):
    for i, value in enumerate([0, -3, float("nan"), 9]):  # 9 > local-steps x batch-size = 8
        def hook(sent, reply, value=value):
            reply.content["metrics"]["num-examples"] = value
            return reply

        _, grid, run_dir = run_local(tmp_path, f"nex{i}", num_nodes=2, keep=2, reply_hook=_tamper(hook))
        check_rejected_and_blocks_kept(grid, run_dir, "num-examples=", SECOND)


def test_round_with_every_reply_rejected_keeps_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIST_FL_ENABLE_FAULTS", "1")

    # round 1: every reply is bad; round 2: honest
    summary, grid, run_dir = run_local(tmp_path, "onebad", num_nodes=2, max_failed_rounds=0,
                                       node_configs=[{"twist-fault": "1:nan"}, {"twist-fault": "1:inf"}])

    first = {k: v.numpy() for k, v in sent_train(grid, 1)[0].content["arrays"].items()}
    assert summary["rounds_without_update"] == [1] and summary["status"] == "ok"
    assert summary["failed_rounds"][0]["round"] == 1 and "every reply was rejected (2)" in \
        summary["failed_rounds"][0]["reason"]
    w = checkpoint_weights(run_dir, 1)
    assert all(w[k].tobytes() == first[k].tobytes() for k in ("wte.weight", "h.0.attn.c_attn.weight"))
    assert rows(run_dir)[0]["failed"].startswith("every reply was rejected")


def test_a_run_whose_every_round_failed_fails_and_presents_no_model(tmp_path, monkeypatch):
    from twist_fl.federated.server import RunFailed

    monkeypatch.setenv("TWIST_FL_ENABLE_FAULTS", "1")

    with pytest.raises(RunFailed, match=r"every round produced no update.*round 1: every reply was rejected"):
        run_local(tmp_path, "allbad", num_nodes=2, max_failed_rounds=0,
                  node_configs=[{"twist-fault": "nan"}, {"twist-fault": "raise"}])

    run_dir = tmp_path / "allbad"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not (run_dir / "model").exists()
    assert summary["status"] == "failed" and [f["round"] for f in summary["failed_rounds"]] == [1, 2]


def test_a_run_whose_last_round_failed_fails(tmp_path, monkeypatch):
    from twist_fl.federated.server import RunFailed

    monkeypatch.setenv("TWIST_FL_ENABLE_FAULTS", "1")

    with pytest.raises(RunFailed, match=r"the last round \(2\) produced no update"):
        run_local(tmp_path, "lastbad", num_nodes=2, max_failed_rounds=0,
                  node_configs=[{"twist-fault": "2:nan"}, {"twist-fault": "2:nan"}])
    assert not (tmp_path / "lastbad" / "model").exists()


def test_consecutive_failed_rounds_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIST_FL_ENABLE_FAULTS", "1")

    with pytest.raises(RuntimeError, match=r"stopping: 2 consecutive rounds without a valid reply"):
        run_local(tmp_path, "stop", num_nodes=2, num_server_rounds=3, max_failed_rounds=2,
                  node_configs=[{"twist-fault": "raise"}, {"twist-fault": "raise"}])


def test_too_few_nodes_fails_after_a_bounded_wait(tmp_path):
    with pytest.raises(RuntimeError, match=r"round 1: only 2 node\(s\) ready after waiting 1 s \(node-wait-timeout\); "
                                           r"the run needs min-nodes=3"):
        run_local(tmp_path, "few", num_nodes=2, min_nodes=3, node_wait_timeout=1.0)


def test_node_capacity_caps_its_keep_and_the_others_cover_the_rest(tmp_path):
    # keep 2 of 4 for the run; partition 1 can hold only a quarter of each layer (1 block)
    _, grid, run_dir = run_local(tmp_path, "cap", num_nodes=3, keep=2,
                                 node_configs=[{}, {"twist-capacity": 0.25}, {"twist-capacity": 1.0}])

    cfg = RunConfig.from_flat(TINY).model_config()
    by_node = {m.metadata.dst_node_id: Blueprint.from_config(m.content["config"]) for m in sent_train(grid, 1)}
    small = sorted(grid.contexts)[1]
    assert [len(h) for h in by_node[small].heads] == [4, 1, 4]  # shared layers 0 and 2 stay whole
    assert [len(f) for f in by_node[small].ffn] == [4, 1, 4]
    assert all(len(bp.heads[1]) == 2 for n, bp in by_node.items() if n != small)
    assert set().union(*(bp.heads[1] for bp in by_node.values())) == set(range(cfg.n_head))
    entries = {e["node_id"]: e for e in rows(run_dir)[0]["nodes"]}
    assert entries[small]["keep"] == 1 and entries[small]["blueprint"]["heads"][1] == list(by_node[small].heads[1])


def test_bad_capacity_leaves_the_node_out_with_the_reason_logged(tmp_path, caplog):
    summary, grid, run_dir = run_local(tmp_path, "badcap", num_nodes=3, keep=2,
                                       node_configs=[{}, {}, {"twist-capacity": 1.5}])

    assert len(sent_train(grid, 1)) == 2 and summary["rounds"] == 2
    assert "twist-capacity=1.5 is not allowed; allowed: a number in (0, 1]" in caplog.text


def test_train_messages_expire_with_the_round_timeout(tmp_path):
    _, grid, _ = run_local(tmp_path, "ttl", num_nodes=2, round_timeout=42.0)

    assert {m.metadata.ttl for m in sent_train(grid, 1)} == {42.0}


def test_fault_spec_names_a_kind_per_round():
    from twist_fl.federated.faults import fault_for_round

    assert [fault_for_round("nan", r) for r in (1, 2)] == ["nan", "nan"]
    assert [fault_for_round("1:shape,3:stale-round", r) for r in (1, 2, 3)] == ["shape", "ok", "stale-round"]
    assert [fault_for_round("hang,2:ok", r) for r in (1, 2)] == ["hang", "ok"]
    with pytest.raises(ValueError, match=r"unknown fault 'melt' in twist-fault='2:melt'; allowed: \['ok', 'nan'"):
        fault_for_round("2:melt", 1)
    with pytest.raises(ValueError, match="the round before ':' must be an integer"):
        fault_for_round("x:nan", 1)


def test_node_config_twist_mode_true_as_a_toml_boolean_trains_in_true_mode(tmp_path):
    summary, grid, run_dir = run_local(tmp_path, "boolmode", num_nodes=2, num_server_rounds=1,
                                       node_configs=[{"twist-mode": True}, {"twist-mode": "masked"}])

    nodes = {n["partition_id"]: n for n in rows(run_dir)[0]["nodes"]}
    assert summary["rejected_replies"] == 0 and {p: n["mode"] for p, n in nodes.items()} == {0: "true", 1: "masked"}


def test_an_in_process_run_holds_no_message_of_its_rounds_after_them(tmp_path):
    """The in-process grid (what `tune run` and `tune finetune` train on) keeps no pushed Message
    unless a test asks for them (`keep_sent`): the live Messages after a run do not grow with its
    rounds. (Keeping them held every round's subnets: about 12 MB a round on the default model
    with 4 nodes, 14 GB over a 1200-round fine-tune.)"""
    import gc

    from twist_fl.federated.client import make_client_app
    from twist_fl.federated.server import run_server

    def live_after(rounds, keep_sent):
        flat = {**TINY, "num-server-rounds": rounds, "out-dir": str(tmp_path), "run-name": f"r{rounds}{keep_sent}"}
        grid = LocalGrid(make_client_app(flat), 2, keep_sent=keep_sent)
        run_server(grid, RunConfig.from_flat(flat))
        gc.collect()
        live = sum(type(o) is Message for o in gc.get_objects())
        return live, len(grid.sent)

    assert live_after(2, False) == live_after(5, False) == (0, 0)
    kept2, kept5 = live_after(2, True), live_after(5, True)
    assert kept2[1] < kept5[1] and kept2[0] < kept5[0]  # the test's own record grows, as it should

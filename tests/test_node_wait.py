"""A round never goes out empty: the server waits for min-nodes nodes that answered the node-info
query (late answers are waited for, lost ones are not sent again while they live, error answers
leave the node out), fails with the round and the silent nodes named, and keeps its failed-round
count across a resume."""

import json

import pytest

from twist_fl.federated.localgrid import LocalGrid
from twist_fl.federated.server import RunFailed

from .helpers import run_local


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def queries(grid, node=None):
    return [m for m in grid.sent if m.metadata.message_type == "query"
            and (node is None or m.metadata.dst_node_id == node)]


def late_queries(seconds):
    return lambda sent: seconds if sent.metadata.message_type == "query" else 0.0


def test_late_node_info_answers_are_waited_for_and_every_round_trains(tmp_path):
    summary, grid, run_dir = run_local(tmp_path, "late", num_nodes=3, min_nodes=3, node_wait_timeout=20,
                                       reply_delay=late_queries(1.5))

    r = rows(run_dir)
    assert [len(x["nodes"]) for x in r] == [3, 3] and all(x["updated"] for x in r)
    assert len(queries(grid)) == 3  # one query per node, waited for, never sent again


def test_a_lost_answer_is_not_sent_again_and_the_others_train(tmp_path):
    lost = LocalGrid.node_id(2)

    def drop(sent, reply, node):
        return None if sent.metadata.message_type == "query" and node == lost else reply

    _, grid, run_dir = run_local(tmp_path, "lost", num_nodes=3, min_nodes=2, node_wait_timeout=3, reply_hook=drop)

    assert [sorted(n["partition_id"] for n in x["nodes"]) for x in rows(run_dir)] == [[0, 1], [0, 1]]
    # each round waited node-wait-timeout for it, then went on; its query lived that long (its TTL)
    # and was sent again only once it had expired: one live query at a time, never piled up
    sent = sorted(q.metadata.created_at for q in queries(grid, lost))
    assert all(q.metadata.ttl == 3 for q in queries(grid))
    assert len(sent) == 2 and sent[1] - sent[0] >= 3  # one per round here: each round waits its TTL out


def test_too_few_answers_fail_naming_the_round_and_the_silent_nodes(tmp_path):
    lost = LocalGrid.node_id(1)

    def drop(sent, reply, node):
        return None if sent.metadata.message_type == "query" and node == lost else reply

    with pytest.raises(RuntimeError, match=rf"round 1: only 1 node\(s\) ready after waiting 2 s .*min-nodes=2.*no "
                                           rf"node-info answer from node\(s\) \[{lost}\]"):
        run_local(tmp_path, "silent", num_nodes=2, min_nodes=2, node_wait_timeout=2, reply_hook=drop)
    assert not (tmp_path / "silent" / "metrics.jsonl").exists()  # no round row was written


def test_node_info_errors_leave_the_node_out_and_are_named(tmp_path):
    from flwr.app import Error, Message

    def error(sent, reply, node):
        if sent.metadata.message_type == "query":
            return Message(error=Error(code=0, reason="node busy"), reply_to=sent)
        return reply

    with pytest.raises(RuntimeError, match=r"round 1: only 0 node\(s\) ready.*node-info errors: .*node busy"):
        run_local(tmp_path, "errors", num_nodes=2, min_nodes=2, node_wait_timeout=1, reply_hook=error)


def test_a_resumed_run_waits_for_late_nodes_and_has_no_empty_round(tmp_path):
    run_local(tmp_path, "r", num_nodes=2, num_server_rounds=2, optimizer_state="reset")

    _, grid, _ = run_local(tmp_path, "ignored", num_nodes=2, num_server_rounds=4, optimizer_state="reset",
                           resume_from=str(tmp_path / "r"), node_wait_timeout=20, reply_delay=late_queries(2.0))

    r = rows(tmp_path / "r")
    assert [x["round"] for x in r] == [1, 2, 3, 4]
    assert all(x["updated"] and len(x["nodes"]) == 2 for x in r)
    assert len(queries(grid)) == 2


def test_max_failed_rounds_counts_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("TWIST_FL_ENABLE_FAULTS", "1")
    bad = [{"twist-fault": "1:ok,nan"}, {"twist-fault": "1:ok,nan"}]  # round 1 honest, then every reply NaN
    with pytest.raises(RunFailed):  # its last round failed
        run_local(tmp_path, "f", num_nodes=2, num_server_rounds=2, max_failed_rounds=0, optimizer_state="reset",
                  node_configs=bad)
    state = json.loads(next((tmp_path / "f" / "checkpoints").glob("round-00002")).joinpath("state.json").read_text())
    assert state["strategy"]["failed_rounds"] == 1

    with pytest.raises(RuntimeError, match=r"stopping: 2 consecutive rounds without a valid reply"):
        run_local(tmp_path, "x", num_nodes=2, num_server_rounds=4, max_failed_rounds=2, optimizer_state="reset",
                  node_configs=bad, resume_from=str(tmp_path / "f"))
    assert [x["round"] for x in rows(tmp_path / "f")] == [1, 2, 3]  # stopped at round 3, the second failure

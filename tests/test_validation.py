"""Reply validation on Flower Messages alone: no Grid, no strategy, no ClientApp."""

import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict

from twist_fl.federated.records import to_record
from twist_fl.federated.validation import Expected, RejectedReply, match_reply, validate_reply

SENT = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, dtype=np.float32)}
EXPECTED = Expected(node_id=7, round=3, nonce=42, sent=SENT, wire_dtype="float32", max_examples=8,
                    max_update_ratio=10.0)


def reply(arrays=None, metrics=None, src=7, reply_to="m-1", records=None, error=None) -> Message:
    md = Metadata(run_id=1, message_id="r-1", src_node_id=src, dst_node_id=0, reply_to_message_id=reply_to,
                  group_id="", created_at=time.time(), ttl=60.0, message_type="train")
    if error is not None:
        return Message(error=error, metadata=md)
    arrays = {k: v + 0.5 for k, v in SENT.items()} if arrays is None else arrays
    m = {"server-round": 3, "nonce": 42, "num-examples": 8, "train-loss": 2.5, **(metrics or {})}
    content = records if records is not None else {"arrays": to_record(arrays), "metrics": MetricRecord(m)}
    return Message(content=RecordDict(content), metadata=md)


def test_a_valid_reply_gives_its_arrays_metrics_and_bytes():
    arrays, metrics, nbytes = validate_reply(reply(), EXPECTED)

    assert set(arrays) == {"w", "b"} and np.array_equal(arrays["w"], SENT["w"] + 0.5)
    assert metrics["num-examples"] == 8
    assert nbytes == sum(len(a.data) for a in to_record({k: v + 0.5 for k, v in SENT.items()}).values())


@pytest.mark.parametrize(("bad", "reason"), [
    (dict(error=Error(code=1, reason="boom")), "error reply (code 1): boom"),
    (dict(src=8), "sent by node 8, but the message went to 7"),
    (dict(metrics={"server-round": 2}), "stale reply: round 2, expected 3"),
    (dict(metrics={"nonce": 41}), "wrong nonce"),
    (dict(metrics={"num-examples": 9}), "num-examples=9; allowed a positive finite number up to 8"),
    (dict(metrics={"num-examples": 0}), "num-examples=0"),
    (dict(metrics={"train-loss": float("nan")}), "train-loss=nan is not finite"),
    (dict(arrays={"w": SENT["w"]}), "array keys differ: missing ['b'], unexpected []"),
    (dict(arrays={**SENT, "extra": SENT["b"]}), "unexpected ['extra']"),
    (dict(arrays={**SENT, "b": np.ones(4, np.float32)}), "b: shape (4,), expected (3,)"),
    (dict(arrays={**SENT, "b": np.ones(3, np.float64)}), "b: dtype float64, expected float32"),
    (dict(arrays={**SENT, "b": np.array([1, np.inf, 1], np.float32)}), "b: contains NaN or Inf"),
    (dict(arrays={**SENT, "w": SENT["w"] * 1000}), "exceeds max-update-ratio"),
    (dict(records={"arrays": ArrayRecord()}), "reply records are ['arrays']; expected ['arrays', 'metrics']"),
])
def test_each_kind_of_bad_reply_is_rejected_with_its_reason(bad, reason):
    with pytest.raises(RejectedReply) as e:
        validate_reply(reply(**bad), EXPECTED)

    assert reason in str(e.value)


def test_missing_metric_is_named():
    r = reply(records={"arrays": to_record(SENT), "metrics": MetricRecord({"server-round": 3, "nonce": 42,
                                                                          "num-examples": 8})})
    with pytest.raises(RejectedReply, match="reply metrics lack 'train-loss'"):
        validate_reply(r, EXPECTED)


def test_match_pairs_a_reply_with_its_message_once():
    by_id, answered = {"m-1": "assignment of m-1"}, set()

    assert match_reply(reply(), by_id, answered) == "assignment of m-1" and answered == {"m-1"}
    with pytest.raises(RejectedReply, match="duplicate reply from node 7"):
        match_reply(reply(), by_id, answered)
    with pytest.raises(RejectedReply, match="reply to an unknown message 'm-2' from node 7"):
        match_reply(reply(reply_to="m-2"), by_id, answered)

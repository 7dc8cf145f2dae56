"""Replies are untrusted: check each against what was sent to its node, before any averaging.

`validate_reply(reply, expected)` returns the reply's arrays (float32), its metrics and its byte
count, or raises `RejectedReply` with the reason: an error reply, a reply from another node,
missing or extra records or keys, a stale round or a wrong nonce, a `num-examples` that is not a
positive finite number up to local-steps x batch-size, a non-finite loss, arrays whose real
dtype or shape (read from the payload, not the declared ones) differ from what was sent, NaN or
Inf, or an update whose norm exceeds `max_update_ratio` times the norm of the sent tensors.
`match_reply` pairs a reply with the message it answers and refuses unknown and duplicate ones.
No Grid is needed: both work on Flower `Message`s alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from ..core.wire import decode, wire_numpy_dtype
from .records import array_numpy, record_bytes

T = TypeVar("T")


class RejectedReply(Exception):
    """A reply that must not be aggregated; the message is the reason, for the log and metrics."""


@dataclass(frozen=True)
class Expected:
    """What a valid reply to one TRAIN message looks like."""

    node_id: int  # the node the message went to
    round: int
    nonce: int
    sent: Mapping[str, np.ndarray]  # the tensors the node started from, float32: the keys and shapes to match
    wire_dtype: str = "float32"  # the dtype every array must have on the wire
    max_examples: int = 1  # local-steps x batch-size
    max_update_ratio: float = 10.0


def match_reply(reply: Message, by_id: Mapping[str, T], answered: set[str]) -> T:
    """What `by_id` holds for the message this reply answers; records it in `answered`."""
    mid = reply.metadata.reply_to_message_id
    if mid not in by_id:
        raise RejectedReply(f"reply to an unknown message {mid!r} from node {reply.metadata.src_node_id}")
    if mid in answered:
        raise RejectedReply(f"duplicate reply from node {reply.metadata.src_node_id}")
    answered.add(mid)
    return by_id[mid]


def validate_reply(reply: Message, expected: Expected) -> tuple[dict[str, np.ndarray], Any, int]:
    """(arrays as float32, metrics, bytes of the reply's arrays) of a valid reply; else RejectedReply."""
    e = expected
    if reply.has_error():
        raise RejectedReply(f"error reply (code {reply.error.code}): {reply.error.reason}")
    if reply.metadata.src_node_id != e.node_id:
        raise RejectedReply(f"sent by node {reply.metadata.src_node_id}, but the message went to {e.node_id}")
    content = reply.content
    keys = set(content.keys())
    if keys != {"arrays", "metrics"}:
        raise RejectedReply(f"reply records are {sorted(keys)}; expected ['arrays', 'metrics']")
    record, metrics = content["arrays"], content["metrics"]
    if not isinstance(record, ArrayRecord) or not isinstance(metrics, MetricRecord):
        raise RejectedReply("reply 'arrays' must be an ArrayRecord and 'metrics' a MetricRecord")
    for key in ("server-round", "nonce", "num-examples", "train-loss"):
        if key not in metrics:
            raise RejectedReply(f"reply metrics lack {key!r}")
    if metrics["server-round"] != e.round:
        raise RejectedReply(f"stale reply: round {metrics['server-round']}, expected {e.round}")
    if metrics["nonce"] != e.nonce:
        raise RejectedReply("wrong nonce")
    n = metrics["num-examples"]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or not 0 < n <= e.max_examples:
        raise RejectedReply(f"num-examples={n!r}; allowed a positive finite number up to {e.max_examples} "
                            f"(local-steps x batch-size)")
    if not math.isfinite(float(metrics["train-loss"])):
        raise RejectedReply(f"train-loss={metrics['train-loss']!r} is not finite")
    got, want = set(record.keys()), set(e.sent)
    if got != want:
        raise RejectedReply(f"array keys differ: missing {sorted(want - got)}, unexpected {sorted(got - want)}")
    arrays, diff2, ref2 = {}, 0.0, 0.0
    want_dtype = wire_numpy_dtype(e.wire_dtype)
    for k, sent in e.sent.items():
        raw = array_numpy(record[k])  # the real array, not its declared shape/dtype
        if raw.dtype != want_dtype:
            raise RejectedReply(f"{k}: dtype {raw.dtype}, expected {want_dtype} (wire-dtype {e.wire_dtype})")
        if raw.shape != sent.shape:
            raise RejectedReply(f"{k}: shape {raw.shape}, expected {sent.shape}")
        arr = decode({k: raw}, e.wire_dtype)[k]
        if not np.isfinite(arr).all():
            raise RejectedReply(f"{k}: contains NaN or Inf")
        diff2 += float(np.sum((arr.astype(np.float64) - sent) ** 2))
        ref2 += float(np.sum(sent.astype(np.float64) ** 2))
        arrays[k] = arr
    bound = e.max_update_ratio * math.sqrt(ref2)
    if math.sqrt(diff2) > bound:
        raise RejectedReply(f"update norm {math.sqrt(diff2):.4g} exceeds max-update-ratio x norm of the "
                            f"sent tensors = {bound:.4g}")
    return arrays, metrics, record_bytes(record)

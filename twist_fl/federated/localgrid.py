"""An in-process Flower Grid: calls a ClientApp directly (no Ray, no SuperLink).

For tests and for measuring the federated runtime's overhead against the same work done in
one process. Each node has a persistent Context (node config, state), as in a simulation.
It relies on two flwr 1.41 internals, as Flower's own grids do: `TaskIdentity` (a Message
built outside a Flower runtime needs a run id) and the message id, which every Grid sets on the
pushed Message itself (`flwr.superlink.grid.inmemory_grid` writes the same field) and which has
no public setter. Both are written in this module only.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    @staticmethod
    def node_id(i: int) -> int:
        """The node id of the i-th node (0-based), deliberately unlike its partition id."""
        return 1000 + 17 * i

    def __init__(self, client_app: Callable[[Message, Context], Message], num_nodes: int,
                 run_config: dict[str, Any] | None = None,
                 node_configs: list[dict[str, Any]] | None = None,
                 reply_hook: Callable[[Message, Message, int], Message | None] | None = None,
                 reply_delay: Callable[[Message], float] | None = None, keep_sent: bool = False):
        """`reply_hook(sent, reply, node_id)` may replace or drop (None) a reply: fault injection.
        `reply_delay(sent)` holds a reply back for that many seconds (a busy or slow node).
        `keep_sent` keeps every pushed Message in `sent`, for a test to inspect; off for real runs,
        where it would hold each round's subnets for the rest of the run (the whole run's traffic
        in memory: about 12 MB a round on the default model with 4 nodes)."""
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.client_app = client_app
        self.reply_hook = reply_hook
        self.reply_delay = reply_delay
        self.contexts = {}
        for i in range(num_nodes):
            node_cfg = {"partition-id": i, "num-partitions": num_nodes, **((node_configs or [{}] * num_nodes)[i])}
            self.contexts[self.node_id(i)] = Context(run_id=1, node_id=self.node_id(i), node_config=node_cfg,
                                                     state=RecordDict(), run_config=dict(run_config or {}))
        self.offline: set[int] = set()
        self._run = None
        self._inbox: dict[str, tuple[Message, float]] = {}  # message id -> (reply, when it may be pulled)
        self.keep_sent = keep_sent
        self.sent: list[Message] = []  # with keep_sent only

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as a Grid does on push (no public setter)
            if self.keep_sent:
                self.sent.append(m)
            node = m.metadata.dst_node_id
            try:
                reply = self.client_app(m, self.contexts[node])
            except Exception as e:  # noqa: BLE001 - as the runtime does: an error reply
                err = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}")
                reply = Message(error=err, reply_to=m)
            if self.reply_hook is not None:
                reply = self.reply_hook(m, reply, node)
            if reply is not None:
                delay = self.reply_delay(m) if self.reply_delay is not None else 0.0
                self._inbox[m.metadata.message_id] = (reply, time.monotonic() + delay)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        ready = [i for i in message_ids if i in self._inbox and self._inbox[i][1] <= now]
        return [self._inbox.pop(i)[0] for i in ready]

    def send_and_receive(self, messages, *, timeout=None):
        ids = list(self.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        out: list[Message] = []
        while True:
            got = self.pull_messages(ids)
            out += got
            ids = [i for i in ids if i in self._inbox]
            if not ids or time.monotonic() >= end:
                return out
            time.sleep(0.05)

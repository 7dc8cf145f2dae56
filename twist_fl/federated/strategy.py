"""TwistStrategy: TwIST with partial models, on Flower's own round loop (`Strategy.start`).

Each round `configure_train` asks the blueprint policy (`core.policy.round_plan`: TwIST's
`sample_blueprints`, plus full nodes and mixed keeps; deterministic from (seed, round))
for one blueprint per node and sends every node its own Message: the sliced tensors of its subnet
(`true` nodes) or the full tensors plus the blueprint (`masked` nodes). `aggregate_train`
validates every reply against what was sent to that node, rejects (logs, counts, never raises)
whatever does not fit, and averages each block over the valid replies that held it
(`coverage_average`, which is FedAvg where every node holds every block). `strategy="fedavg"` is
the same class with the full blueprint for every node: FedAvg of the dense model with the same
data, local steps, optimizer and checks (not data-parallel training: nodes take `local-steps`
steps apart between averages).

A node's mode is learnt once per node with a QUERY message (its node config `twist-mode`, or the
run's `mode`), because the server cannot read node configs.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..core.blocks import coverage_average, held_masks, slice_state
from ..core.blueprint import Blueprint, sample_blueprints
from ..core.config import NODE_MODES, GPTConfig, RunConfig, parse_mode, quarters_of
from ..core.outer import OuterOptimizer
from ..core.policy import capacity_keep, round_plan
from ..core.rng import Stream, generator
from ..core.wire import decode, encode
from .records import record_bytes, to_numpy, to_record
from .validation import Expected, RejectedReply, match_reply, validate_reply

log = logging.getLogger(__name__)

@dataclass
class NodeInfo:
    node_id: int
    partition_id: int
    mode: str
    device: str = "cpu"
    capacity: float = 1.0  # the largest share of a layer's blocks the node can hold (node config twist-capacity)
    num_partitions: int = 0  # as the node reports it (node config num-partitions)


@dataclass
class Assignment:
    node: NodeInfo
    blueprint: Blueprint
    keep: int  # the blocks of each kind per layer it holds this round (n_blocks when it trains the full model)
    round: int
    nonce: int
    sent: dict[str, np.ndarray]  # the sliced tensors the node received, as float32 (shapes to match)
    bytes_down: int
    message: Message | None = None


@dataclass
class RoundRecord:
    round: int
    nodes: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    train_loss: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    wall_s: float = 0.0
    updated: bool = False
    failed: str | None = None  # why the round produced no update (None when it did)
    lr: float = 0.0
    fed_eval: dict[str, Any] | None = None  # the nodes' own evaluation of this round's model (fraction-evaluate)


class TwistStrategy(Strategy):
    """TwIST (or FedAvg of the dense model, `strategy="fedavg"`) over Flower's Message API.

    A `Strategy` with its own node handling (min-nodes, sampling, capacities): it uses Flower's
    round loop `start` and none of FedAvg's state."""

    def __init__(self, cfg: GPTConfig, run: RunConfig, round_offset: int = 0, run_uid: str = "",
                 on_partitions: Callable[[int], None] | None = None) -> None:
        """`on_partitions(n)` is called once for each number of partitions the nodes report, before
        any of them trains (the ServerApp checks and records each node's share there)."""
        self.cfg, self.run = cfg, run
        self.on_partitions = on_partitions
        self._partitions_seen: set[int] = set()
        self._queries: dict[int, tuple[str, float]] = {}  # node id -> (node-info query id, when it was sent)
        self._warned_num_nodes = False
        self._eval_sent: list[tuple[Message, NodeInfo, int]] = []
        self.round_offset = round_offset  # rounds already done before this start() (resume)
        self.run_uid = run_uid  # the run folder's id: nodes key their stored optimizer moments by it
        self.keep = run.trained_keep(cfg)
        self.nodes: dict[int, NodeInfo] = {}
        self.records: dict[int, RoundRecord] = {}
        self.failed_rounds = 0
        self.stop_reason: str | None = None  # set when max-failed-rounds is reached
        self.outer = OuterOptimizer(run.server_optimizer, run.server_lr, run.server_momentum)
        self._global: dict[str, np.ndarray] = {}
        self._assignments: list[Assignment] = []
        self._t0 = 0.0

    def summary(self) -> None:
        r = self.run
        log.info("TwistStrategy: strategy=%s keep=%s/%d heads and FFN blocks, full nodes %d, shared layers %s, "
                 "alpha=%.2f, local-steps=%d, distill %s, outer step %s", r.strategy, r.keep_choices or self.keep,
                 self.cfg.n_blocks, r.full_nodes, list(self.cfg.shared_layer_ids), self.cfg.alpha, r.local_steps,
                 f"{r.distill_from} (w={r.distill_weight}, T={r.distill_temperature})" if r.distill_from else "off",
                 r.server_optimizer if r.server_optimizer == "avg" else
                 f"{r.server_optimizer} (lr {r.server_lr}, momentum {r.server_momentum})")

    # --- nodes --------------------------------------------------------------------------------

    def _ready_nodes(self, grid: Grid, rnd: int) -> list[int]:
        """The connected nodes that have answered the node-info query. Waits until every connected
        node has answered (or answered with an error), for at most node-wait-timeout; then goes on
        if at least min-nodes have, else fails naming the round and the nodes that did not answer.
        A node is queried once: its query lives for node-wait-timeout (its TTL) and is waited
        for, not sent again, so queries never pile up behind a busy node (a SuperNode answers its
        messages oldest first). Only a query whose TTL has passed is sent anew."""
        timeout = self.run.node_wait_timeout
        deadline = time.monotonic() + timeout
        errors: dict[int, str] = {}
        while True:
            connected = sorted(grid.get_node_ids())
            now = time.monotonic()
            fresh = [n for n in connected if n not in self.nodes and n not in errors
                     and (n not in self._queries or now - self._queries[n][1] >= timeout)]
            if fresh and now < deadline:
                msgs = [Message(content=RecordDict({"config": ConfigRecord({"twist-query": "node-info"})}),
                                message_type=MessageType.QUERY, dst_node_id=n, ttl=timeout) for n in fresh]
                for n, mid in zip(fresh, grid.push_messages(msgs), strict=True):
                    if mid:  # a message the SuperLink did not take (None) is sent again on the next pass
                        self._queries[n] = (mid, now)
            if self._queries:
                for reply in grid.pull_messages([mid for mid, _ in self._queries.values()]):
                    self._node_info(reply, errors)
            ready = [n for n in connected if n in self.nodes]
            silent = [n for n in connected if n not in self.nodes and n not in errors]
            over = time.monotonic() >= deadline
            if len(ready) >= self.run.min_nodes and (not silent or over):
                if silent:
                    log.warning("round %d: node(s) %s did not answer the node-info query within %.0f s; the round "
                                "goes on with the %d that did", rnd, silent, timeout, len(ready))
                self._check_partitions()
                return ready
            if over:
                raise RuntimeError(
                    f"round {rnd}: only {len(ready)} node(s) ready after waiting {timeout:.0f} s "
                    f"(node-wait-timeout); the run needs min-nodes={self.run.min_nodes}. Connected: {len(connected)}"
                    + (f"; no node-info answer from node(s) {silent}" if silent else "")
                    + (f"; node-info errors: {errors}" if errors else "")
                    + (". In simulation pass --federation-config 'num-supernodes=N' with N >= min-nodes, or lower "
                       "min-nodes" if len(connected) < self.run.min_nodes else ""))
            log.info("round %d: waiting for nodes: %d ready, %d connected, %d required", rnd, len(ready),
                     len(connected), self.run.min_nodes)
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def _node_info(self, reply: Message, errors: dict[int, str]) -> None:
        """Record one node-info answer: the node is known, or left out with the reason."""
        src = reply.metadata.src_node_id
        for n, (mid, _) in list(self._queries.items()):
            if mid == reply.metadata.reply_to_message_id:
                src = n
                del self._queries[n]
        try:
            if reply.has_error():
                raise ValueError(f"error {reply.error.code}: {reply.error.reason}")
            info = reply.content["node-info"]
            node = NodeInfo(node_id=reply.metadata.src_node_id, partition_id=int(info["partition-id"]),
                            mode=parse_mode(info["twist-mode"], "node twist-mode", NODE_MODES),
                            device=str(info.get("device", "cpu")), capacity=float(info.get("capacity", 1.0)),
                            num_partitions=int(info.get("num-partitions", 0)))
            if node.node_id != src or not 0 < node.capacity <= 1:
                raise ValueError(f"bad node info {dict(info)}")
            self.nodes[node.node_id] = node
            log.info("node %d: partition %d, mode %s, device %s, capacity %.2f (keep %d)", node.node_id,
                     node.partition_id, node.mode, node.device, node.capacity, self.keep_of(node))
        except Exception as e:  # noqa: BLE001 - a bad query reply excludes the node, never the run
            errors[src] = str(e)
            log.warning("node-info query of node %s failed (%s); it is left out this round", src, e)

    def _check_partitions(self) -> None:
        for num in sorted({n.num_partitions for n in self.nodes.values()} - self._partitions_seen - {0}):
            self._partitions_seen.add(num)
            if self.on_partitions is not None:
                self.on_partitions(num)  # may refuse the run (a node too small for seq-len): before round 1 trains

    def keep_of(self, node: NodeInfo) -> int:
        """The largest keep the node trains: the run's keep (the largest of keep-choices), capped
        by its capacity (at least 1 block of each kind). The dense `fedavg` baseline ignores
        capacities: every node trains the full model."""
        if self.run.strategy != "twist":
            return self.keep
        return min(self.keep, capacity_keep(self.cfg, node.capacity))

    # --- configure ----------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._t0 = time.monotonic()
        rnd = server_round + self.round_offset
        self._assignments = []
        record = self.records[rnd] = RoundRecord(round=rnd, lr=self.run.lr_at(rnd))
        ready = self._ready_nodes(grid, rnd)
        nodes = sorted((self.nodes[n] for n in ready), key=lambda n: (n.partition_id, n.node_id))
        if self.run.strategy == "twist" and self.run.full_nodes >= min(self.run.num_nodes or len(nodes), len(nodes)):
            self.run.check_nodes(len(nodes))  # full-nodes leaves no node a subnet: refused before it trains
        if self.run.num_nodes and len(nodes) < self.run.num_nodes and not self._warned_num_nodes:
            self._warned_num_nodes = True
            log.warning("num-nodes=%d but only %d node(s) are ready: each round trains the %d there are (the "
                        "round rows record who trained)", self.run.num_nodes, len(nodes), len(nodes))
        if self.run.num_nodes and len(nodes) > self.run.num_nodes:
            rng = generator(self.run.seed, Stream.NODE_SAMPLE, rnd)
            pick = rng.choice(len(nodes), self.run.num_nodes, replace=False)
            nodes = [nodes[i] for i in sorted(pick)]
        self._global = {k: v.astype(np.float32, copy=False) for k, v in to_numpy(arrays).items()}
        wire = self.run.wire_dtype
        plan = round_plan(self.cfg, self.run, rnd, [n.capacity for n in nodes])  # the blueprint policy
        keeps = plan.keeps
        if plan.partial:
            log.warning("round %d: %d node(s) at keep %s cannot cover every block; blocks nobody holds keep "
                        "their values this round", rnd, len(nodes), keeps)
        nonce = secrets.randbits(62)
        messages = []
        for node, bp, keep in zip(nodes, plan.blueprints, keeps, strict=True):
            sliced = encode(slice_state(self._global, self.cfg, bp), wire)
            payload = to_record(encode(self._global, wire) if node.mode == "masked" else sliced)
            sent = decode(sliced, wire)  # what the node starts from, in float32
            cfg_rec = ConfigRecord({"server-round": rnd, "nonce": nonce, "mode": node.mode, "lr": record.lr,
                                    "local-steps": self.run.local_steps, "model-config": self.cfg.to_json(),
                                    "run-uid": self.run_uid, **bp.to_config()})
            # The TTL is the round timeout: the SuperLink refuses a reply that comes later.
            msg = Message(content=RecordDict({"arrays": payload, "config": cfg_rec}),
                          message_type=MessageType.TRAIN, dst_node_id=node.node_id, ttl=self.run.round_timeout)
            a = Assignment(node, bp, keep, rnd, nonce, sent, record_bytes(payload), msg)
            self._assignments.append(a)
            messages.append(msg)
        log.info("round %d: %d nodes, keep %s, lr %.2e, %.2f MB down in total", rnd, len(nodes),
                 keeps[0] if len(set(keeps)) == 1 else keeps,
                 record.lr, sum(a.bytes_down for a in self._assignments) / 2**20)
        return messages

    # --- aggregate ----------------------------------------------------------------------------

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        record = self.records.setdefault(rnd, RoundRecord(round=rnd))
        by_id = {a.message.metadata.message_id: a for a in self._assignments if a.message is not None}
        answered: set[str] = set()
        contributions, losses, weights = [], [], []
        for reply in replies:
            try:
                a = match_reply(reply, by_id, answered)
            except RejectedReply as e:
                self._reject(record, None, str(e))
                continue
            entry = self._entry(a, "ok")
            record.nodes.append(entry)
            try:
                arrays, metrics, nbytes = validate_reply(reply, self._expected(a))
            except RejectedReply as e:
                entry["status"] = "rejected"
                self._reject(record, a, str(e))
                continue
            except Exception as e:  # noqa: BLE001 - a malformed reply must never stop the run
                entry["status"] = "rejected"
                self._reject(record, a, f"malformed reply: {type(e).__name__}: {e}")
                continue
            entry["bytes_up"] = nbytes
            t_train = metrics.get("train-s")  # informational only: never used for aggregation
            if isinstance(t_train, (int, float)) and math.isfinite(t_train) and t_train >= 0:
                entry["train_s"] = round(float(t_train), 3)
            w = float(metrics["num-examples"]) if self.run.weighted_average else 1.0
            contributions.append((a.blueprint, arrays, w))
            losses.append(float(metrics["train-loss"]))
            weights.append(w)
        for a in self._assignments:  # sent but never answered (e.g. timed out)
            if a.message is not None and a.message.metadata.message_id not in answered:
                record.nodes.append(self._entry(a, "no reply"))
                self._reject(record, a, "no reply before the round timeout")
        record.bytes_down = sum(n["bytes_down"] for n in record.nodes)
        record.bytes_up = sum(n["bytes_up"] for n in record.nodes)
        record.wall_s = time.monotonic() - self._t0
        if not contributions:
            self.failed_rounds += 1
            record.failed = ("no node was sent work" if not self._assignments else
                             f"every reply was rejected ({len(record.rejected)}): "
                             + "; ".join(sorted({r['reason'] for r in record.rejected}))[:500])
            log.warning("round %d failed, the model is unchanged: %s", rnd, record.failed)
            if self.run.max_failed_rounds and self.failed_rounds >= self.run.max_failed_rounds:
                # raised by the ServerApp once this round is recorded and checkpointed
                self.stop_reason = (f"stopping: {self.failed_rounds} consecutive rounds without a valid reply "
                                    f"(max-failed-rounds={self.run.max_failed_rounds}); last reasons: "
                                    f"{[r['reason'] for r in record.rejected]}")
            return None, MetricRecord({"num-valid": 0, "num-rejected": len(record.rejected)})
        self.failed_rounds = 0
        new = coverage_average(self._global, self.cfg, contributions)
        if self.outer.kind != "avg":  # the outer step, on the blocks some valid reply held
            new = self.outer.step(self._global, new, held_masks(self.cfg, [c[0] for c in contributions]))
        record.updated = True
        record.train_loss = float(np.average(losses, weights=weights))
        log.info("round %d: %d valid, %d rejected replies, train loss %.4f", rnd, len(contributions),
                 len(record.rejected), record.train_loss)
        return to_record(new), MetricRecord({"train-loss": record.train_loss, "num-valid": len(contributions),
                                             "num-rejected": len(record.rejected)})

    def _entry(self, a: Assignment, status: str) -> dict[str, Any]:
        """A node's line in metrics.jsonl: who, what it held, what moved, and how it ended."""
        return {"node_id": a.node.node_id, "partition_id": a.node.partition_id, "mode": a.node.mode,
                "keep": a.keep, "blueprint": a.blueprint.to_dict(), "bytes_down": a.bytes_down,
                "bytes_up": 0, "status": status}

    def _expected(self, a: Assignment) -> Expected:
        return Expected(node_id=a.node.node_id, round=a.round, nonce=a.nonce, sent=a.sent,
                        wire_dtype=self.run.wire_dtype, max_examples=self.run.local_steps * self.run.batch_size,
                        max_update_ratio=self.run.max_update_ratio)

    def _reject(self, record: RoundRecord, a: Assignment | None, reason: str) -> None:
        entry = {"node_id": None if a is None else a.node.node_id,
                 "partition_id": None if a is None else a.node.partition_id, "reason": reason}
        record.rejected.append(entry)
        log.warning("round %d: rejected reply of node %s: %s", record.round, entry["node_id"], reason)

    # --- federated evaluation (fraction-evaluate > 0) -----------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """A share of the connected nodes evaluates this round's model, full and one random subnet
        at N/2 each, on the held-out part of its own data."""
        self._eval_sent = []
        if self.run.fraction_evaluate <= 0:
            return []
        rnd = server_round + self.round_offset
        nodes = sorted((self.nodes[n] for n in grid.get_node_ids() if n in self.nodes),
                       key=lambda n: (n.partition_id, n.node_id))
        if not nodes:
            return []
        rng = generator(self.run.seed, Stream.FED_EVAL, rnd)
        count = max(1, math.ceil(self.run.fraction_evaluate * len(nodes)))
        nodes = [nodes[i] for i in sorted(rng.choice(len(nodes), min(count, len(nodes)), replace=False))]
        keep = quarters_of(self.cfg.n_blocks, 2)
        payload = to_record(encode({k: v.astype(np.float32, copy=False) for k, v in to_numpy(arrays).items()},
                                   self.run.wire_dtype))
        nonce = secrets.randbits(62)
        messages = []
        for node in nodes:
            bp = sample_blueprints(self.cfg, 1, keep, seed=int(rng.integers(2**31)), round=rnd, allow_partial=True)[0]
            cfg_rec = ConfigRecord({"server-round": rnd, "nonce": nonce, "model-config": self.cfg.to_json(),
                                    "eval-keep": keep, **bp.to_config()})
            msg = Message(content=RecordDict({"arrays": payload, "config": cfg_rec}),
                          message_type=MessageType.EVALUATE, dst_node_id=node.node_id, ttl=self.run.round_timeout)
            self._eval_sent.append((msg, node, nonce))
            messages.append(msg)
        self.records.setdefault(rnd, RoundRecord(round=rnd)).bytes_down += record_bytes(payload) * len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Token-weighted mean loss over the nodes that answered (its exp the perplexity), and the
        spread of the nodes' own perplexities; a bad reply is recorded, never averaged."""
        if not self._eval_sent:
            return None
        rnd = server_round + self.round_offset
        record = self.records.setdefault(rnd, RoundRecord(round=rnd))
        sent = {m.metadata.message_id: (node, nonce) for m, node, nonce in self._eval_sent}
        keep = quarters_of(self.cfg.n_blocks, 2)
        per_node, rejected = [], []
        for reply in replies:
            node, nonce = sent.pop(reply.metadata.reply_to_message_id, (None, None))
            try:
                if node is None or reply.metadata.src_node_id != node.node_id:
                    raise ValueError("reply to an unknown evaluate message, or from another node")
                if reply.has_error():
                    raise ValueError(f"error reply (code {reply.error.code}): {reply.error.reason}")
                m = reply.content["metrics"]
                if int(m["server-round"]) != rnd or int(m["nonce"]) != nonce:
                    raise ValueError("stale or foreign evaluate reply")
                vals = {k: float(m[k]) for k in ("loss-full", f"loss-keep-{keep}", "num-tokens")}
                if not all(math.isfinite(v) for v in vals.values()) or vals["num-tokens"] <= 0:
                    raise ValueError(f"non-finite or empty evaluation {vals}")
                per_node.append({"partition_id": node.partition_id, **vals})
            except Exception as e:  # noqa: BLE001 - a bad evaluate reply is recorded, never raised
                rejected.append({"partition_id": None if node is None else node.partition_id, "reason": str(e)})
        for node, _ in sent.values():
            rejected.append({"partition_id": node.partition_id, "reason": "no reply before the round timeout"})
        if not per_node:
            record.fed_eval = {"nodes": 0, "rejected": rejected}
            return None
        w = np.array([p["num-tokens"] for p in per_node])
        out: dict[str, Any] = {"nodes": len(per_node), "tokens": int(w.sum()), "rejected": rejected}
        for name, key in (("full", "loss-full"), (f"keep-{keep}", f"loss-keep-{keep}")):
            losses = np.array([p[key] for p in per_node])
            ppl = np.exp(losses)
            out[name] = {"ppl": float(np.exp(np.average(losses, weights=w))), "min": float(ppl.min()),
                         "max": float(ppl.max())}
        record.fed_eval = out
        log.info("round %d: federated evaluation on %d nodes' own text: perplexity %.3f (full; nodes %.3f..%.3f), "
                 "%.3f (keep %d)", rnd, len(per_node), out["full"]["ppl"], out["full"]["min"], out["full"]["max"],
                 out[f"keep-{keep}"]["ppl"], keep)
        return MetricRecord({"fed-ppl-full": out["full"]["ppl"], f"fed-ppl-keep-{keep}": out[f"keep-{keep}"]["ppl"],
                             "num-nodes": len(per_node)})

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue (with `outer.state_arrays()`): node modes are
        re-learnt; counters are kept."""
        return {"failed_rounds": self.failed_rounds}

    def restore(self, state: dict[str, Any], outer_arrays: dict[str, np.ndarray] | None) -> None:
        """Continue from a checkpoint's `state()` and outer-step state."""
        self.failed_rounds = int(state.get("failed_rounds", 0))
        self.outer.load_state_arrays(outer_arrays or {})

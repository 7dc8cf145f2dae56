"""The ClientApp's logic: turn a TRAIN message into a local update and a reply, and answer the
server's node-info query. Flower glue over `node.local_update`; `client_app/` only wires it."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..core.blueprint import Blueprint
from ..core.config import RUN_MODES, TOKENIZER_VOCAB, GPTConfig, RunConfig, parse_mode
from ..core.node import LocalTask, MomentStore, local_evaluate, local_update, node_split
from ..core.train import MOMENTS, pick_device, reuse_freed_memory
from ..core.wire import decode, encode
from .records import record_bytes, to_numpy, to_record

FAULTS_ENV = "TWIST_FL_ENABLE_FAULTS"


def node_mode(run: RunConfig, node_config: dict[str, Any]) -> str:
    """The node's mode: node config `twist-mode` wins; else the run's mode, where `hybrid`
    alternates true (even partition ids) and masked (odd)."""
    raw = node_config.get("twist-mode", "")
    mode = run.mode if raw == "" else parse_mode(raw, "node config twist-mode", RUN_MODES)
    if mode == "hybrid":
        mode = "masked" if int(node_config.get("partition-id", 0)) % 2 else "true"
    return mode


def _partition(context: Context) -> tuple[int, int]:
    pid = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", 1))
    if not 0 <= pid < num:
        raise ValueError(f"node config partition-id={pid} is outside 0..{num - 1} (num-partitions={num})")
    return pid, num


def node_capacity(node_config: dict[str, Any]) -> float:
    """The node config's `twist-capacity`: the largest share of each layer's blocks this node
    can hold, in (0, 1]; 1 (no limit) when absent."""
    raw = node_config.get("twist-capacity", 1.0)
    try:
        cap = float(raw)
    except (TypeError, ValueError):
        cap = float("nan")
    if not 0.0 < cap <= 1.0:
        raise ValueError(f"node config twist-capacity={raw!r} is not allowed; allowed: a number in (0, 1]")
    return cap


def handle_query(msg: Message, context: Context, run: RunConfig) -> Message:
    pid, num = _partition(context)
    info = ConfigRecord({"twist-mode": node_mode(run, dict(context.node_config)), "partition-id": pid,
                         "num-partitions": num, "device": str(pick_device(run.device)),
                         "capacity": node_capacity(dict(context.node_config))})
    return Message(content=RecordDict({"node-info": info}), reply_to=msg)


def handle_train(msg: Message, context: Context, run: RunConfig) -> Message:
    cfg_rec = msg.content["config"]
    bp = Blueprint.from_config(cfg_rec)
    mode = parse_mode(cfg_rec["mode"], "message mode")
    rnd = int(cfg_rec["server-round"])
    pid, num = _partition(context)
    cfg = GPTConfig.from_dict(json.loads(str(cfg_rec["model-config"])))  # the server's architecture
    if cfg.vocab_size != TOKENIZER_VOCAB[run.tokenizer]:
        raise ValueError(f"the model has vocab_size {cfg.vocab_size} but this node's tokenizer {run.tokenizer!r} "
                         f"has {TOKENIZER_VOCAB[run.tokenizer]}")
    bp.validate(cfg)
    tokens, _ = node_split(run, num, pid)
    store, moments, step = None, None, 0
    if run.optimizer_state == "keep":
        store = MomentStore.at(str(context.node_config.get("twist-state-dir", "")), str(cfg_rec.get("run-uid", "")),
                               pid)
        moments, step = _load_moments(context, rnd)
        if moments is None and store is not None:  # a new Flower run: a resumed one finds them on disk
            moments, step = store.load(before_round=rnd)
    received = msg.content["arrays"]
    if run.reuse_freed_memory:
        reuse_freed_memory()
    t_train = time.perf_counter()
    task = LocalTask(cfg=cfg, blueprint=bp, mode=mode, round=rnd, partition_id=pid, lr=float(cfg_rec["lr"]),
                     local_steps=int(cfg_rec["local-steps"]))
    result = local_update(task, run=run, arrays=decode(to_numpy(received), run.wire_dtype), tokens=tokens,
                          moments=moments, moment_step=step)
    if result.moments is not None:
        _store_moments(context, result.moments, result.moment_step, rnd)
        if store is not None:
            store.save(rnd, result.moments, result.moment_step)
    arrays, metrics = encode(result.arrays, run.wire_dtype), dict(result.metrics)
    metrics["train-s"] = time.perf_counter() - t_train  # model build, local steps and moments
    if os.environ.get(FAULTS_ENV) == "1" and context.node_config.get("twist-fault"):
        from .faults import fault_for_round, inject

        kind = fault_for_round(str(context.node_config["twist-fault"]), rnd)
        arrays, metrics = inject(kind, arrays, metrics, rnd, float(context.node_config.get("twist-hang-s", 3600)))
    out = to_record(arrays)
    metrics.update({"server-round": metrics.get("server-round", rnd), "nonce": metrics.get("nonce", cfg_rec["nonce"]),
                    "bytes-received": record_bytes(received), "bytes-sent": record_bytes(out)})
    return Message(content=RecordDict({"arrays": out, "metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, run: RunConfig) -> Message:
    """Evaluate the round's model, full and the subnet the message names, on this node's
    held-out text (fraction-evaluate)."""
    cfg_rec = msg.content["config"]
    pid, num = _partition(context)
    cfg = GPTConfig.from_dict(json.loads(str(cfg_rec["model-config"])))
    bp = Blueprint.from_config(cfg_rec)
    bp.validate(cfg)
    _, held_out = node_split(run, num, pid)
    if held_out is None:
        raise ValueError("this run holds no text out on the nodes (fraction-evaluate=0)")
    res = local_evaluate(run, cfg, decode(to_numpy(msg.content["arrays"]), run.wire_dtype), bp, held_out)
    keep = int(cfg_rec["eval-keep"])
    metrics = MetricRecord({"loss-full": res["loss-full"], f"loss-keep-{keep}": res["loss-sub"],
                            "num-tokens": res["num-tokens"], "server-round": int(cfg_rec["server-round"]),
                            "nonce": int(cfg_rec["nonce"])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _load_moments(context: Context, before_round: int) -> tuple[dict[str, dict[str, torch.Tensor]] | None, int]:
    """The moments this node's context holds from an earlier round of this Flower run."""
    state = context.state
    if "twist-opt-meta" not in state or int(state["twist-opt-meta"].get("round", 0)) >= before_round:
        return None, 0
    step = int(state["twist-opt-meta"]["step"])
    return {m: {k: torch.from_numpy(v) for k, v in to_numpy(state[f"twist-opt-{m}"]).items()} for m in MOMENTS}, step


def _store_moments(context: Context, moments: dict[str, dict[str, torch.Tensor]], step: int, round_: int) -> None:
    for m in MOMENTS:
        arrays = {k: v.numpy().astype(np.float32, copy=False) for k, v in moments[m].items()}  # to_record copies
        context.state[f"twist-opt-{m}"] = to_record(arrays)
    context.state["twist-opt-meta"] = ConfigRecord({"step": step, "round": round_})


def make_client_app(overrides: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp reading `[tool.flwr.app.config]`, with `overrides` on top (run_simulation
    gives an empty run config, so the sweep CLI and tests pass theirs here)."""
    app = ClientApp()
    ov = dict(overrides or {})

    def run_of(context: Context) -> RunConfig:
        return RunConfig.from_flat({**dict(context.run_config), **ov})

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context, run_of(context))

    def threads(context: Context) -> None:
        if "num-threads" in context.node_config:  # e.g. several SuperNodes sharing one machine
            torch.set_num_threads(int(context.node_config["num-threads"]))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        threads(context)
        return handle_evaluate(msg, context, run_of(context))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        threads(context)
        return handle_train(msg, context, run_of(context))

    return app


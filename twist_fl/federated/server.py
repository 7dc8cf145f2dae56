"""The ServerApp's work: build the model and strategy from the run config, run Flower's round
loop, evaluate, checkpoint every round, and write the run folder (`core.runs`)."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..core.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from ..core.config import FLOWER_STRATEGIES, TOKENIZER_VOCAB, RunConfig
from ..core.data import check_split, eval_windows, load_tokens
from ..core.io import staged_folder
from ..core.model import initial_model, load_state_strict
from ..core.node import partition_stats
from ..core.runs import Evaluator, RunFolder, describe, summarize
from ..core.scalars import ScalarLog
from ..core.train import reuse_freed_memory
from .records import to_numpy, to_record
from .strategy import TwistStrategy

log = logging.getLogger(__name__)

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"resume_from", "num_server_rounds", "eval_every", "eval_keeps", "eval_draws", "eval_tokens",
                     "out_dir", "run_name", "round_timeout", "node_wait_timeout", "min_nodes", "device",
                     "max_failed_rounds", "tensorboard"}


def _config_fingerprint(run: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in run.to_flat().items() if k.replace("-", "_") not in RESUMABLE_CHANGES}


def run_server(grid: Grid, run: RunConfig) -> dict[str, Any]:
    """Everything the ServerApp does; returns the summary written to summary.json. The run
    folder is locked against other writers for as long as this runs."""
    folders: list[RunFolder] = []
    try:
        return _run_server(grid, run, folders)
    finally:
        for f in folders:
            f.release()


def _run_server(grid: Grid, run: RunConfig, folders: list[RunFolder]) -> dict[str, Any]:
    t_start = time.time()
    if run.strategy not in FLOWER_STRATEGIES:
        raise ValueError(f"run-config strategy={run.strategy!r} is not a Flower strategy; allowed: "
                         f"{list(FLOWER_STRATEGIES)} (data-parallel training runs with `twist-fl ddp`)")
    if run.reuse_freed_memory:  # as nodes do: the server's copies and accumulators are as large as a model
        reuse_freed_memory()
    model = initial_model(run)
    cfg = model.cfg
    run = run.as_trained(cfg)
    run.check_model(cfg)
    if cfg.vocab_size != TOKENIZER_VOCAB[run.tokenizer]:
        raise ValueError(f"run-config tokenizer={run.tokenizer!r} has {TOKENIZER_VOCAB[run.tokenizer]} tokens but the "
                         f"model (init-from={run.init_from!r}) has vocab_size {cfg.vocab_size}")
    splits = load_tokens(run.dataset, run.tokenizer, run.data_path or None)
    check_split(splits["train"], run.seq_len, "train", min_windows=run.min_nodes)
    check_split(splits["valid"], run.seq_len, "valid")
    windows = eval_windows(splits["valid"].tokens, run.seq_len, run.eval_tokens or None)
    evaluator = Evaluator(cfg, run, windows)  # checks the precision on this device

    start_round = 0
    resumed_state: dict[str, Any] | None = None
    recorded: dict[str, Any] = {}  # config.json's entries beyond the run config
    if run.resume_from:  # every check before anything is written: a refused resume changes nothing
        folder = RunFolder.existing(run.resume_from)
        folders.append(folder)
        previous = folder.read_config()  # refused when it cannot be read
        named = run.run_name and run.run_name != folder.path.name
        placed = run.out_dir != RunConfig().out_dir and Path(run.out_dir).expanduser().resolve() != folder.path.parent
        if named or placed:
            log.warning("resume: out-dir=%r run-name=%r are ignored; the run keeps its folder %s", run.out_dir,
                        run.run_name, folder.path)
        run = run.replace(out_dir=str(folder.path.parent), run_name=folder.path.name)
        recorded_rounds = folder.recorded_rounds()  # a damaged metrics.jsonl is refused here
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

        def fits(rnd: int, weights: dict[str, Any]) -> str | None:
            if rnd > recorded_rounds:
                return f"metrics.jsonl records rounds 1..{recorded_rounds} only, not round {rnd}"
            got = {k: tuple(v.shape) for k, v in weights.items()}
            return None if got == shapes else "its tensors do not fit the model (names or shapes differ)"

        start_round, weights, state = load_checkpoint(folder.path, fits)
        newest = folder.newest_checkpoint_round()
        if start_round != newest:
            log.warning("resume: %s resumes from round %d, its newest checkpoint that verifies and that metrics.jsonl "
                        "records (the newest, round %s, does not); rounds after %d are trained again", folder.path,
                        start_round, newest, start_round)
        # A key newer than the checkpoint is read as its default there (it did not exist, so the
        # run behaved as its default does): runs checkpointed by an earlier version still resume.
        new = _config_fingerprint(run)
        defaults = _config_fingerprint(RunConfig())
        old = {**{k: defaults[k] for k in new if k in defaults}, **state.get("config", {})}
        if old != new:
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
            raise ValueError(f"resume-from={run.resume_from!r}: the run config differs from the checkpoint's in "
                             f"{diff} (key: (checkpoint, now)); only {sorted(RESUMABLE_CHANGES)} may change")
        if start_round > run.num_server_rounds or (start_round == run.num_server_rounds
                                                   and (folder.path / "summary.json").is_file()):
            raise ValueError(f"resume-from={run.resume_from!r} has finished round {start_round}, and "
                             f"num-server-rounds={run.num_server_rounds} asks for no round after it; raise "
                             "num-server-rounds to train on")
        run_uid = state.get("run_uid") or uuid.uuid4().hex
        if "run_uid" not in state:
            log.warning("the checkpoint records no run uid: nodes will not find optimizer moments they stored")
        load_state_strict(model, {k: torch.from_numpy(v) for k, v in weights.items()})
        restore_rng_states(state["rng"])
        resumed_state = state
        folder.truncate_after(start_round)
        if previous.get("init_order"):
            recorded["init_order"] = previous["init_order"]
        log.info("resuming %s from round %d of %d", folder.path, start_round, run.num_server_rounds)
    else:
        folder = RunFolder.new(run)
        folders.append(folder)
        run_uid = uuid.uuid4().hex  # nodes key the optimizer moments they store (twist-state-dir) by it
    if run.init_order and not run.resume_from:  # a resumed run's checkpoint holds the ordered weights
        from ..core.data import calibration_windows
        from ..core.importance import order_blocks

        model, order = order_blocks(model, run.init_order, calibration_windows(splits["train"].tokens, run.seq_len))
        recorded["init_order"] = {"method": run.init_order, "order": order}
        log.info("init-order %s: each layer's blocks sorted by importance, most important first (heads of layer 1: "
                 "%s)", run.init_order, order["heads"][min(1, cfg.n_layer - 1)])
    # A resumed run records its config once its first checkpoint is written: a resume that fails
    # before that (a full disk, a refused node) leaves every file of the run folder as it was.
    config_pending = run.resume_from != ""

    def record_config(**extra: Any) -> None:
        nonlocal config_pending
        recorded.update(extra)
        if not config_pending:
            folder.write_config(run, cfg, run_uid, **recorded)

    record_config()

    partitions: dict[str, list[dict[str, Any]]] = {}

    def on_partitions(num: int) -> None:
        """Every node's share of the training data, logged and recorded in config.json before
        round 1 trains; a share too small for seq-len stops the run here, naming the node."""
        stats = partition_stats(run, num)
        partitions[str(num)] = stats
        log.info("data of %d nodes (partitioning %s): %s", num, run.partitioning, "; ".join(
            f"node {r['partition']}: {r['tokens']:,} tokens" + (f", {r['characters']} roles, {r['plays']} plays"
                                                                  if "characters" in r else "") for r in stats))
        record_config(partitions=partitions)

    def fail(message: str) -> None:
        """End the run without a trained model: summary.json says so, and no model/ is written."""
        summary = summarize(folder, run, cfg, splits, time.time() - t_start, extra={"status": "failed"})
        raise RunFailed(f"{message}. Run folder: {summary['run_folder']}")

    curves = ScalarLog(folder.path, run.local_steps, first_round=start_round + 1) if run.tensorboard else None
    strategy = TwistStrategy(cfg, run, round_offset=start_round, run_uid=run_uid, on_partitions=on_partitions)
    if resumed_state is not None:  # counters and the outer step's state continue where the checkpoint left them
        strategy.restore(resumed_state.get("strategy", {}), resumed_state.get("extra_arrays"))
    last = run.num_server_rounds

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = server_round + start_round
        if server_round == 0:
            return None
        rec = strategy.records.get(rnd)
        state = to_numpy(arrays)
        row: dict[str, Any] = {"round": rnd, "train_loss": rec.train_loss if rec else None,
                               "lr": rec.lr if rec else None, "updated": bool(rec and rec.updated),
                               "wall_s": round(rec.wall_s, 3) if rec else None,
                               "bytes_down_total": rec.bytes_down if rec else 0,
                               "bytes_up_total": rec.bytes_up if rec else 0,
                               "nodes": rec.nodes if rec else [], "rejected": rec.rejected if rec else []}
        if not row["updated"]:
            row["failed"] = (rec.failed if rec else None) or "the round produced no update"
        if rec and rec.fed_eval is not None:
            row["fed_eval"] = rec.fed_eval
        n = max(1, len(row["nodes"]))
        row["bytes_down_per_node"] = row["bytes_down_total"] / n
        row["bytes_up_per_node"] = row["bytes_up_total"] / n
        if rnd % run.eval_every == 0 or rnd == last:
            t = time.monotonic()
            row["valid"] = evaluator(state)
            row["eval_s"] = round(time.monotonic() - t, 3)
            log.info("round %d: %s", rnd, describe(row["valid"]))
        row["time"] = round(time.time(), 3)
        size = folder.append(row)
        try:
            save_checkpoint(folder.path, rnd, state, {"config": _config_fingerprint(run), "rng": rng_states(),
                                                      "strategy": strategy.state(), "run_uid": run_uid},
                            extra_arrays=strategy.outer.state_arrays())
        except Exception:
            folder.truncate_to(size)  # no row without its checkpoint
            raise
        nonlocal config_pending
        if config_pending:
            config_pending = False
            record_config()
        if curves is not None:  # the row is final: its checkpoint is written
            curves.row(row)
        if strategy.stop_reason:
            fail(strategy.stop_reason)
        flat = {"train-loss": row["train_loss"] or 0.0}
        if "valid" in row:
            flat["valid-ppl"] = row["valid"]["full"]["ppl"]
        return MetricRecord(flat)

    arrays = to_record({k: v.detach().numpy() for k, v in model.state_dict().items()})
    try:
        if start_round < run.num_server_rounds:
            result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=run.num_server_rounds - start_round,
                                    timeout=run.round_timeout, evaluate_fn=on_round_end)
            arrays = result.arrays or arrays
    finally:
        if curves is not None:
            curves.close()
    extra = {"tensorboard_s": round(curves.seconds, 3)} if curves is not None else {}
    rows = folder.rows()
    failed = [r for r in rows if not r["updated"]]
    if rows and (not rows[-1]["updated"] or len(failed) == len(rows)):  # no trained model to present
        which = "every round" if len(failed) == len(rows) else f"the last round ({rows[-1]['round']})"
        fail(f"the run failed: {which} produced no update, so there is no trained model (no model/ written). "
             "Failed rounds: " + "; ".join(f"round {r['round']}: {r.get('failed')}" for r in failed[-5:]))
    final_state = {k: torch.from_numpy(v) for k, v in to_numpy(arrays).items()}
    load_state_strict(model, final_state)
    with staged_folder(folder.path / "model") as tmp:  # model/ appears whole or not at all
        model.save(tmp, extra={"run": run.to_flat()})
    return summarize(folder, run, cfg, splits, time.time() - t_start, extra=extra)


class RunFailed(RuntimeError):
    """A run that ended without a trained model: its last round, or every round, had no update."""


def flower_logs_once() -> None:
    """Flower's log lines printed once: its logger has its own console handler and also passes
    every line to the root logger, which a command line (logging.basicConfig) or Hydra gives a
    handler too. Stops the second copy (importing Flower's logger first, which sets it up)."""
    import flwr.common.logger  # noqa: F401 - configures the "flwr" logger on first import

    logging.getLogger("flwr").propagate = False


def route_logs_to_flower() -> None:
    """Send the library's INFO logs through Flower's handlers, so they reach `flwr run --stream`
    and `flwr log` without turning on every other library's INFO logs."""
    lib = logging.getLogger("twist_fl")
    lib.setLevel(logging.INFO)
    for handler in logging.getLogger("flwr").handlers:
        if handler not in lib.handlers:
            lib.addHandler(handler)
    lib.propagate = False


def make_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp reading `[tool.flwr.app.config]`, with `overrides` on top."""
    app = ServerApp()
    ov = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        route_logs_to_flower()
        run_server(grid, RunConfig.from_flat({**dict(context.run_config), **ov}))

    return app


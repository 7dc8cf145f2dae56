"""The ServerApp's work: build the model and strategy from the run config, run Flower's round
loop, evaluate, checkpoint every round, and write the run folder.

Run folder `out-dir/<run-name>/`: `config.json` (resolved run config and model config),
`metrics.jsonl` (one line per round), `checkpoints/`, `model/` (final model, core save format),
`summary.json`, `rounds.png`, `keeps.png`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..core.blocks import param_counts, slice_state
from ..core.blueprint import sample_blueprints
from ..core.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from ..core.config import TOKENIZER_VOCAB, GPTConfig, RunConfig
from ..core.data import check_split, eval_windows, load_tokens, unigram_perplexity
from ..core.io import atomic_write_text
from ..core.model import GPT, initial_model, load_state_strict
from ..core.report import final_table, plot_keeps, plot_rounds
from ..core.rng import Stream
from ..core.train import evaluate, pick_device, reuse_freed_memory
from .records import to_numpy, to_record
from .strategy import TwistStrategy

log = logging.getLogger(__name__)

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"resume_from", "num_server_rounds", "eval_every", "eval_keeps", "eval_draws", "eval_tokens",
                     "out_dir", "run_name", "round_timeout", "node_wait_timeout", "min_nodes", "device"}


class Evaluator:
    """Validation perplexity of the full model and of random subnets at each eval keep."""

    def __init__(self, cfg: GPTConfig, run: RunConfig, windows: np.ndarray):
        self.cfg, self.run, self.windows = cfg, run, windows
        self.device = pick_device(run.device)
        # The same draws at every evaluation, so curves over rounds compare like with like.
        self.draws = {k: [sample_blueprints(cfg, 1, k, seed=run.seed, round=d, allow_partial=True,
                                            stream=Stream.EVAL_DRAWS)[0]
                          for d in range(run.eval_draws)] for k in run.eval_keeps_for(cfg)}

    def __call__(self, state: dict[str, np.ndarray]) -> dict[str, Any]:
        torch_state = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
        full = GPT.from_state(self.cfg, torch_state)
        out: dict[str, Any] = {"full": evaluate(full.to(self.device), self.windows)}
        for k, bps in self.draws.items():
            ppl = []
            for bp in bps:
                sub = GPT.from_state(self.cfg, slice_state(torch_state, self.cfg, bp), blueprint=bp)
                ppl.append(evaluate(sub.to(self.device), self.windows)["ppl"])
            out[f"keep-{k}"] = {"mean": float(np.mean(ppl)), "std": float(np.std(ppl)), "draws": ppl}
        return out


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.metrics = path / "metrics.jsonl"

    def rows(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def truncate_after(self, round_: int) -> None:
        """Drop metric lines of rounds after the checkpoint a resumed run starts from."""
        keep = [r for r in self.rows() if r["round"] <= round_]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    def append(self, row: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def _config_fingerprint(run: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in run.to_flat().items() if k.replace("-", "_") not in RESUMABLE_CHANGES}


def run_server(grid: Grid, run: RunConfig) -> dict[str, Any]:
    """Everything the ServerApp does; returns the summary written to summary.json."""
    t_start = time.time()
    if run.reuse_freed_memory:  # as nodes do: the server's copies and accumulators are as large as a model
        reuse_freed_memory()
    model = initial_model(run)
    cfg = model.cfg
    run.check_model(cfg)
    if cfg.vocab_size != TOKENIZER_VOCAB[run.tokenizer]:
        raise ValueError(f"run-config tokenizer={run.tokenizer!r} has {TOKENIZER_VOCAB[run.tokenizer]} tokens but the "
                         f"model (init-from={run.init_from!r}) has vocab_size {cfg.vocab_size}")
    splits = load_tokens(run.dataset, run.tokenizer, run.data_path or None)
    check_split(splits["train"], run.seq_len, "train", min_windows=run.min_nodes)
    check_split(splits["valid"], run.seq_len, "valid")
    windows = eval_windows(splits["valid"].tokens, run.seq_len, run.eval_tokens or None)

    start_round = 0
    if run.resume_from:
        folder = RunFolder(Path(run.resume_from).expanduser().resolve())
        start_round, weights, state = load_checkpoint(folder.path)
        if state.get("config") != _config_fingerprint(run):
            old, new = state.get("config", {}), _config_fingerprint(run)
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
            raise ValueError(f"resume-from={run.resume_from!r}: the run config differs from the checkpoint's in "
                             f"{diff} (key: (checkpoint, now)); only {sorted(RESUMABLE_CHANGES)} may change")
        load_state_strict(model, {k: torch.from_numpy(v) for k, v in weights.items()})
        restore_rng_states(state["rng"])
        folder.truncate_after(start_round)
        log.info("resuming %s from round %d", folder.path, start_round)
    else:
        folder = RunFolder(Path(run.out_dir).expanduser().resolve() / (run.run_name or run.default_run_name()))
        if folder.rows():
            raise ValueError(f"{folder.path} already holds a run; choose another run-name or resume-from it")
    atomic_write_text(folder.path / "config.json", json.dumps(
        {"run": run.to_flat(), "model": cfg.to_dict()}, indent=2))
    log.info("run folder: %s", folder.path)

    strategy = TwistStrategy(cfg, run, round_offset=start_round)
    evaluator = Evaluator(cfg, run, windows)
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
        n = max(1, len(row["nodes"]))
        row["bytes_down_per_node"] = row["bytes_down_total"] / n
        row["bytes_up_per_node"] = row["bytes_up_total"] / n
        if rnd % run.eval_every == 0 or rnd == last:
            t = time.monotonic()
            row["valid"] = evaluator(state)
            row["eval_s"] = round(time.monotonic() - t, 3)
            log.info("round %d: validation perplexity %.3f (full)%s", rnd, row["valid"]["full"]["ppl"],
                     "".join(f", {v['mean']:.3f} ± {v['std']:.3f} ({k})" for k, v in row["valid"].items()
                             if k != "full"))
        row["time"] = round(time.time(), 3)
        folder.append(row)
        save_checkpoint(folder.path, rnd, state, {"config": _config_fingerprint(run), "rng": rng_states(),
                                                  "strategy": strategy.state()})
        flat = {"train-loss": row["train_loss"] or 0.0}
        if "valid" in row:
            flat["valid-ppl"] = row["valid"]["full"]["ppl"]
        return MetricRecord(flat)

    arrays = to_record({k: v.detach().numpy() for k, v in model.state_dict().items()})
    if start_round < run.num_server_rounds:
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=run.num_server_rounds - start_round,
                                timeout=run.round_timeout, evaluate_fn=on_round_end)
        arrays = result.arrays or arrays
    final_state = {k: torch.from_numpy(v) for k, v in to_numpy(arrays).items()}
    load_state_strict(model, final_state)
    model.save(folder.path / "model", extra={"run": run.to_flat()})
    return _summarize(folder, run, cfg, splits, time.time() - t_start)


def _summarize(folder: RunFolder, run: RunConfig, cfg: GPTConfig, splits, wall_s: float) -> dict[str, Any]:
    rows = folder.rows()
    evals = [r for r in rows if r.get("valid")]
    final = evals[-1]["valid"] if evals else {}
    n_total = cfg.n_blocks
    params = {"full": param_counts(cfg)["params"]}
    for k in run.eval_keeps_for(cfg):
        bp = sample_blueprints(cfg, 1, k, seed=0, round=0, allow_partial=True)[0]
        params[f"keep-{k}"] = param_counts(cfg, bp)["params"]
    summary = {
        "run_folder": str(folder.path), "strategy": run.strategy, "keep": run.keep_for(cfg), "n_blocks": n_total,
        "rounds": len(rows), "wall_s_this_process": round(wall_s, 1),
        "round_wall_s_total": round(sum(r["wall_s"] or 0 for r in rows), 1),
        "unigram_ppl_valid": unigram_perplexity(splits["train"].tokens, splits["valid"].tokens, cfg.vocab_size),
        "final": final, "params": params,
        "bytes_down_total": sum(r["bytes_down_total"] for r in rows),
        "bytes_up_total": sum(r["bytes_up_total"] for r in rows),
        "rejected_replies": sum(len(r["rejected"]) for r in rows),
        "rounds_without_update": [r["round"] for r in rows if not r["updated"]],
        "run": run.to_flat(), "model": cfg.to_dict(),
    }
    title = f"{run.strategy}, keep {run.keep_for(cfg)}/{n_total}, {run.dataset}"
    plot_rounds(rows, folder.path / "rounds.png", title)
    if final:
        plot_keeps(final, n_total, folder.path / "keeps.png", title)
    atomic_write_text(folder.path / "summary.json", json.dumps(summary, indent=2))
    if final:
        log.info("final validation perplexity (unigram baseline %.2f):\n%s", summary["unigram_ppl_valid"],
                 final_table(final, n_total, params))
    log.info("run folder: %s (%d rounds, %d rejected replies)", folder.path, len(rows), summary["rejected_replies"])
    return summary


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


"""A run folder and what is written into it, shared by the Flower ServerApp and the DDP baseline:
validation of the full model and of random subnets, metrics.jsonl rows, summary.json and plots.

Run folder `out-dir/<run-name>/`: `config.json` (resolved run config and model config),
`metrics.jsonl` (one line per round), `checkpoints/` (Flower runs), `model/` (final model, core
save format), `summary.json`, `rounds.png`, `keeps.png`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .blocks import param_counts, slice_state
from .blueprint import sample_blueprints
from .config import GPTConfig, RunConfig
from .data import unigram_perplexity
from .io import atomic_write_text
from .model import GPT
from .report import final_table, plot_keeps, plot_rounds
from .rng import Stream
from .train import evaluate, pick_device

log = logging.getLogger(__name__)


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


def describe(valid: dict[str, Any]) -> str:
    """One log line's worth of an evaluation: the full model, then each keep (mean ± std)."""
    return f"validation perplexity {valid['full']['ppl']:.3f} (full)" + "".join(
        f", {v['mean']:.3f} ± {v['std']:.3f} ({k})" for k, v in valid.items() if k != "full")


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.metrics = path / "metrics.jsonl"

    @classmethod
    def new(cls, run: RunConfig) -> RunFolder:
        """The folder of a new run, `out-dir/run-name`; refused when it already holds a run."""
        folder = cls(Path(run.out_dir).expanduser().resolve() / (run.run_name or run.default_run_name()))
        if folder.rows():
            raise ValueError(f"{folder.path} already holds a run; choose another run-name or resume-from it")
        return folder

    def write_config(self, run: RunConfig, cfg: GPTConfig) -> None:
        atomic_write_text(self.path / "config.json", json.dumps({"run": run.to_flat(), "model": cfg.to_dict()},
                                                                indent=2))
        log.info("run folder: %s", self.path)

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


def summarize(folder: RunFolder, run: RunConfig, cfg: GPTConfig, splits, wall_s: float,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write summary.json, rounds.png and keeps.png from metrics.jsonl; log the final table."""
    rows = folder.rows()
    evals = [r for r in rows if r.get("valid")]
    final = evals[-1]["valid"] if evals else {}
    n_total = cfg.n_blocks
    params = {"full": param_counts(cfg)["params"]}
    for k in run.eval_keeps_for(cfg):
        bp = sample_blueprints(cfg, 1, k, seed=0, round=0, allow_partial=True)[0]
        params[f"keep-{k}"] = param_counts(cfg, bp)["params"]
    summary = {
        "run_folder": str(folder.path), "strategy": run.strategy, "keep": run.trained_keep(cfg), "n_blocks": n_total,
        "rounds": len(rows), "wall_s_this_process": round(wall_s, 1),
        "round_wall_s_total": round(sum(r["wall_s"] or 0 for r in rows), 1),
        "unigram_ppl_valid": unigram_perplexity(splits["train"].tokens, splits["valid"].tokens, cfg.vocab_size),
        "final": final, "params": params,
        "bytes_down_total": sum(r["bytes_down_total"] for r in rows),
        "bytes_up_total": sum(r["bytes_up_total"] for r in rows),
        "rejected_replies": sum(len(r["rejected"]) for r in rows),
        "rounds_without_update": [r["round"] for r in rows if not r["updated"]],
        "run": run.to_flat(), "model": cfg.to_dict(), **(extra or {}),
    }
    title = f"{run.strategy}, keep {run.trained_keep(cfg)}/{n_total}, {run.dataset}"
    plot_rounds(rows, folder.path / "rounds.png", title)
    if final:
        plot_keeps(final, n_total, folder.path / "keeps.png", title)
    atomic_write_text(folder.path / "summary.json", json.dumps(summary, indent=2))
    if final:
        log.info("final validation perplexity (unigram baseline %.2f):\n%s", summary["unigram_ppl_valid"],
                 final_table(final, n_total, params))
    log.info("run folder: %s (%d rounds, %d rejected replies)", folder.path, len(rows), summary["rejected_replies"])
    return summary

"""A run folder and what is written into it, shared by the Flower ServerApp and the DDP baseline:
validation of the full model and of random subnets, metrics.jsonl rows, summary.json and plots.

Run folder `out-dir/<run-name>/`: `config.json` (resolved run config and model config),
`metrics.jsonl` (one line per round), `checkpoints/` (Flower runs), `model/` (final model, core
save format), `summary.json`, `rounds.png`, `keeps.png`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .blocks import param_counts, slice_state
from .blueprint import Blueprint, sample_blueprints
from .config import GPTConfig, RunConfig
from .data import unigram_perplexity
from .io import (
    HolderLock,
    WriteError,
    atomic_write_text,
    check_not_input,
    is_result_folder,
    json_line,
    lock_path,
    write_json,
)
from .model import GPT
from .policy import deploy_blueprints
from .precision import precision_scope, resolve_precision
from .report import final_table, plot_keeps, plot_rounds
from .rng import Stream
from .train import evaluate, pick_device

log = logging.getLogger(__name__)


class Evaluator:
    """Validation perplexity of the full model and of random subnets at each eval keep; of the
    model alone when it is a pruned subnet (`blueprint`: a recovery fine-tune)."""

    def __init__(self, cfg: GPTConfig, run: RunConfig, windows: np.ndarray, blueprint: Blueprint | None = None):
        self.cfg, self.run, self.windows, self.blueprint = cfg, run, windows, blueprint
        self.device = pick_device(run.device)
        self.precision = resolve_precision(run.precision, self.device)  # fp16 on a CPU is refused here
        # The same draws at every evaluation, so curves over rounds compare like with like; the
        # subnets the run's policy deploys (the nested prefix for `ordered`, random draws otherwise).
        self.draws = {k: deploy_blueprints(cfg, run.subnet_policy, k, run.seed, run.eval_draws, Stream.EVAL_DRAWS,
                                           core=run.core_blocks)
                      for k in run.eval_keeps_for(cfg)} if blueprint is None else {}

    def __call__(self, state: dict[str, np.ndarray]) -> dict[str, Any]:
        with precision_scope(self.precision):
            return self._evaluate(state)

    def _evaluate(self, state: dict[str, np.ndarray]) -> dict[str, Any]:
        torch_state = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
        full = GPT.from_state(self.cfg, torch_state, blueprint=self.blueprint)
        out: dict[str, Any] = {"full": evaluate(full.to(self.device), self.windows)}
        for k, bps in self.draws.items():
            ppl = []
            for bp in bps:
                sub = GPT.from_state(self.cfg, slice_state(torch_state, self.cfg, bp), blueprint=bp)
                ppl.append(evaluate(sub.to(self.device), self.windows)["ppl"])
            out[f"keep-{k}"] = {"mean": float(np.mean(ppl)), "std": float(np.std(ppl)), "draws": ppl}
        return out


def blueprint_keep(cfg: GPTConfig, bp: Blueprint) -> int:
    """The blocks of each kind a pruned subnet keeps per non-shared layer (its largest count)."""
    layers = [i for i in range(cfg.n_layer) if i not in cfg.shared_layer_ids] or list(range(cfg.n_layer))
    return max(len(bp.heads[i]) for i in layers)


def describe(valid: dict[str, Any]) -> str:
    """One log line's worth of an evaluation: the full model, then each keep (mean ± std)."""
    return f"validation perplexity {valid['full']['ppl']:.3f} (full)" + "".join(
        f", {v['mean']:.3f} ± {v['std']:.3f} ({k})" for k, v in valid.items() if k != "full")


class RunFolder:
    """A run folder. `new` makes the folder of a new run; `existing` opens one to resume.

    Both take the folder's writer lock (`lock`): an exclusive `flock` that records its holder
    (`io.HolderLock`; its file is kept outside the run folder, which it never changes), held
    until `release` or the process ends, so a second writer (a concurrent resume, a second run
    of the same name) is refused at once with the holder's PID, and a crashed writer never blocks
    the next one (the kernel drops its lock with the process; the next writer says whose lock it
    took over)."""

    LOCK_FILE = ".lock"  # where runs of earlier versions kept their lock: ignored, never written

    def __init__(self, path: Path):
        self.path = path
        self.metrics = path / "metrics.jsonl"
        self._lock: HolderLock | None = None

    def lock(self) -> RunFolder:
        """Take the folder's writer lock (`io.HolderLock`, its file in the cache's locks/ folder:
        `io.lock_path`); ValueError naming the holder when another process has it."""
        self._lock = HolderLock(lock_path(self.path), f"run folder {self.path}").acquire()
        return self

    def holder(self) -> str | None:
        """The process writing this folder now (its PID, host, start and command), or None."""
        return HolderLock(lock_path(self.path), f"run folder {self.path}").holder()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def clean_leftovers(self) -> None:
        """Remove what a crashed writer left half-made: temporary checkpoint folders and files of
        the atomic writer. Called with the lock held, so no live writer owns them."""
        import shutil

        for tmp in list((self.path / "checkpoints").glob(".tmp-round-*")) + list(self.path.glob(".*.tmp")) \
                + list(self.path.glob(".model-*")) + list(self.path.glob(".*.staged-*")):
            log.info("removing %s, left by a writer that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    @classmethod
    def new(cls, run: RunConfig, resumable: bool = True) -> RunFolder:
        """The folder of a new run, `out-dir/run-name`, created here; refused when it exists
        and is not empty (a run's files are never overwritten: resume it, or choose a name)."""
        out_dir = Path(run.out_dir).expanduser()
        folder = cls(out_dir.resolve() / (run.run_name or run.default_run_name()))
        check_not_input(folder.path, run_inputs(run), "the run folder (out-dir/run-name)")
        for d in (out_dir, *out_dir.parents):
            if d.exists():
                if not d.is_dir():
                    raise ValueError(f"run-config out-dir={run.out_dir!r}: {str(d)!r} is a file, not a folder; choose "
                                     "an out-dir that is a folder or does not exist yet")
                if is_result_folder(d.resolve()):
                    raise ValueError(f"run-config out-dir={run.out_dir!r} is inside the model or run folder "
                                     f"{str(d)!r}; a trained result is never a place for new runs: choose another "
                                     "out-dir")
        def taken() -> bool:
            return folder.path.exists() and (not folder.path.is_dir() or any(
                f.name != cls.LOCK_FILE for f in folder.path.iterdir()))

        if taken():
            raise ValueError(f"run folder {folder.path} already exists and is not empty; choose another run-name"
                             + (f", or continue it with resume-from={str(folder.path)!r} (a Flower run)"
                                if resumable else " (a DDP run is not resumed: start a new one)"))
        try:
            folder.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"run folder {folder.path} cannot be made: {e.strerror or e}") from None
        folder.lock()
        if taken():  # another run of the same name got there between the check and the lock
            folder.release()
            raise ValueError(f"run folder {folder.path} was just created by another run; choose another run-name")
        return folder

    @classmethod
    def existing(cls, path: str, key: str = "resume-from") -> RunFolder:
        """A run folder to resume; refused (nothing created) when it is not one."""
        p = Path(path).expanduser().resolve()
        if not (p / "config.json").is_file() or not (p / "checkpoints").is_dir():
            raise ValueError(f"run-config {key}={path!r} is not a run folder (it needs config.json and "
                             "checkpoints/); resume-from takes the folder of an earlier run")
        folder = cls(p).lock()
        folder.clean_leftovers()
        return folder

    def write_config(self, run: RunConfig, cfg: GPTConfig, run_uid: str = "", **extra: Any) -> None:
        """config.json: the run and model config, the run's uid, where it started, and `extra`
        entries (each node's share of the data by number of partitions, once the nodes have
        reported it; the block order `init-order` applied)."""
        write_json(self.path / "config.json", {"run": run.to_flat(), "model": cfg.to_dict(),
                                               **({"run_uid": run_uid} if run_uid else {}),
                                               **started_from(run),
                                               **{k: v for k, v in extra.items() if v}})
        log.info("run folder: %s", self.path)

    def rows(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl. A last line cut off by a crash is dropped with a warning (the
        round it belonged to is trained again on resume); a bad line before it is an error."""
        if not self.metrics.is_file():
            return []
        lines = [(i, line) for i, line in enumerate(self.metrics.read_text().splitlines(), 1) if line.strip()]
        rows = []
        for i, line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i != lines[-1][0]:
                    raise ValueError(f"{self.metrics} line {i} is not valid JSON ({e}); the file is damaged") from None
                log.warning("%s: dropping its last line, cut off before it was complete (%s)", self.metrics, e)
        return rows

    def read_config(self) -> dict[str, Any]:
        """config.json of an existing run; ValueError naming the file when it cannot be read."""
        f = self.path / "config.json"
        try:
            meta = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{f} cannot be read ({e}); the run's record is damaged, so it is not resumed") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("run"), dict):
            raise ValueError(f"{f} holds no run config (its 'run' entry); the run's record is damaged, so it is not "
                             "resumed")
        return meta

    def recorded_rounds(self) -> int:
        """The rounds metrics.jsonl records without a gap from round 1 (a damaged line before the
        last is refused by `rows`)."""
        n = 0
        for r in self.rows():
            if r.get("round") != n + 1:
                break
            n += 1
        return n

    def newest_checkpoint_round(self) -> int | None:
        """The round of the newest checkpoint folder, complete or not (None when there is none)."""
        rounds = [int(p.name.split("-")[1]) for p in (self.path / "checkpoints").glob("round-*")
                  if p.name.split("-")[1].isdigit()]
        return max(rounds) if rounds else None

    def truncate_after(self, round_: int) -> None:
        """Drop metric lines of rounds after the checkpoint a resumed run starts from."""
        keep = [r for r in self.rows() if r["round"] <= round_]
        atomic_write_text(self.metrics, "".join(json_line(r) for r in keep))

    def truncate_to(self, size: int) -> None:
        """Cut metrics.jsonl back to `size` bytes (what `append` returned): undo the last row."""
        with open(self.metrics, "rb+") as f:
            f.truncate(size)
            os.fsync(f.fileno())

    def append(self, row: dict[str, Any]) -> int:
        """Add one line to metrics.jsonl; a failed write (a full disk) leaves the file as it was.
        Returns the file's size before the line."""
        line = json_line(row).encode()
        with open(self.metrics, "ab") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                f.truncate(size)
                raise WriteError(f"cannot write {self.metrics}: {e.strerror or e}") from None
        return size


def run_inputs(run: RunConfig) -> tuple[str, ...]:
    """The folders a run reads (init-from, data-path, a distillation teacher's folder): its run
    folder may not be, be inside or contain any of them."""
    teacher = () if run.distill_from in ("", "init", "global") else (run.distill_from,)
    return tuple(p for p in (run.init_from, run.data_path, *teacher) if p)


def started_from(run: RunConfig) -> dict[str, Any]:
    """Where a run started (`init-from`): the model folder, the sha256 of its weights, and the
    strategy and run config it was trained with when it is a twist-fl model; and the teacher of
    its distillation. Empty for a run from a random init."""
    if not run.init_from:
        return {}
    import hashlib

    from .model import CONFIG_FILE, dense_model_dir

    d = dense_model_dir(run.init_from).resolve()
    weights = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    origin: dict[str, Any] = {"path": str(d)}
    if weights:
        h = hashlib.sha256()
        with open(weights[0], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        origin.update(weights=weights[0].name, weights_sha256=h.hexdigest())
    try:
        meta = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    src = meta.get("run") if isinstance(meta, dict) else None
    origin["strategy"] = src.get("strategy") if isinstance(src, dict) else "huggingface"
    if isinstance(src, dict):
        origin["run"] = src
    out: dict[str, Any] = {"init_from": origin}
    if run.distill_from:
        out["teacher"] = {"from": run.distill_from, "weight": run.distill_weight,
                          "temperature": run.distill_temperature,
                          "model": origin["path"] if run.distill_from == "init" else "the round's full model"
                          if run.distill_from == "global" else str(Path(run.distill_from).expanduser().resolve())}
    return out


def summarize(folder: RunFolder, run: RunConfig, cfg: GPTConfig, splits, wall_s: float,
              extra: dict[str, Any] | None = None, blueprint: Blueprint | None = None) -> dict[str, Any]:
    """Write summary.json, rounds.png and keeps.png from metrics.jsonl; log the final table.
    `blueprint`: the run trained a pruned subnet (its "full" entries are that subnet's)."""
    rows = folder.rows()
    evals = [r for r in rows if r.get("valid")]
    final = evals[-1]["valid"] if evals else {}
    n_total = cfg.n_blocks
    params = {"full": param_counts(cfg, blueprint)["params"]}
    for k in (run.eval_keeps_for(cfg) if blueprint is None else ()):
        bp = sample_blueprints(cfg, 1, k, seed=0, round=0, allow_partial=True)[0]
        params[f"keep-{k}"] = param_counts(cfg, bp)["params"]
    summary = {
        "run_folder": str(folder.path), "strategy": run.strategy, "n_blocks": n_total,
        "keep": run.trained_keep(cfg) if blueprint is None else blueprint_keep(cfg, blueprint),
        **({"blueprint": blueprint.to_dict()} if blueprint is not None else {}),
        "rounds": len(rows), "wall_s_this_process": round(wall_s, 1),
        "round_wall_s_total": round(sum(r["wall_s"] or 0 for r in rows), 1),
        "unigram_ppl_valid": unigram_perplexity(splits["train"].tokens, splits["valid"].tokens, cfg.vocab_size),
        "final": final, "params": params,
        "bytes_down_total": sum(r["bytes_down_total"] for r in rows),
        "bytes_up_total": sum(r["bytes_up_total"] for r in rows),
        "rejected_replies": sum(len(r["rejected"]) for r in rows),
        "rounds_without_update": [r["round"] for r in rows if not r["updated"]],
        "failed_rounds": [{"round": r["round"], "reason": r.get("failed")} for r in rows if not r["updated"]],
        "status": "ok",
        "run": run.to_flat(), "model": cfg.to_dict(), **(extra or {}),
    }
    title = f"{run.strategy}, keep {run.trained_keep(cfg)}/{n_total}, {run.dataset}"
    plot_rounds(rows, folder.path / "rounds.png", title)
    if final:
        plot_keeps(final, n_total, folder.path / "keeps.png", title)
    write_json(folder.path / "summary.json", summary)
    if final:
        failed = len(summary["failed_rounds"])
        log.info("final validation perplexity (unigram baseline %.2f):\n%s%s", summary["unigram_ppl_valid"],
                 final_table(final, n_total, params),
                 f"\n{failed} of {len(rows)} rounds failed (no update): {summary['rounds_without_update']}"
                 if failed else f"\nall {len(rows)} rounds updated the model")
    log.info("run folder: %s (%d rounds, %d failed rounds, %d rejected replies)", folder.path, len(rows),
             len(summary["failed_rounds"]), summary["rejected_replies"])
    return summary

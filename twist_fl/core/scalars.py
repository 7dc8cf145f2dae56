"""Live training curves: each metrics.jsonl row as TensorBoard scalars (run-config `tensorboard`).

The event files go to `<run folder>/tensorboard/`, so `tensorboard --logdir outputs` shows every
run under `outputs/` side by side: TwIST, FedAvg and DDP on one step axis, optimizer steps per
node (round x local-steps). metrics.jsonl stays the record; the event files are a view of it,
written after each row is final (after its checkpoint), and a resumed run hides the steps it
trains again (TensorBoard's `purge_step`). Needs the `tensorboard` extra.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUBFOLDER = "tensorboard"
EXTRA_HINT = "pip install 'twist-fl[tensorboard]'"


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl row (federated or DDP), by TensorBoard tag."""
    out: dict[str, float] = {}
    if row.get("train_loss") is not None:
        out["train/loss"] = float(row["train_loss"])
    if row.get("lr") is not None:
        out["train/lr"] = float(row["lr"])
    for name, v in (row.get("valid") or {}).items():
        out[f"valid/ppl_{name}"] = float(v["ppl"] if name == "full" else v["mean"])
    for key in ("bytes_down_per_node", "bytes_up_per_node", "bytes_down_total", "bytes_up_total"):
        if row.get(key) is not None:
            out[f"comm/{key}"] = float(row[key])
    if row.get("wall_s") is not None:
        out["time/round_s"] = float(row["wall_s"])
    out["nodes/rejected_replies"] = float(len(row.get("rejected") or []))
    out["nodes/round_failed"] = 0.0 if row.get("updated", True) else 1.0
    fed = row.get("fed_eval") or {}
    for name, v in fed.items():
        if isinstance(v, dict) and "ppl" in v:
            out[f"fed_eval/ppl_{name}"] = float(v["ppl"])
    if "nodes" in fed:
        out["fed_eval/nodes"] = float(fed["nodes"])
    return out


class ScalarLog:
    """TensorBoard event files for one run folder."""

    def __init__(self, folder: Path, steps_per_round: int, first_round: int = 1):
        if not available():
            raise ValueError(f"run-config tensorboard=true needs the tensorboard package: {EXTRA_HINT}")
        from torch.utils.tensorboard import SummaryWriter

        self.steps_per_round = steps_per_round
        purge = (first_round - 1) * steps_per_round + 1 if first_round > 1 else None
        self.writer = SummaryWriter(log_dir=str(folder / SUBFOLDER), purge_step=purge)
        self.seconds = 0.0  # time spent here, reported in summary.json (tensorboard_s)

    def row(self, row: dict[str, Any]) -> None:
        t = time.perf_counter()
        step = int(row["round"]) * self.steps_per_round
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        self.seconds += time.perf_counter() - t

    def close(self) -> None:
        self.writer.close()

"""Shared helpers: a tiny, fast run configuration and an in-process federation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from twist_fl.core.config import RunConfig
from twist_fl.federated.client import make_client_app
from twist_fl.federated.localgrid import LocalGrid
from twist_fl.federated.server import run_server

TINY = {"model": "tiny", "num-server-rounds": 2, "local-steps": 2, "seq-len": 32, "batch-size": 4,
        "eval-every": 100, "eval-tokens": 512, "eval-draws": 1, "lr-schedule": "constant"}


def run_local(tmp_path: Path, name: str, num_nodes: int = 2, node_configs=None, reply_hook=None,
              reply_delay=None, **overrides: Any) -> tuple[dict, LocalGrid, Path]:
    flat = {**TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}, "out-dir": str(tmp_path),
            "run-name": name}
    grid = LocalGrid(make_client_app(flat), num_nodes, node_configs=node_configs, reply_hook=reply_hook,
                     reply_delay=reply_delay, keep_sent=True)
    summary = run_server(grid, RunConfig.from_flat(flat))
    return summary, grid, tmp_path / name


def final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def checkpoint_weights(run_dir: Path, round_: int) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "checkpoints" / f"round-{round_:05d}" / "weights.safetensors"))

"""Round checkpoints that are either complete or never seen.

Each checkpoint is a folder `checkpoints/round-NNNNN/` (`weights.safetensors`, `state.json` with
the round, the weights' sha256, RNG states and strategy state, and, when the server's outer step
keeps state, `extra.safetensors` with its sha256 in `state.json`). It is written under a temporary
name, every file fsynced, then renamed into place, and `checkpoints/LATEST` is replaced
atomically to point at it. Loading verifies the hash; a half-written or corrupt checkpoint is
skipped in favour of the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import WriteError, atomic_write_text, fsync_dir, json_line

log = logging.getLogger(__name__)

KEEP_LAST = 2
STATE_KEYS = ("round", "weights_sha256", "rng", "config", "strategy")  # what a resume reads


def rng_states() -> dict[str, Any]:
    st = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": repr(random.getstate()),
            "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]}


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    n = states["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(run_dir: Path, round_: int, weights: dict[str, np.ndarray], state: dict[str, Any],
                    extra_arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write the checkpoint of `round_`: the weights, `state` (JSON) and `extra_arrays` (the
    outer optimizer's state; read back as `state["extra_arrays"]` by `load_checkpoint`)."""

    root = Path(run_dir) / "checkpoints"
    final = root / f"round-{round_:05d}"
    tmp = root / f".tmp-round-{round_:05d}-{os.getpid()}"
    try:
        return _save(root, final, tmp, round_, weights, state, extra_arrays)
    except OSError as e:  # a full disk or a read-only folder: no half-written checkpoint is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"cannot write checkpoint {final}: {e.strerror or e}") from None
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if "safetensor" in type(e).__name__.lower():  # safetensors wraps the OSError of a full disk
            raise WriteError(f"cannot write checkpoint {final}: {e}") from None
        raise


def _save(root: Path, final: Path, tmp: Path, round_: int, weights: dict[str, np.ndarray], state: dict[str, Any],
          extra_arrays: dict[str, np.ndarray] | None) -> Path:
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    wpath = tmp / "weights.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(wpath))
    digest = hashlib.sha256(wpath.read_bytes()).hexdigest()
    if extra_arrays:
        epath = tmp / "extra.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in extra_arrays.items()}, str(epath))
        state = {**state, "extra_sha256": hashlib.sha256(epath.read_bytes()).hexdigest()}
    (tmp / "state.json").write_text(json_line({"round": round_, "weights_sha256": digest, **state}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "LATEST", final.name + "\n")
    for old in sorted(root.glob("round-*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read(ckpt: Path) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    from safetensors.numpy import load_file

    state = json.loads((ckpt / "state.json").read_text())
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise ValueError(f"state.json lacks {missing}")
    if not all(k in state["rng"] for k in ("torch", "numpy")):
        raise ValueError("state.json's rng entry lacks the torch or numpy state")
    wpath = ckpt / "weights.safetensors"
    if hashlib.sha256(wpath.read_bytes()).hexdigest() != state["weights_sha256"]:
        raise ValueError("weights do not match the recorded sha256")
    state["extra_arrays"] = {}
    if "extra_sha256" in state:
        epath = ckpt / "extra.safetensors"
        if hashlib.sha256(epath.read_bytes()).hexdigest() != state["extra_sha256"]:
            raise ValueError("extra.safetensors does not match the recorded sha256")
        state["extra_arrays"] = load_file(str(epath))
    return int(state["round"]), load_file(str(wpath)), state


def load_checkpoint(run_dir: str | os.PathLike, accept: Callable[[int, dict[str, np.ndarray]], str | None] | None = None
                    ) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """(round, weights, state) of the newest complete checkpoint of a run folder: its hash
    verifies, and `accept(round, weights)` (when given) returns None, or else the reason it does
    not fit (e.g. wrong shapes, a round the run's records do not reach). A checkpoint skipped
    for an older one is named in a warning line with its reason."""
    root = Path(run_dir).expanduser() / "checkpoints"
    if not root.is_dir():
        raise ValueError(f"resume-from={str(run_dir)!r} has no checkpoints/ folder: is it a twist-fl run folder?")
    candidates = sorted(root.glob("round-*"), reverse=True)
    latest = root / "LATEST"
    if latest.is_file():
        named = root / latest.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    skipped = []
    for ckpt in candidates:
        try:
            rnd, weights, state = _read(ckpt)
            why = accept(rnd, weights) if accept is not None else None
            if why is None:
                return rnd, weights, state
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            why = str(e)
        log.warning("skipping checkpoint %s: %s", ckpt, why)
        skipped.append(f"{ckpt.name} ({why})")
    raise ValueError(f"resume-from={str(run_dir)!r} has no complete checkpoint"
                     + (": " + "; ".join(skipped) if skipped else ""))

"""What a node does in a round, without Flower: build its model from the tensors it received,
train `local_steps` batches of its partition, and return the tensors to send back.

In `true` mode the node receives the sliced tensors of its blueprint and trains the small dense
subnet; in `masked` mode it receives the full tensors and trains the full model with the other
blocks masked to zero. Both reply with the sliced tensors of the blueprint (a masked node's
other blocks are unchanged by construction), so the server validates and averages one format.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .blocks import slice_state
from .blueprint import Blueprint
from .config import NODE_MODES, GPTConfig, RunConfig, parse_mode
from .data import check_split, load_tokens, partition, random_batches
from .io import atomic_write
from .model import GPT, load_state_strict
from .precision import precision_scope, resolve_precision
from .rng import Stream, generator
from .train import (
    MOMENTS,
    OptimConfig,
    export_moments,
    import_moments,
    make_optimizer,
    merge_moments,
    pick_device,
    train_steps,
)

log = logging.getLogger(__name__)


@dataclass
class LocalResult:
    arrays: dict[str, np.ndarray]  # the blueprint's sliced tensors, float32
    metrics: dict[str, float | int]
    moments: dict[str, dict[str, torch.Tensor]] | None  # full-size AdamW moments (optimizer-state=keep)
    moment_step: int


@lru_cache(maxsize=8)
def node_tokens(dataset: str, tokenizer: str, data_path: str, partitioning: str, num_partitions: int,
                partition_id: int, seq_len: int, seed: int) -> np.ndarray:
    """The training tokens of one node (cached per process; the token cache is on disk)."""
    splits = load_tokens(dataset, tokenizer, data_path or None)
    check_split(splits["train"], seq_len, "train", min_windows=num_partitions)
    return partition(splits["train"], num_partitions, partition_id, partitioning, seq_len, seed)


@dataclass(frozen=True)
class LocalTask:
    """One round of work for one node, as the server's TRAIN message asks for it."""

    cfg: GPTConfig  # the server's architecture
    blueprint: Blueprint  # the subnet this node trains this round
    mode: str  # true (the sliced dense subnet) | masked (the full model with the blueprint as a mask)
    round: int  # the server round (1-based), which seeds the node's batches
    partition_id: int
    lr: float
    local_steps: int

    def __post_init__(self) -> None:
        parse_mode(self.mode, "node mode", NODE_MODES)


def local_update(task: LocalTask, *, run: RunConfig, arrays: Mapping[str, Any], tokens: np.ndarray,
                 moments: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                 moment_step: int = 0) -> LocalResult:
    """One round of local training from `arrays` (the tensors the node received, float32; the
    full model in masked mode) on the node's `tokens`, with the run's optimizer settings and
    device. Batches are drawn from (seed, partition_id, round), so the same inputs give the same
    update in either mode and after a resume. `moments` are the node's full-size AdamW moments
    (optimizer-state=keep)."""
    cfg, bp, round_, partition_id = task.cfg, task.blueprint, task.round, task.partition_id
    dev = pick_device(run.device)
    masked = task.mode == "masked"
    model = GPT(cfg, init=False) if masked else GPT(cfg, blueprint=bp, init=False)  # the state is loaded next
    load_state_strict(model, {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
    model.to(dev)
    opt = make_optimizer(model, OptimConfig(lr=task.lr, weight_decay=run.weight_decay, grad_clip=run.grad_clip))
    keep_state = run.optimizer_state == "keep"
    if keep_state and moments is not None:
        import_moments(model, opt, moments if masked else {m: slice_state(v, cfg, bp) for m, v in moments.items()},
                       moment_step)
    rng = generator(run.seed, Stream.NODE_BATCHES, partition_id, round_)
    batches = random_batches(tokens, run.batch_size, run.seq_len, rng)
    with precision_scope(resolve_precision(run.precision, dev)):
        stats = train_steps(model, batches, task.local_steps, opt, grad_clip=run.grad_clip,
                            mask=bp if masked and not bp.is_full(cfg) else None)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    reply = slice_state(state, cfg, bp) if masked else state
    new_moments, step = None, 0
    if keep_state:
        trained, step = export_moments(model, opt)
        new_moments = merge_moments(moments, cfg, bp, trained, trained_is_full=masked)
    return LocalResult(arrays={k: v.numpy().astype(np.float32, copy=False) for k, v in reply.items()},
                       metrics={"train-loss": stats["train_loss"], "num-examples": stats["num_examples"]},
                       moments=new_moments, moment_step=step)


class MomentStore:
    """A node's AdamW moments (optimizer-state=keep) on the node's own disk, one file per round it
    trained, so that they survive a ServerApp restart: a resumed run is a new Flower run, whose
    node contexts start empty.

    Files: `<state dir>/<run uid>/partition-<id>/round-NNNNNN.safetensors` (the full-size moments,
    float32, and the optimizer step), written atomically; the newest `KEEP` are kept. A resumed
    run that starts at round t loads the newest file of a round before t: the moments as the
    uninterrupted run would have them, even when the node had already trained a round the
    server never checkpointed."""

    KEEP = 3
    _UID = re.compile(r"^[0-9a-f]{32}$")

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def at(cls, state_dir: str, run_uid: str, partition_id: int) -> MomentStore | None:
        """The store of one node in one run; None without a state dir or a well-formed run uid."""
        if not state_dir or not cls._UID.match(run_uid or ""):
            return None
        return cls(Path(state_dir).expanduser() / run_uid / f"partition-{int(partition_id)}")

    def _files(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        return sorted((int(f.stem.split("-")[1]), f) for f in self.root.glob("round-*.safetensors")
                      if f.stem.split("-")[1].isdigit())

    def save(self, round_: int, moments: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        flat = {f"{m}/{k}": v.detach().to(torch.float32).contiguous() for m in MOMENTS for k, v in moments[m].items()}
        path = atomic_write(self.root / f"round-{round_:06d}.safetensors",
                            lambda p: save_file(flat, str(p), metadata={"step": str(step), "round": str(round_)}))
        for _, old in self._files()[:-self.KEEP]:
            old.unlink(missing_ok=True)
        return path

    def load(self, before_round: int) -> tuple[dict[str, dict[str, torch.Tensor]] | None, int]:
        """The moments and step of the newest round before `before_round`; (None, 0) if none."""
        from safetensors import SafetensorError, safe_open

        for round_, path in reversed(self._files()):
            if round_ >= before_round:
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    step = int(f.metadata()["step"])
                    moments: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MOMENTS}
                    for key in f.keys():
                        m, _, name = key.partition("/")
                        moments[m][name] = f.get_tensor(key)
                log.info("optimizer moments of round %d loaded from %s", round_, path)
                return moments, step
            except (SafetensorError, OSError, KeyError, ValueError) as e:
                log.warning("skipping unreadable optimizer moments %s: %s", path, e)
        return None, 0

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
from .blueprint import Blueprint, prefix_blueprint
from .config import NODE_MODES, GPTConfig, RunConfig, parse_mode
from .data import (
    SPEECH_PARTITIONINGS,
    check_split,
    eval_windows,
    load_tokens,
    partition,
    random_batches,
    speech_tokens,
)
from .io import atomic_write
from .model import GPT, load_state_strict
from .objective import Distillation, SelfDistillation, fixed_distillation
from .precision import precision_scope, resolve_precision
from .rng import Stream, generator
from .train import (
    MOMENTS,
    OptimConfig,
    evaluate,
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


def node_tokens(run: RunConfig, num_partitions: int, partition_id: int) -> np.ndarray:
    """The training tokens of one node (cached per process; the token caches are on disk)."""
    return _node_tokens(run.dataset, run.tokenizer, run.data_path, run.partitioning, num_partitions, partition_id,
                        run.seq_len, run.seed, run.partition_alpha)


@lru_cache(maxsize=8)
def _node_tokens(dataset: str, tokenizer: str, data_path: str, partitioning: str, num_partitions: int,
                 partition_id: int, seq_len: int, seed: int, alpha: float) -> np.ndarray:
    if partitioning in SPEECH_PARTITIONINGS:
        tokens, _ = speech_tokens(tokenizer, partitioning, num_partitions, partition_id, seed, alpha)
    else:
        splits = load_tokens(dataset, tokenizer, data_path or None)
        check_split(splits["train"], seq_len, "train", min_windows=num_partitions)
        tokens = partition(splits["train"], num_partitions, partition_id, partitioning, seq_len, seed)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"node of partition {partition_id} (of {num_partitions}, partitioning {partitioning!r}) holds "
                         f"{len(tokens)} training tokens, too few for seq-len={seq_len}; use fewer nodes, another "
                         "partitioning or a shorter seq-len")
    return tokens


NODE_EVAL_SHARE = 0.1  # with federated evaluation on, the last 10% of a node's text is held out for it


def node_split(run: RunConfig, num_partitions: int, partition_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(training tokens, held-out tokens) of a node: the held-out part (the last NODE_EVAL_SHARE
    of its text) only when the run evaluates on nodes (fraction-evaluate > 0); else all of it trains."""
    tokens = node_tokens(run, num_partitions, partition_id)
    if run.fraction_evaluate <= 0:
        return tokens, None
    cut = int(len(tokens) * (1 - NODE_EVAL_SHARE))
    if cut < run.seq_len + 1 or len(tokens) - cut < run.seq_len + 1:
        raise ValueError(f"node of partition {partition_id} (of {num_partitions}) holds {len(tokens)} tokens: too few "
                         f"to hold out {NODE_EVAL_SHARE:.0%} for fraction-evaluate at seq-len={run.seq_len}")
    return tokens[:cut], tokens[cut:]


def local_evaluate(run: RunConfig, cfg: GPTConfig, arrays: Mapping[str, Any], blueprint: Blueprint,
                   tokens: np.ndarray) -> dict[str, float]:
    """Mean loss of the full model `arrays` and of its subnet `blueprint` on `tokens` (a node's
    held-out text, at most eval-tokens of it), at the run's precision on the node's device."""
    dev = pick_device(run.device)
    windows = eval_windows(tokens, run.seq_len, run.eval_tokens or None)
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
    with precision_scope(resolve_precision(run.precision, dev)):
        full = evaluate(GPT.from_state(cfg, state).to(dev), windows)
        sub = evaluate(GPT.from_state(cfg, slice_state(state, cfg, blueprint), blueprint=blueprint).to(dev), windows)
    return {"loss-full": full["loss"], "loss-sub": sub["loss"], "num-tokens": float(full["tokens"])}


def partition_stats(run: RunConfig, num_partitions: int) -> list[dict[str, Any]]:
    """Per node of `num_partitions`: its training tokens and, where the partitioning knows them,
    its speeches, speaking roles and plays. ValueError naming the first node too small for seq-len."""
    out = []
    for pid in range(num_partitions):
        if run.partitioning in SPEECH_PARTITIONINGS:
            _, st = speech_tokens(run.tokenizer, run.partitioning, num_partitions, pid, run.seed, run.partition_alpha)
            row = {"partition": pid, "tokens": st["tokens_n"], "speeches": st["speeches"],
                   "characters": st["characters"], "plays": st["plays"]}
        else:
            row = {"partition": pid, "tokens": len(node_tokens(run, num_partitions, pid))}
        out.append(row)
    for row in out:
        node_tokens(run, num_partitions, row["partition"])  # the size check, with its message
    return out


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
    distill = node_distillation(run, cfg, arrays, masked, dev)
    self_distill = node_self_distillation(run, cfg, bp, partition_id, round_)
    with precision_scope(resolve_precision(run.precision, dev)):
        stats = train_steps(model, batches, task.local_steps, opt, grad_clip=run.grad_clip,
                            mask=bp if masked and not bp.is_full(cfg) else None, distill=distill,
                            self_distill=self_distill)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    reply = slice_state(state, cfg, bp) if masked else state
    new_moments, step = None, 0
    if keep_state:
        trained, step = export_moments(model, opt)
        new_moments = merge_moments(moments, cfg, bp, trained, trained_is_full=masked)
    return LocalResult(arrays={k: v.numpy().astype(np.float32, copy=False) for k, v in reply.items()},
                       metrics={"train-loss": stats["train_loss"], "num-examples": stats["num_examples"]},
                       moments=new_moments, moment_step=step)


def node_self_distillation(run: RunConfig, cfg: GPTConfig, bp: Blueprint, partition_id: int,
                           round_: int) -> SelfDistillation | None:
    """FjORD's self-distillation for a node holding the prefix `bp`, or None when it is off or
    the node holds the smallest size: the smaller prefixes are the `keep-choices` below its
    keep (every smaller keep without them)."""
    if run.self_distill_weight <= 0 or run.subnet_policy != "ordered":
        return None
    inner = [i for i in range(cfg.n_layer) if i not in cfg.shared_layer_ids] or [0]
    keep = len(bp.heads[inner[0]])
    smaller = [k for k in (run.choices_for(cfg) or range(1, keep)) if k < keep]
    if not smaller:
        return None
    return SelfDistillation(run.self_distill_weight, tuple(prefix_blueprint(cfg, k) for k in smaller),
                            generator(run.seed, Stream.SELF_DISTILL, partition_id, round_))


def node_distillation(run: RunConfig, cfg: GPTConfig, arrays: Mapping[str, Any], masked: bool,
                      device: torch.device) -> Distillation | None:
    """The node's distillation lever (`distill-from`), or None when it is off. `init` or a model
    folder: a fixed teacher, loaded once per process (`objective.fixed_distillation`); `global`: the
    round's full model, which a masked node has just received in `arrays`."""
    if not run.distill_from or run.distill_weight <= 0:
        return None
    if run.distill_from != "global":
        return fixed_distillation(run, cfg, device)
    if not masked:
        raise ValueError("distill-from='global' needs a masked node (it distils from the full model it "
                         "received); this node trains in true mode")
    teacher = GPT.from_state(cfg, {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}).to(device)
    teacher.eval().requires_grad_(False)
    return Distillation(teacher, run.distill_weight, run.distill_temperature)


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

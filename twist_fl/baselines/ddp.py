"""Data-parallel training (DDP) of the dense model on torch.distributed: the reference the
paper compares TwIST with.

`nproc` worker processes, started with `torch.multiprocessing.spawn`, join one process group
(gloo on CPU, nccl when every worker has a GPU) and wrap the model in
`torch.nn.parallel.DistributedDataParallel`, which all-reduces the gradients every step. The
budget is a Flower run's: worker i trains on partition i of `nproc` (the app's partitioning),
`batch-size` sequences per worker and step, `num-server-rounds x local-steps` optimizer steps,
the same AdamW, clip and seed, and the learning rate of round r (`RunConfig.lr_at`) for the
steps of round r. Worker i draws the batches of round r from the stream a Flower node of
partition i uses in round r, so N workers see exactly the batches FedAvg's N nodes see, and
compute what one process computes at batch N x batch-size.

The bytes each worker sends are counted by a DDP communication hook over the real gradient
buckets (then all-reduced by torch's own hook), and every step is timed. Worker 0 evaluates and
writes the same run folder as the Flower app (`core.runs`), with strategy `ddp`; the final
`model/` appears whole (written aside, then renamed) or not at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ..core.config import RunConfig, parse_run_config
from ..core.data import check_split, eval_windows, load_tokens, random_batches
from ..core.io import fsync_dir
from ..core.model import initial_model
from ..core.node import node_tokens, partition_stats
from ..core.objective import fixed_distillation
from ..core.precision import precision_scope, resolve_precision
from ..core.rng import Stream, generator
from ..core.runs import Evaluator, RunFolder, describe, summarize
from ..core.scalars import ScalarLog
from ..core.train import OptimConfig, die_with_parent, make_optimizer, reuse_freed_memory, train_steps

log = logging.getLogger(__name__)

# Run-config keys with no meaning for data-parallel training: refused when given.
NOT_FOR_DDP = {
    "strategy": "the strategy is ddp",
    "keep": "every worker trains the full model",
    "mode": "there are no subnets to slice or mask",
    "num-nodes": "every worker takes part in every step (use --nproc)",
    "min-nodes": "the process group has exactly --nproc workers",
    "node-wait-timeout": "workers join at start (use --timeout)",
    "round-timeout": "collectives time out after --timeout",
    "max-failed-rounds": "a failed worker fails the run",
    "optimizer-state": "one optimizer lives for the whole run",
    "wire-dtype": "gradients are all-reduced in float32",
    "weighted-average": "every worker has the same batch size",
    "max-update-ratio": "there are no untrusted replies",
    "resume-from": "a DDP run is not resumed; start a new one",
    "fraction-evaluate": "workers do not evaluate; the validation split does",
    "keep-choices": "every worker trains the full model",
    "full-nodes": "every worker trains the full model",
    "subnet-policy": "every worker trains the full model",
    "self-distill-weight": "every worker trains the full model",
    "server-optimizer": "one optimizer steps on the all-reduced gradients",
    "server-lr": "one optimizer steps on the all-reduced gradients",
    "server-momentum": "one optimizer steps on the all-reduced gradients",
}
BACKENDS = ("auto", "gloo", "nccl")


class DDPError(RuntimeError):
    """A worker failed or died; the message names which and why."""


# --- configuration ------------------------------------------------------------------------


def parse_overrides(text: str) -> dict[str, Any]:
    """`key=value ...` as `flwr run --run-config` takes them (`core.config.parse_run_config`)."""
    return parse_run_config(text)


def ddp_run_config(overrides: dict[str, Any], defaults: dict[str, Any] | None = None) -> RunConfig:
    """The run config of a DDP run: the app's defaults, then `overrides`, recorded as strategy
    ddp. Keys that mean nothing for DDP are refused by name, with the reason."""
    for key in overrides:
        name = key.replace("_", "-")
        if name in NOT_FOR_DDP:
            raise ValueError(f"run-config {name}={overrides[key]!r} has no meaning for DDP ({NOT_FOR_DDP[name]}); "
                             f"allowed keys: every run-config key but {sorted(NOT_FOR_DDP)}")
    values = {k: v for k, v in (defaults or {}).items() if k.replace("_", "-") not in NOT_FOR_DDP}
    values.update(overrides)
    values["strategy"] = "ddp"
    return RunConfig.from_flat(values)


def ddp_from_flat(flat: dict[str, Any]) -> RunConfig:
    """A DDP run config from a complete flat run config (a sweep job's): the keys DDP has no use
    for must hold their defaults, so that a sweep cannot vary a key DDP would ignore."""
    defaults = RunConfig().to_flat()
    changed = {k: v for k, v in flat.items() if k.replace("_", "-") in NOT_FOR_DDP and k.replace("_", "-") != "strategy"
               and v != defaults[k.replace("_", "-")]}
    rest = {k: v for k, v in flat.items() if k.replace("_", "-") not in NOT_FOR_DDP}
    return ddp_run_config({**changed, **rest})


def pick_backend(backend: str, nproc: int, device: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"--backend={backend!r} is not allowed; allowed: {list(BACKENDS)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda" and gpus < nproc:
        raise ValueError(f"run-config device='cuda' with --nproc {nproc} needs {nproc} GPUs; this machine has {gpus}")
    if backend == "auto":
        backend = "nccl" if device != "cpu" and gpus >= nproc else "gloo"
    if backend == "nccl" and (device == "cpu" or gpus < nproc):
        raise ValueError(f"--backend nccl needs one GPU per worker ({nproc}); this machine has {gpus} "
                         f"and run-config device={device!r}")
    return backend


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker is started with (pickled once by torch.multiprocessing.spawn)."""

    run: dict[str, Any]  # RunConfig.to_flat()
    nproc: int
    port: int
    backend: str
    threads: int  # torch threads per worker
    timeout: float  # seconds a collective may wait
    folder: str  # the run folder (worker 0 writes it)
    t_start: float


# --- the launcher -------------------------------------------------------------------------


def run_ddp(run: RunConfig, nproc: int, *, threads: int = 0, backend: str = "auto",
            timeout: float = 1800.0) -> dict[str, Any]:
    """Train with DDP over `nproc` local worker processes; returns the run's summary.json.

    Everything a user can get wrong is checked here, before any worker starts (ValueError);
    a worker that fails or dies raises DDPError once the others are stopped."""
    t_start = time.time()
    if run.strategy != "ddp":
        raise ValueError(f"run-config strategy={run.strategy!r}; a DDP run is recorded as 'ddp'")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc={nproc!r} is not allowed; allowed: 1 or more workers")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"--threads={threads!r} is not allowed; allowed: 0 (cores / nproc) or more")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"--timeout={timeout!r} is not allowed; allowed: a positive number of seconds")
    backend = pick_backend(backend, nproc, run.device)
    resolve_precision(run.precision, torch.device("cuda" if backend == "nccl" else "cpu"))  # fp16 on CPUs: refused
    model = initial_model(run, allow_pruned=True) if run.init_from else None  # no model built just for its shape
    cfg = model.cfg if model is not None else run.model_config()
    run = run.as_trained(cfg)
    run.check_model(cfg)
    splits = load_tokens(run.dataset, run.tokenizer, run.data_path or None)
    check_split(splits["valid"], run.seq_len, "valid")
    try:
        eval_windows(splits["valid"].tokens, run.seq_len, run.eval_tokens or None)  # worker 0 evaluates these
    except ValueError as e:
        raise ValueError(f"run-config eval-tokens={run.eval_tokens} at seq-len={run.seq_len}: {e}; raise eval-tokens "
                         "(0 = the whole validation split)") from None
    try:
        check_split(splits["train"], run.seq_len, "train", min_windows=nproc)
        partition_stats(run, nproc)  # every worker's share, checked before any worker starts
    except ValueError as e:
        raise ValueError(f"--nproc {nproc} is more workers than the training split has partitions: {e}") from None
    folder = RunFolder.new(run, resumable=False)
    try:
        return _spawn(run, cfg, folder, nproc, threads, backend, timeout, t_start)
    except BaseException:
        if not folder.rows():  # failed before its first step was recorded: leave no folder of config.json alone
            shutil.rmtree(folder.path, ignore_errors=True)
        raise
    finally:
        folder.release()


def _spawn(run: RunConfig, cfg, folder: RunFolder, nproc: int, threads: int, backend: str, timeout: float,
           t_start: float) -> dict[str, Any]:
    folder.write_config(run, cfg)
    # The rendezvous store lives here, bound to a port the kernel picks and held until the workers
    # are done: no port is chosen, released and bound again, so a job started beside this one
    # cannot take it in between (which left the workers waiting on a stranger's store).
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    spec = WorkerSpec(run=run.to_flat(), nproc=nproc, port=store.port, backend=backend,
                      threads=threads or max(1, len(os.sched_getaffinity(0)) // nproc), timeout=timeout,
                      folder=str(folder.path), t_start=t_start)
    log.info("DDP: %d workers (%s, %d threads each), %d steps of batch %d per worker", nproc, backend, spec.threads,
             run.num_server_rounds * run.local_steps, run.batch_size)
    try:
        mp.spawn(_worker, args=(spec,), nprocs=nproc, join=True)
    except mp.ProcessRaisedException as e:
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        raise DDPError(f"DDP worker {e.error_index} failed: {last}; {folder.path} has no model/") from None
    except mp.ProcessExitedException as e:
        how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
        raise DDPError(f"DDP worker {e.error_index} died ({how}); the others were stopped; "
                       f"{folder.path} has no model/") from None
    return json.loads((folder.path / "summary.json").read_text())


# --- one worker ---------------------------------------------------------------------------


def _counting_allreduce(counter, bucket):  # no annotations: DDP checks them against the real types, and
    # `from __future__ import annotations` makes them strings
    """torch's own all-reduce hook, after counting the bucket's bytes."""
    buf = bucket.buffer()
    counter["bytes"] += buf.numel() * buf.element_size()
    counter["buckets"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _worker(rank: int, spec: WorkerSpec) -> None:
    die_with_parent()  # a killed launcher takes its workers with it
    run = RunConfig.from_flat(spec.run)
    n = spec.nproc
    torch.set_num_threads(spec.threads)
    if run.reuse_freed_memory:
        reuse_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(f"cuda:{rank}") if spec.backend == "nccl" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", spec.port, is_master=False, timeout=timedelta(seconds=spec.timeout))
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=n,
                            timeout=timedelta(seconds=spec.timeout))
    try:
        _train(rank, spec, run, device)
    finally:
        dist.destroy_process_group()


def _train(rank: int, spec: WorkerSpec, run: RunConfig, device: torch.device) -> None:
    n = spec.nproc
    # The same seeded init everywhere (DDP broadcasts rank 0's anyway); a pruned init-from is
    # trained as the dense model it is (a recovery fine-tune).
    model = initial_model(run, allow_pruned=True).to(device)
    cfg = model.cfg
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    counter = {"bytes": 0, "buckets": 0}
    ddp.register_comm_hook(counter, _counting_allreduce)
    opt = make_optimizer(model, OptimConfig(lr=run.lr, weight_decay=run.weight_decay, grad_clip=run.grad_clip))
    precision = resolve_precision(run.precision, device)
    tokens = node_tokens(run, n, rank)
    folder = evaluator = splits = curves = None
    if rank == 0:
        folder = RunFolder(Path(spec.folder))
        curves = ScalarLog(folder.path, run.local_steps) if run.tensorboard else None
        splits = load_tokens(run.dataset, run.tokenizer, run.data_path or None)
        evaluator = Evaluator(cfg, run, eval_windows(splits["valid"].tokens, run.seq_len, run.eval_tokens or None),
                              blueprint=model.blueprint)
    distill = fixed_distillation(run, cfg, device)  # distill-from: init, or a model folder (the dense model)
    all_times: list[float] = []
    last = run.num_server_rounds
    for rnd in range(1, last + 1):
        lr = run.lr_at(rnd)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = random_batches(tokens, run.batch_size, run.seq_len,
                                 generator(run.seed, Stream.NODE_BATCHES, rank, rnd))
        times: list[float] = []
        sent0 = counter["bytes"]
        t0 = time.monotonic()
        with precision_scope(precision):
            stats = train_steps(ddp, batches, run.local_steps, opt, grad_clip=run.grad_clip, step_times=times,
                                distill=distill)
        wall = time.monotonic() - t0
        all_times += times
        loss = torch.tensor([stats["train_loss"]], dtype=torch.float64, device=device)
        dist.all_reduce(loss)
        if rank == 0:
            sent = counter["bytes"] - sent0
            row: dict[str, Any] = {
                "round": rnd, "train_loss": float(loss.item() / n), "lr": lr, "updated": True,
                "wall_s": round(wall, 3), "bytes_down_total": sent * n, "bytes_up_total": sent * n,
                "nodes": list(range(n)), "rejected": [], "bytes_down_per_node": sent, "bytes_up_per_node": sent,
                "step_s_median": float(np.median(times)), "steps": len(times)}
            if rnd % run.eval_every == 0 or rnd == last:
                t = time.monotonic()
                row["valid"] = evaluator({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
                row["eval_s"] = round(time.monotonic() - t, 3)
                log.info("step %d (round %d): %s", rnd * run.local_steps, rnd, describe(row["valid"]))
            row["time"] = round(time.time(), 3)
            folder.append(row)
            if curves is not None:
                curves.row(row)
        dist.barrier()  # worker 0's evaluation is not counted in the others' next step
    gathered: list[Any] = [None] * n
    dist.all_gather_object(gathered, {"step_times": all_times, "bytes": counter["bytes"],
                                      "buckets": counter["buckets"]})
    if rank == 0:
        tb = {}
        if curves is not None:
            curves.close()
            tb = {"tensorboard_s": round(curves.seconds, 3)}
        _finish(spec, run, model, folder, splits, gathered, tb)
    dist.barrier()


def _finish(spec: WorkerSpec, run: RunConfig, model, folder: RunFolder, splits, gathered: list[dict],
            tb: dict[str, float]) -> None:
    n, steps = spec.nproc, run.num_server_rounds * run.local_steps
    per_step = gathered[0]["bytes"] / steps
    medians = [float(np.median(g["step_times"])) for g in gathered]
    extra = {"ddp": {
        "nproc": n, "backend": spec.backend, "threads_per_worker": spec.threads, "steps": steps,
        "batch_per_worker": run.batch_size, "tokens_per_step": n * run.batch_size * run.seq_len,
        "step_s_median": float(np.median([t for g in gathered for t in g["step_times"]])),
        "step_s_median_per_worker": medians,
        "grad_bytes_per_step": per_step,  # each worker's gradient buckets, all-reduced every step
        "buckets_per_step": gathered[0]["buckets"] / steps,
        "ring_bytes_sent_per_step": per_step * 2 * (n - 1) / n,  # what a ring all-reduce puts on the wire
    }, **tb}
    tmp = folder.path / f".model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().save(tmp, extra={"run": run.to_flat()})
    os.replace(tmp, folder.path / "model")
    fsync_dir(folder.path)
    summarize(folder, run, model.cfg, splits, time.time() - spec.t_start, extra=extra, blueprint=model.blueprint)
    log.info("DDP: median step %.1f ms over %d workers, %.0f gradient bytes per worker and step",
             extra["ddp"]["step_s_median"] * 1e3, n, per_step)

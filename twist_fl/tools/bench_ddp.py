"""TwIST against data-parallel training (DDP) and FedAvg: step latency and bytes per worker, as
the paper compares them (−31.7% latency, −30.4% bytes for TwIST vs DDP).

    twist-fl bench ddp [--shape default|gpt2|both] [--nproc 2] [--steps 20] [--json out.json]

All three run `nproc` worker processes at once (torch.multiprocessing, one torch thread each
unless --threads), each training `steps` batches of `batch x seq-len` random tokens after
`warmup` untimed ones, on the same shape:
- ddp: the full model in DistributedDataParallel (gloo): every step all-reduces every gradient;
  bytes per step counted by a communication hook over the real buckets.
- twist: each worker trains its own dense subnet at keep N/2 (true mode, shared first and last
  layers as the run config), no exchange inside a round; bytes per step = the worker's reply
  message of a round (serialized as Flower sends it) / local-steps.
- fedavg: each worker trains the full model, no exchange inside a round; bytes per step = its
  reply of a round / local-steps.
Latency is the median step time per worker (forward, backward with DDP's all-reduce, clip,
AdamW), then the median over workers; repeats give the spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.blueprint import sample_blueprints
from ..core.config import GPTConfig, RunConfig, preset
from ..core.io import write_json
from ..core.model import GPT
from ..core.train import OptimConfig, make_optimizer, reuse_freed_memory, train_steps

MODES = ("twist", "fedavg", "ddp")


def shape(name: str, run: RunConfig) -> GPTConfig:
    if name == "default":
        return run.model_config()
    return dataclasses.replace(preset("gpt2", vocab_size=50257), shared_layers=run.shared_layer_list)


@dataclasses.dataclass(frozen=True)
class Job:
    cfg: dict[str, Any]
    mode: str
    nproc: int
    threads: int
    steps: int
    warmup: int
    batch: int
    seq_len: int
    keep: int
    port: int
    out: str


def _worker(rank: int, job: Job) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ..baselines.ddp import _counting_allreduce

    torch.set_num_threads(job.threads)
    reuse_freed_memory()
    cfg = GPTConfig.from_dict(job.cfg)
    torch.manual_seed(rank)
    bp = None
    if job.mode == "twist":
        bp = sample_blueprints(cfg, job.nproc, job.keep, seed=0, round=1, allow_partial=True)[rank]
    model = GPT(cfg, blueprint=bp)
    counter = {"bytes": 0, "buckets": 0}
    net: torch.nn.Module = model
    if job.mode == "ddp":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{job.port}", rank=rank, world_size=job.nproc,
                                timeout=timedelta(seconds=600))
        net = DistributedDataParallel(model)
        net.register_comm_hook(counter, _counting_allreduce)
    opt = make_optimizer(model, OptimConfig())
    rng = np.random.default_rng(rank)

    def batches():
        while True:
            x = rng.integers(0, cfg.vocab_size, size=(job.batch, job.seq_len + 1))
            yield x[:, :-1], x[:, 1:]

    it = batches()
    train_steps(net, it, job.warmup, opt)
    before = counter["bytes"]
    times: list[float] = []
    train_steps(net, it, job.steps, opt, step_times=times)
    if job.mode == "ddp":
        dist.destroy_process_group()
    Path(job.out, f"{rank}.json").write_text(json.dumps({
        "step_times": times, "grad_bytes": counter["bytes"] - before, "params": model.num_params()}))


def reply_bytes(cfg: GPTConfig, keep: int, nproc: int) -> float:
    """Mean bytes of one worker's round reply, serialized as Flower sends it (fp32 wire)."""
    from .bench import bench_bytes

    n = cfg.n_blocks
    res = bench_bytes(nodes=nproc, keeps=(keep,) if keep < n else (), cfg=cfg)
    return res["rows"][f"twist k{keep}/{n} float32" if keep < n else "dense float32"]["up_per_node"]


def run_mode(cfg: GPTConfig, mode: str, nproc: int, threads: int, steps: int, warmup: int, batch: int, seq_len: int,
             keep: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from ..deploy.procs import free_port

    with tempfile.TemporaryDirectory() as tmp:
        job = Job(cfg.to_dict(), mode, nproc, threads, steps, warmup, batch, seq_len, keep, free_port(), tmp)
        mp.spawn(_worker, args=(job,), nprocs=nproc, join=True)
        res = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(nproc)]
    medians = [statistics.median(r["step_times"]) for r in res]
    return {"step_s": statistics.median(medians), "step_s_per_worker": medians,
            "grad_bytes_per_step": res[0]["grad_bytes"] / steps, "params": [r["params"] for r in res]}


def bench(shapes: list[str], nproc: int, steps: int, warmup: int, repeats: int, threads: int,
          run: RunConfig, local_steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"nproc": nproc, "threads_per_worker": threads, "steps": steps, "warmup": warmup,
                           "repeats": repeats, "batch": run.batch_size, "seq_len": run.seq_len,
                           "local_steps": local_steps, "cpu_count": os.cpu_count(), "shapes": {}}
    for name in shapes:
        cfg = shape(name, run)
        keep = run.keep_for(cfg)
        n = cfg.n_blocks
        per_mode: dict[str, Any] = {}
        for mode in MODES:
            reps = [run_mode(cfg, mode, nproc, threads, steps, warmup, run.batch_size, run.seq_len,
                             keep if mode == "twist" else n) for _ in range(repeats)]
            bytes_per_step = (reps[0]["grad_bytes_per_step"] if mode == "ddp"
                              else reply_bytes(cfg, keep if mode == "twist" else n, nproc) / local_steps)
            per_mode[mode] = {"step_s": statistics.median(r["step_s"] for r in reps),
                              "step_s_repeats": [r["step_s"] for r in reps], "bytes_sent_per_step": bytes_per_step,
                              "keep": keep if mode == "twist" else n}
        d = per_mode["ddp"]
        for mode in ("twist", "fedavg"):
            m = per_mode[mode]
            m["latency_vs_ddp"] = m["step_s"] / d["step_s"] - 1
            m["latency_vs_ddp_range"] = [min(m["step_s_repeats"]) / max(d["step_s_repeats"]) - 1,
                                         max(m["step_s_repeats"]) / min(d["step_s_repeats"]) - 1]
            m["bytes_vs_ddp"] = m["bytes_sent_per_step"] / d["bytes_sent_per_step"] - 1
        out["shapes"][name] = {"config": cfg.to_dict(), "n_blocks": n, "modes": per_mode}
    return out


def table(res: dict[str, Any]) -> str:
    lines = [f"{res['nproc']} workers at once, {res['threads_per_worker']} thread(s) each, batch {res['batch']} x "
             f"{res['seq_len']}, {res['steps']} timed steps after {res['warmup']}, median over workers, "
             f"{res['repeats']} repeats; bytes per step of a round of {res['local_steps']} local steps"]
    for name, s in res["shapes"].items():
        lines.append(f"\n{name} shape ({s['config']['n_layer']} layers, d={s['config']['n_embd']}):")
        lines.append(f"{'':18} | {'step ms':>9} | {'vs DDP':>16} | {'MB sent/step':>12} | vs DDP")
        for mode, m in s["modes"].items():
            label = f"{mode} k{m['keep']}/{s['n_blocks']}"
            vs = "" if mode == "ddp" else (f"{m['latency_vs_ddp']:+.1%} ({m['latency_vs_ddp_range'][0]:+.0%}.."
                                           f"{m['latency_vs_ddp_range'][1]:+.0%})")
            bvs = "" if mode == "ddp" else f"{m['bytes_vs_ddp']:+.1%}"
            lines.append(f"{label:18} | {m['step_s'] * 1e3:>9.1f} | {vs:>16} | "
                         f"{m['bytes_sent_per_step'] / 1e6:>12.3f} | {bvs}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from . import help as H

    ap = H.parser("twist-fl bench ddp", __doc__, "bench ddp")
    ap.add_argument("--shape", choices=("default", "gpt2", "both"), default="both", help="the app's default model, "
                    "GPT-2 124M, or both")
    ap.add_argument("--nproc", type=int, default=2, help="workers at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per worker")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each mode (the median is reported)")
    ap.add_argument("--json", help="also write the results here (a file)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for key in ("nproc", "threads", "steps", "repeats"):
        if getattr(args, key) < 1:
            print(f"bench_ddp: error: --{key}={getattr(args, key)} must be >= 1", file=sys.stderr)
            return 2
    if args.warmup < 0:
        print(f"bench_ddp: error: --warmup={args.warmup} must be >= 0", file=sys.stderr)
        return 2
    run = RunConfig()
    shapes = ["default", "gpt2"] if args.shape == "both" else [args.shape]
    res = bench(shapes, args.nproc, args.steps, args.warmup, args.repeats, args.threads, run, run.local_steps)
    print(table(res))
    if args.json:
        from ..core.precision import machine

        write_json(Path(args.json), {**res, "machine": machine()})  # the CPU kind and torch behind the figures
    return 0


if __name__ == "__main__":
    sys.exit(main())

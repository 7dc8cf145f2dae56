"""Benchmarks of TwIST against the dense FedAvg baseline, measured on this machine.

    twist-fl bench [bytes|step|memory|overhead|all] [--json out.json]

bytes     bytes per round, down and up, per node and in total, counted from the serialized Flower
          messages (every nested object the runtime would store and send), GPT-2 124M shape, 4 nodes,
          keep 3, 6, 9 of 12 with the paper's shared first and last layers, fp32 and 16-bit wire,
          against dense FedAvg; and the overhead over the raw tensor bytes.
step      one local training step (forward, backward, AdamW) of a node at keep k vs the full model,
          GPT-2 124M shape, batch and sequence length of the defaults (16 x 64), median of repeats;
          the FLOP bound of the time reduction and measured / bound; with --masked also the full
          model masked to keep k, and with --precision fp32,bf16 each precision, paired.
memory    peak resident memory of a node process doing one training round: true subnet vs masked
          full model vs dense, each in a fresh process.
overhead  wall time of a `flwr run` simulation (local SuperLink, Ray, 4 nodes; start-up included) vs a
          plain in-process loop doing the same local updates on the same subnets with the same
          coverage averaging, on the default model and data (the app's 60 rounds unless --rounds);
          also split into a per-round ratio and a fixed start-up/shut-down cost, and each round
          into the nodes' local updates and the rest.
nodes     `flwr run` simulations with 4, 20 and 50 SuperNodes, 4 sampled per round, character
          partitioning: the median round time and the peak memory of the run's processes.
Inference speed: `twist-fl bench inference`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.blocks import coverage_average, slice_state, state_shapes
from ..core.blueprint import Blueprint, sample_blueprints
from ..core.config import PRECISIONS, GPTConfig, RunConfig, preset
from ..core.io import write_json
from ..core.model import GPT


def gpt2_cfg(shared: tuple[int, ...] = (0, -1)) -> GPTConfig:
    return dataclasses.replace(preset("gpt2", vocab_size=50257), shared_layers=shared)


# --- 1. bytes ------------------------------------------------------------------------------------


def message_bytes(msg) -> int:
    """Bytes of every object of a Message as Flower serializes it (records, arrays, chunks)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def bench_bytes(nodes: int = 4, keeps: tuple[int, ...] = (3, 6, 9), cfg: GPTConfig | None = None) -> dict[str, Any]:
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from ..core.wire import encode
    from ..federated.records import to_record

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cfg = cfg or gpt2_cfg()
    n = min(cfg.n_head, cfg.n_ffn_blocks)
    # Random values in every tensor: a fresh init has many identical (zero) biases, which Flower's
    # content-addressed objects would store once and so undercount.
    rng = np.random.default_rng(0)
    full = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for k, s in state_shapes(cfg).items()}
    n_params = sum(v.size for v in full.values())
    out: dict[str, Any] = {"nodes": nodes, "shape": f"{cfg.n_layer}x{cfg.n_embd} ({n_params:,} parameters)",
                           "shared_layers": list(cfg.shared_layer_ids)}
    rows = {}
    for wire in ("float32", "bfloat16"):
        for label, keep in [("dense", n)] + [(f"twist k{k}/{n}", k) for k in keeps]:
            bps = sample_blueprints(cfg, nodes, keep, seed=0, round=1, allow_partial=True) if keep < n \
                else [Blueprint.full(cfg)] * nodes
            down = up = raw = 0
            for i, bp in enumerate(bps):
                arrays = encode(slice_state(full, cfg, bp), wire)
                raw += sum(a.nbytes for a in arrays.values())
                msg = Message(content=RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(
                    {"server-round": 1, "nonce": 1, "mode": "true", "lr": 1e-3, "local-steps": 15, **bp.to_config()})}),
                    message_type=MessageType.TRAIN, dst_node_id=100 + i)
                down += message_bytes(msg)
                reply = Message(content=RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(
                    {"num-examples": 240, "train-loss": 3.0, "server-round": 1, "nonce": 1})}), reply_to=msg)
                up += message_bytes(reply)
            rows[f"{label} {wire}"] = {"down_total": down, "up_total": up, "down_per_node": down / nodes,
                                       "up_per_node": up / nodes, "overhead_over_raw": (down - raw) / raw}
    base = rows["dense float32"]["down_total"]
    for r in rows.values():
        r["vs_dense_fp32"] = r["down_total"] / base
    out["rows"] = rows
    return out


# --- 2. step time ----------------------------------------------------------------------------------


def train_flops_ratio(cfg: GPTConfig, keep: int, seq: int) -> float:
    """FLOPs of a subnet's training step / the full model's (matmuls, forward = backward/2)."""
    from .bench_inference import forward_flops

    shared = len(cfg.shared_layer_ids)
    sliced = cfg.n_layer - shared
    one = dataclasses.replace(cfg, n_layer=1)
    head = 2 * cfg.n_embd * cfg.vocab_size
    per_full = forward_flops(one, cfg.n_head, cfg.n_ffn_blocks, seq / 2) - head
    per_keep = forward_flops(one, keep, keep, seq / 2) - head
    return (shared * per_full + sliced * per_keep + head) / (cfg.n_layer * per_full + head)


def set_malloc(reuse: bool) -> None:
    """Set this process's malloc as a node with run-config reuse-freed-memory=`reuse` does."""
    from ..core.train import freed_memory_reused, reuse_freed_memory

    if reuse:
        reuse_freed_memory()
    elif freed_memory_reused():
        raise RuntimeError("this process already keeps freed memory for reuse (it cannot be undone): "
                           "measure reuse-freed-memory=false in a fresh process")


def bench_step(keeps: tuple[int, ...] = (3, 6, 9), repeats: int = 5, shared: tuple[int, ...] = (0, -1),
               profile: bool = False, reuse: bool = True, precisions: tuple[str, ...] = ("fp32",),
               masked: bool = False, shape: str = "gpt2") -> dict:
    """Step times of the full model and of each keep's subnet (and, with `masked`, of the full
    model masked to that keep), at each precision; every variant and precision takes its turn
    in every repeat. The fp32 figures keep their historical keys (`full_s`, `keep k`); each other
    precision has its own entry, with its speed-up over fp32 paired by repeat."""
    from ..core.precision import precision_scope, resolve_precision
    from ..core.train import OptimConfig, make_optimizer

    set_malloc(reuse)
    run = RunConfig()
    cfg = gpt2_cfg(shared) if shape == "gpt2" else run.model_config()  # the app's default model
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = tuple(resolve_precision(p, dev, "--precision") for p in precisions)
    torch.manual_seed(0)
    full = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (run.batch_size, run.seq_len), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    models: dict[str, tuple[GPT, Blueprint | None]] = {"full": (full, None)}
    for k in keeps:
        bp = sample_blueprints(cfg, 1, k, seed=0, round=0, allow_partial=True)[0]
        models[f"keep {k}"] = (GPT.from_state(cfg, slice_state(full.state_dict(), cfg, bp), blueprint=bp), None)
        if masked:  # the full model trained as that subnet (a masked-mode node)
            models[f"masked {k}"] = (GPT.from_state(cfg, full.state_dict()), bp)
    opts = {name: make_optimizer(m.to(dev), OptimConfig()) for name, (m, _) in models.items()}

    def step(name: str, prec: str) -> float:
        (model, mask), opt = models[name], opts[name]
        sync()
        t = time.perf_counter()
        with precision_scope(prec):
            _, loss = model(x, x, mask=mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t

    times: dict[tuple[str, str], list[float]] = {(n, p): [] for n in models for p in precisions}
    for name, prec in times:  # warm-up: the first step allocates the optimizer state
        step(name, prec)
    for _ in range(repeats):  # interleaved, so drift of the machine hits every variant alike
        for name, prec in times:
            times[(name, prec)].append(step(name, prec))
    res: dict[str, Any] = {"shape": "gpt2 124M" if shape == "gpt2" else run.model, "batch": run.batch_size,
                           "seq_len": run.seq_len,
                           "shared_layers": list(cfg.shared_layer_ids), "threads": torch.get_num_threads(),
                           "device": str(dev), "repeats": repeats, "reuse_freed_memory": reuse,
                           "precisions": list(precisions)}
    if profile:  # where a step's time goes: one more step of each variant, at the first precision
        from torch.profiler import profile as torch_profile

        res["profile"] = {}
        for name in models:
            with torch_profile(record_shapes=True) as prof:
                step(name, precisions[0])
            res["profile"][name] = prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40, max_shapes_column_width=60)

    def variants(prec: str) -> dict[str, Any]:
        out: dict[str, Any] = {"full_s": statistics.median(times[("full", prec)]), "full_all_s": times[("full", prec)]}
        for name in models:
            if name == "full":
                continue
            k = int(name.split()[1])
            # One reduction per repeat, against the full step of the same repeat (paired): the
            # machine's drift between repeats cancels; the median and the range over repeats are kept.
            per_repeat = [1 - t / f for t, f in zip(times[(name, prec)], times[("full", prec)], strict=True)]
            reduction = statistics.median(per_repeat)
            bound = 1 - train_flops_ratio(cfg, k, run.seq_len) if name.startswith("keep") else 0.0
            out[name] = {"step_s": statistics.median(times[(name, prec)]), "all_s": times[(name, prec)],
                         "reduction": reduction, "reduction_min": min(per_repeat),
                         "reduction_max": max(per_repeat), "flop_bound": bound,
                         "of_bound": reduction / bound if bound else None}
        return out

    for prec in precisions:
        if prec == precisions[0]:
            res.update(variants(prec))
        else:
            res[prec] = variants(prec)
            res[prec]["speedup_over_" + precisions[0]] = {
                name: statistics.median(a / b for a, b in zip(times[(name, precisions[0])], times[(name, prec)],
                                                              strict=True))
                for name in models}
    return res


# --- 3. memory -------------------------------------------------------------------------------------

_MEM_CHILD = r"""
import resource, sys, numpy as np, torch
from twist_fl.tools.bench import gpt2_cfg, set_malloc
from twist_fl.core.blueprint import Blueprint, sample_blueprints
from twist_fl.core.config import RunConfig
from twist_fl.core.model import GPT
from twist_fl.core.node import LocalTask, local_update
variant, keep, reuse, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "reuse", sys.argv[4]
set_malloc(reuse)
cfg = gpt2_cfg()
torch.manual_seed(0)
full = {k: v.numpy() for k, v in GPT(cfg).state_dict().items()} if variant != "true" else None
bp = Blueprint.full(cfg) if variant == "dense" else sample_blueprints(cfg, 1, keep, 0, 0, allow_partial=True)[0]
if variant == "true":  # a true node only ever holds its slices: build them without the full model
    torch.manual_seed(0)
    arrays = {k: v.numpy() for k, v in GPT(cfg, blueprint=bp).state_dict().items()}
else:
    arrays = full
run = RunConfig.from_flat({"optimizer-state": "reset", "precision": precision})
tokens = np.random.default_rng(0).integers(0, 50257, size=100_000)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
task = LocalTask(cfg=cfg, blueprint=bp, mode="true" if variant == "true" else "masked", round=1, partition_id=0,
                 lr=1e-3, local_steps=2)
local_update(task, run=run, arrays=arrays, tokens=tokens)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_memory(keep: int = 6, reuse: bool = True, precision: str = "fp32") -> dict[str, Any]:
    res: dict[str, Any] = {"shape": "gpt2 124M", "keep": keep, "unit": "MiB (peak RSS of a fresh process)",
                           "reuse_freed_memory": reuse, "precision": precision}
    for variant in ("true", "masked", "dense"):
        out = subprocess.run([sys.executable, "-c", _MEM_CHILD, variant, str(keep), "reuse" if reuse else "return",
                              precision], capture_output=True, text=True, check=True)
        res[variant] = int(out.stdout.strip().splitlines()[-1]) / 1024
    res["true_vs_dense"] = res["true"] / res["dense"]
    return res


# --- 4. runtime overhead ---------------------------------------------------------------------------


def plain_loop(run: RunConfig, nodes: int) -> tuple[list[float], list[float]]:
    """The same local updates on the same subnets with the same averaging, without Flower;
    the seconds of each round, and of each round's local updates (as nodes report `train-s`)."""
    from ..core.model import initial_model
    from ..core.node import LocalTask, local_update, node_tokens

    set_malloc(run.reuse_freed_memory)
    cfg = run.model_config()
    parts = [node_tokens(run, nodes, p) for p in range(nodes)]
    t = time.perf_counter()
    state = {k: v.numpy() for k, v in initial_model(run).state_dict().items()}
    moments: list[Any] = [None] * nodes
    steps = [0] * nodes
    keep = run.keep_for(cfg) if run.strategy == "twist" else cfg.n_blocks
    times, train = [], []
    for rnd in range(1, run.num_server_rounds + 1):
        bps = sample_blueprints(cfg, nodes, keep, run.seed, rnd)
        contribs = []
        t_train = 0.0
        for p, bp in enumerate(bps):
            t_node = time.perf_counter()
            task = LocalTask(cfg=cfg, blueprint=bp, mode="true", round=rnd, partition_id=p, lr=run.lr_at(rnd),
                             local_steps=run.local_steps)
            r = local_update(task, run=run, arrays=slice_state(state, cfg, bp), tokens=parts[p], moments=moments[p],
                             moment_step=steps[p])
            t_train += time.perf_counter() - t_node
            moments[p], steps[p] = r.moments, r.moment_step
            contribs.append((bp, r.arrays, float(r.metrics["num-examples"])))
        state = coverage_average(state, cfg, contribs)
        now = time.perf_counter()
        times.append(now - t)
        train.append(t_train)
        t = now
    return times, train


def flwr_simulation(flat: dict[str, Any], supernodes: int, out_dir: Path, run_name: str,
                    watch_memory: bool = False) -> tuple[list[dict[str, Any]], int]:
    """`flwr run` of this checkout's app with run config `flat` (whose out-dir is `out_dir` and
    run-name `run_name`) on a fresh local SuperLink with `supernodes` simulated SuperNodes, its
    FLWR_HOME inside `out_dir`; the SuperLink is ours and stopped by PID. Returns the rows of the
    run's metrics.jsonl and, with `watch_memory`, the peak total resident memory in bytes of every
    process of the run (sampled every 0.2 s; else 0)."""
    import threading

    from ..deploy.local import SimulationSuperLink
    from ..deploy.procs import flwr_env

    root = Path(__file__).resolve().parents[2]
    flwr = str(Path(sys.executable).with_name("flwr"))
    env = flwr_env(out_dir / "flwr-home")
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in flat.items())  # TOML: "text", true, 3, 0.5
    link = SimulationSuperLink(env)  # what `flwr run` would start detached: ours, stopped by PID
    link.start()
    peak, stop, roots = [0], threading.Event(), [link.proc.pid]
    sampler = threading.Thread(target=_sample_peak_rss, args=(roots, stop, peak), daemon=True)
    try:
        proc = subprocess.Popen([flwr, "run", str(root), "--stream", "--run-config", overrides,
                                 "--federation-config", f"num-supernodes={supernodes}"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if watch_memory:
            roots.append(proc.pid)
            sampler.start()
        log_text, _ = proc.communicate(timeout=4 * 3600)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run exited with {proc.returncode}; its output ends with:\n{log_text[-3000:]}")
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        link.stop()
    metrics = out_dir / run_name / "metrics.jsonl"
    if not metrics.is_file():  # `flwr run` exits 0 even when the ServerApp fails
        raise RuntimeError(f"the run with {supernodes} SuperNodes wrote no metrics; its output ends with:\n"
                           f"{log_text[-3000:]}")
    return [json.loads(x) for x in metrics.read_text().splitlines()], peak[0]


def bench_overhead(rounds: int | None = None, nodes: int = 4, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """`flwr run` (a fresh local SuperLink, Ray, the app) vs `plain_loop`, same config and work,
    `rounds` rounds (default: the app's num-server-rounds), with `config` (run-config keys) on top
    of the app's defaults. The app's one evaluation after the last round is timed by the app and
    taken out.

    Besides the ratio of the totals, the run is split in two from the time each round's line was
    written to metrics.jsonl: rounds 2..N against the same rounds of the plain loop (per-round
    ratios, paired by round), and the fixed cost: everything else (start-up of the SuperLink,
    Ray and the app, the first round's extra, shut-down), in seconds beyond the plain loop's round 1.
    Each round of 2..N is split once more: the nodes' local updates (the `train_s` they report,
    summed), against the plain loop's, and the rest of the round, in seconds.
    """
    import tempfile

    rounds = rounds or RunConfig().num_server_rounds
    if rounds < 2:
        raise ValueError(f"--rounds {rounds}: the overhead benchmark needs at least 2 rounds")
    with tempfile.TemporaryDirectory() as d:
        flat = {**(config or {}), "num-server-rounds": rounds, "eval-every": 10**6, "out-dir": d,
                "run-name": "overhead"}
        run = RunConfig.from_flat(flat)
        plain, plain_train = plain_loop(run, nodes)
        t_launch = time.time()
        rows, _ = flwr_simulation(flat, nodes, Path(d), "overhead")
        t_exit = time.time()
    t_eval = sum(r.get("eval_s", 0) for r in rows)
    ends = [r["time"] - r.get("eval_s", 0) for r in rows]  # each round's end, its evaluation taken out
    app_rounds = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # rounds 2..N
    per_round = [a / p for a, p in zip(app_rounds, plain[1:], strict=True)]
    app_train = [sum(n.get("train_s", 0.0) for n in r["nodes"]) for r in rows[1:]]
    train_ratio = [a / p for a, p in zip(app_train, plain_train[1:], strict=True)]
    t_app = t_exit - t_launch - t_eval
    return {"rounds": rounds, "nodes": nodes, "plain_s": sum(plain), "flwr_run_s": t_app, "eval_s": t_eval,
            "ratio": t_app / sum(plain),
            "per_round_ratio": statistics.median(per_round), "per_round_ratio_min": min(per_round),
            "per_round_ratio_max": max(per_round),
            "fixed_s": t_app - sum(app_rounds) - plain[0],
            "train_ratio": statistics.median(train_ratio),
            "train_ratio_min": min(train_ratio), "train_ratio_max": max(train_ratio),
            "rest_s": statistics.median(a - t for a, t in zip(app_rounds, app_train, strict=True)),
            "plain_rest_s": statistics.median(p - t for p, t in zip(plain[1:], plain_train[1:], strict=True)),
            "plain_round_s": plain, "flwr_round_s": app_rounds, "plain_train_s": plain_train,
            "flwr_train_s": app_train}


def bench_nodes(counts: tuple[int, ...] = (4, 20, 50), rounds: int = 5, per_round: int = 4,
                config: dict[str, Any] | None = None) -> dict[str, Any]:
    """`flwr run` simulations of the default model with `count` SuperNodes, `per_round` of them
    sampled each round (run-config num-nodes) and character partitioning: the median wall time of
    rounds 2..N (from metrics.jsonl) and the peak resident memory of every process of the run
    (the local SuperLink and what it starts: the simulation, Ray's processes and actors, and
    `flwr run`), sampled every 0.2 s."""
    import tempfile

    out: dict[str, Any] = {"rounds": rounds, "per_round": per_round, "runs": {}}
    for count in counts:
        with tempfile.TemporaryDirectory() as d:
            flat = {"num-server-rounds": rounds, "num-nodes": per_round, "partitioning": "character",
                    "eval-every": 10**6, "out-dir": d, "run-name": "nodes", **(config or {})}
            RunConfig.from_flat(flat)
            rows, peak = flwr_simulation(flat, count, Path(d), "nodes", watch_memory=True)
        times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]
        out["runs"][str(count)] = {"round_s_median": statistics.median(times), "round_s": times,
                                   "peak_rss_mib": peak / 2**20,
                                   "nodes_per_round": [len(r["nodes"]) for r in rows]}
    return out


def _sample_peak_rss(roots: list[int], stop, peak: list[int], every: float = 0.2) -> None:
    """Until `stop` is set: peak[0] = the largest total resident memory of the process trees of `roots`."""
    from ..deploy.procs import rss_bytes, tree_pids

    while not stop.is_set():
        pids = {p for r in roots for p in tree_pids(r)}
        peak[0] = max(peak[0], sum(rss_bytes(p) for p in pids))
        stop.wait(every)


def _malloc_label(res: dict[str, Any]) -> str:
    return "freed memory reused" if res["reuse_freed_memory"] else "glibc's default malloc"


def _print(name: str, res: dict[str, Any]) -> None:
    if name == "bytes":
        print(f"bytes per round, {res['shape']}, {res['nodes']} nodes, shared layers {res['shared_layers']}")
        print(f"{'':22} | {'down/node MB':>12} | {'up/node MB':>10} | {'total MB':>9} | vs dense fp32 | overhead")
        for label, r in res["rows"].items():
            print(f"{label:22} | {r['down_per_node'] / 1e6:>12.2f} | {r['up_per_node'] / 1e6:>10.2f} | "
                  f"{(r['down_total'] + r['up_total']) / 1e6:>9.1f} | {r['vs_dense_fp32']:>12.1%} | "
                  f"{r['overhead_over_raw']:.3%}")
    elif name == "step":
        precs = res.get("precisions", ["fp32"])
        for variant, table in res.get("profile", {}).items():
            print(f"profile of one step, {variant}:\n{table}")
        for prec in precs:
            r0 = res if prec == precs[0] else res[prec]
            print(f"training step, {res['shape']}, batch {res['batch']} x {res['seq_len']}, shared layers "
                  f"{res['shared_layers']}, {res['threads']} threads, {_malloc_label(res)}, {prec}, median of "
                  f"{res['repeats']}: full {r0['full_s']:.2f} s")
            for k, r in r0.items():
                if k.startswith(("keep", "masked")):
                    bound = f", FLOP bound {r['flop_bound']:.1%}, measured/bound {r['of_bound']:.0%}" \
                        if r["of_bound"] is not None else ""
                    print(f"  {k}: {r['step_s']:.2f} s, reduction vs full {r['reduction']:.1%} (range "
                          f"{r['reduction_min']:.1%} to {r['reduction_max']:.1%}){bound}")
            if prec != precs[0]:
                print(f"  {prec} speed-up over {precs[0]} (median of paired repeats): " + ", ".join(
                    f"{n} {v:.2f}x" for n, v in r0[f"speedup_over_{precs[0]}"].items()))
    elif name == "memory":
        for r in (res.values() if "shape" not in res else [res]):
            print(f"peak RSS, {r['shape']}, {_malloc_label(r)}, {r['precision']}, keep {r['keep']}: true "
                  f"{r['true']:.0f} MiB, masked {r['masked']:.0f} MiB, dense {r['dense']:.0f} MiB (true/dense "
                  f"{r['true_vs_dense']:.2f})")
    elif name == "nodes":
        print(f"flwr run simulation, default model, character partitioning, {res['per_round']} nodes sampled per "
              f"round, {res['rounds']} rounds:")
        for count, r in res["runs"].items():
            print(f"  {count:>3} SuperNodes: median round {r['round_s_median']:.1f} s (rounds 2..{res['rounds']}), "
                  f"peak memory of the run's processes {r['peak_rss_mib']:,.0f} MiB")
    elif name == "overhead":
        print(f"runtime overhead, {res['rounds']} rounds x {res['nodes']} nodes: plain loop {res['plain_s']:.1f} s, "
              f"flwr run {res['flwr_run_s']:.1f} s (final evaluation of {res['eval_s']:.1f} s taken out), "
              f"ratio {res['ratio']:.3f}")
        print(f"  rounds 2..{res['rounds']}: flwr / plain per round {res['per_round_ratio']:.3f} (median; range "
              f"{res['per_round_ratio_min']:.3f} to {res['per_round_ratio_max']:.3f}); fixed cost (start-up, first "
              f"round's extra, shut-down) {res['fixed_s']:.1f} s")
        print(f"  in those rounds: the nodes' local updates, flwr / plain {res['train_ratio']:.3f} (median; range "
              f"{res['train_ratio_min']:.3f} to {res['train_ratio_max']:.3f}); the rest of a round (median) "
              f"{res['rest_s']:.2f} s in flwr run, {res['plain_rest_s']:.2f} s in the plain loop")


IN_PROCESS = ("bytes", "step", "memory", "overhead")  # what `all` runs
ELSEWHERE = ("ddp", "export", "inference")  # bench_<name>.py, with their own options


def build_parser() -> argparse.ArgumentParser:
    from . import help as H

    ap = H.parser("twist-fl bench", __doc__, "bench")
    ap.add_argument("which", nargs="?", default="all", choices=(*IN_PROCESS, "nodes", *ELSEWHERE, "all"),
                    help="all: " + ", ".join(IN_PROCESS) + "; ddp, export and inference take their own options "
                    "(twist-fl bench ddp --help)")
    ap.add_argument("--nodes", default="4,20,50", help="nodes: SuperNode counts to simulate")
    ap.add_argument("--repeats", type=int, default=5, help="step: timed repeats (the median is reported)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the overhead benchmark (default: the app's num-server-rounds)")
    ap.add_argument("--profile", action="store_true", help="step: also print a torch.profiler table of one step "
                    "of each variant (self CPU time by operator and input shapes)")
    ap.add_argument("--return-freed-memory", action="store_true", help="step, memory, overhead: leave glibc's "
                    "malloc at its default, as nodes do with run-config reuse-freed-memory=false")
    ap.add_argument("--precision", default="fp32", help="step, memory: comma list of fp32, bf16, fp16, auto "
                    "(step compares them in one process; memory measures each in its own)")
    ap.add_argument("--masked", action="store_true", help="step: also the full model masked to each keep")
    ap.add_argument("--keeps", default="", help="step: the subnet sizes (default: 3,6,9 of GPT-2's 12; 2,4,6 of 8 "
                    "for --shape default)")
    ap.add_argument("--shape", choices=("gpt2", "default"), default="gpt2", help="step: GPT-2 124M or the app's "
                    "default model")
    ap.add_argument("--json", help="also write the results here (a file; replaced), with the machine they came from")
    return ap


def _step_keeps(ap: argparse.ArgumentParser, text: str, shape: str) -> tuple[int, ...]:
    """--keeps checked against the shape's blocks per layer (a usage error otherwise)."""
    from ..core.config import RunConfig

    cfg = gpt2_cfg((0, -1)) if shape == "gpt2" else RunConfig().model_config()
    if not text.strip():
        return (3, 6, 9) if shape == "gpt2" else (2, 4, 6)
    try:
        keeps = tuple(int(k) for k in text.split(",") if k.strip())
        if not keeps:
            raise ValueError
    except ValueError:
        ap.error(f"--keeps {text!r} must be a comma list of integers, e.g. '3,6,9'")
    for k in keeps:
        if not 1 <= k < cfg.n_blocks:
            ap.error(f"--keeps entry {k} is out of range for --shape {shape}: allowed 1..{cfg.n_blocks - 1} of its "
                     f"{cfg.n_blocks} blocks per layer")
    return keeps


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ELSEWHERE:  # the benchmarks with their own module and options
        import importlib

        return importlib.import_module(f"{__package__}.bench_{argv[0]}").main(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.json:
        from ..core.io import claim_output

        try:
            claim_output(args.json, force=True, what="--json", kind="file")  # a benchmark's result is replaced
        except (ValueError, OSError) as e:
            ap.error(str(e))
    keeps = _step_keeps(ap, args.keeps, args.shape)
    reuse = not args.return_freed_memory
    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    for p in precisions:
        if p not in PRECISIONS:
            ap.error(f"--precision entry {p!r} is not allowed; allowed: {list(PRECISIONS)}")
    names = IN_PROCESS if args.which == "all" else (args.which,)
    results = {}
    for name in names:
        if name == "bytes":
            results[name] = bench_bytes()
        elif name == "step":
            results[name] = bench_step(keeps=keeps, repeats=args.repeats,
                                       profile=args.profile, reuse=reuse, precisions=precisions, masked=args.masked,
                                       shape=args.shape)
        elif name == "memory":
            results[name] = {p: bench_memory(reuse=reuse, precision=p) for p in precisions} \
                if len(precisions) > 1 else bench_memory(reuse=reuse, precision=precisions[0])
        elif name == "nodes":
            results[name] = bench_nodes(tuple(int(x) for x in args.nodes.split(",")), rounds=args.rounds or 5)
        else:
            results[name] = bench_overhead(rounds=args.rounds, config=None if reuse else {"reuse-freed-memory": False})
        _print(name, results[name])
    if args.json:
        from ..core.precision import machine

        write_json(Path(args.json), {**results, "machine": machine()})  # the CPU kind and torch behind the figures
    return 0


if __name__ == "__main__":
    sys.exit(main())

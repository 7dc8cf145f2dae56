"""Tuned and seeded comparison of TwIST, FedAvg, DDP and the partial-model methods at one budget.

    twist-fl tune run --out runs/tune            # LR grid at seed 0, then seeds at each best
    twist-fl tune table runs/tune --out docs/results/tuned
    twist-fl tune run --out runs/peers --methods twist,heterofl,fjord,fjord-sd,fedrolex,fedavg,ddp \
        --capacities 1,0.75,0.5,0.25 --lrs 1.5e-3,2e-3    # the partial-model methods (METHODS)
    twist-fl tune table runs/peers --out docs/results/peers
    twist-fl tune finetune --out runs/ft           # the fine-tune regime (tools/finetune.py)
    twist-fl tune finetune-table runs/ft --out docs/results/finetune

A method is a strategy with the run-config keys that make it (`METHODS`): HeteroFL, FjORD and
FedRolex are the Flower app with another `subnet-policy`, every node holding as many blocks as its
capacity allows (`keep` = N, capped by `--capacities`); `twist-fit` is TwIST's random subnets at
those same sizes (`twist` keeps N/2, capped by capacity). `--strategies` is the same as `--methods`.
`run` trains every (method, lr) of the grid at seed 0 with the sweep's job runner (the Flower
apps on an in-process Grid; DDP on torch.distributed), picks each strategy's learning rate with
the lowest validation perplexity of the full model, and trains that config with the other
seeds. Jobs go to `<out>/<strategy>-lr<lr>-s<seed>/run/`; a job whose summary.json exists is
skipped, so an interrupted `run` continues where it stopped. `table` reads every run folder
under the given roots and writes `TUNING.md` and `tuning.json`: the grid, and each strategy at
its learning rate (the lowest mean over at least 3 seeds, see `pick_lr`) as mean ± std over
seeds, on validation (from the runs) and test (the final models evaluated here: the full model
and random subnets at each eval keep).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import RunConfig, quarters_of
from ..core.io import WriteError, atomic_write_text, claim_output, release_claims, write_json
from ..evaluation.compare import test_ppl
from ..evaluation.stats import paired_ratio
from . import help as H
from .finetune_table import LR_CHOICES
from .help import shown

log = logging.getLogger(__name__)

LRS = (1e-3, 1.5e-3, 2e-3, 3e-3, 6e-3)
# method -> (strategy, run-config keys on top of the defaults). The partial-model methods hold
# every block their node's capacity allows (keep 0 is read as N there, see `method_overrides`).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "twist": ("twist", {}),
    "twist-fit": ("twist", {"keep": "full"}),  # random subnets as large as each node's capacity allows
    "fedavg": ("fedavg", {}),
    "ddp": ("ddp", {}),
    "heterofl": ("twist", {"subnet-policy": "ordered", "keep": "full"}),
    "fjord": ("twist", {"subnet-policy": "ordered", "keep-choices": "quarters"}),
    "fjord-sd": ("twist", {"subnet-policy": "ordered", "keep-choices": "quarters", "self-distill-weight": 1.0}),
    "fedrolex": ("twist", {"subnet-policy": "rolling", "keep": "full"}),
    # TwIST's random subnets over a nested core of N/4 blocks every subnet holds (core-blocks), at N/2 or at
    # FjORD's sizes; deployed as their prefix, and as random subnets holding the core
    "twist-core": ("twist", {"core-blocks": "quarter"}),
    "twist-core-mixed": ("twist", {"core-blocks": "quarter", "keep-choices": "quarters"}),
    # the same with a core of N/2: FjORD's prefixes up to N/2, random blocks beyond the core above it
    "twist-core-half-mixed": ("twist", {"core-blocks": "half", "keep-choices": "quarters"}),
}
PLAN = "plan.json"  # the commands `run` was given, written into --out
MIN_SEEDS = 3  # a learning rate is compared on its mean over at least this many seeds


def job_dir(out: Path, strategy: str, lr: float, seed: int) -> Path:
    return out / f"{strategy}-lr{lr:g}-s{seed}"


def method_overrides(method: str, n_blocks: int) -> dict[str, Any]:
    """The run-config keys of a method (`METHODS`), for a model of `n_blocks` blocks per layer:
    `keep="full"` is N, `keep-choices="quarters"` is N/4, N/2, 3N/4, N, and `core-blocks` "quarter" and
    "half" are N/4 and N/2."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not allowed; allowed: {list(METHODS)}")
    strategy, keys = METHODS[method]
    out: dict[str, Any] = {"strategy": strategy}
    for k, v in keys.items():
        if v == "full":
            v = n_blocks
        elif v == "quarters":
            v = ",".join(str(quarters_of(n_blocks, q)) for q in (1, 2, 3, 4))
        elif v == "quarter":
            v = quarters_of(n_blocks, 1)
        elif v == "half":
            v = quarters_of(n_blocks, 2)
        out[k] = v
    return out


def method_of(run: dict[str, Any], n_blocks: int = 0) -> str:
    """The method a run's config is (the inverse of `METHODS`, for any run folder of a model of
    `n_blocks` blocks per layer)."""
    strategy = str(run.get("strategy", "twist"))
    policy = str(run.get("subnet-policy") or "random")
    core = int(run.get("core-blocks") or 0)
    if strategy == "twist" and policy == "random" and core > 0:
        if run.get("keep-choices") and n_blocks // 4 < core == n_blocks // 2:
            return "twist-core-half-mixed"
        return "twist-core-mixed" if run.get("keep-choices") else "twist-core"
    if strategy == "twist" and policy == "random" and n_blocks and int(run.get("keep") or 0) >= n_blocks:
        return "twist-fit"
    if strategy != "twist" or policy == "random":
        return strategy
    if policy == "rolling":
        return "fedrolex"
    if float(run.get("self-distill-weight") or 0) > 0:
        return "fjord-sd"
    return "fjord" if run.get("keep-choices") else "heterofl"


def _job(out: Path, method: str, lr: float, seed: int, nodes: int, overrides: dict[str, Any],
         capacities: list[float] | None, threads: int = 0) -> float:
    """One job of the grid (skipped when its summary.json exists); its validation perplexity.
    `threads` > 0 sets torch's thread count (a job in a worker process of `--parallel`)."""
    d = job_dir(out, method, lr, seed)
    done = d / "run" / "summary.json"
    if not done.is_file():
        from .sweep import clear_interrupted, run_job

        clear_interrupted(d / "run", "tune")
        if threads:
            import torch

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            torch.set_num_threads(threads)
        base = {**RunConfig().to_flat(), **overrides}
        n_blocks = RunConfig.from_flat(base).model_config().n_blocks
        flat = {**base, **method_overrides(method, n_blocks), "lr": lr, "seed": seed,
                "out-dir": str(d), "run-name": "run"}
        RunConfig.from_flat(flat).check_nodes(nodes)
        log.info("tune: %s lr=%g seed=%d -> %s", method, lr, seed, d)
        run_job(flat, nodes, "local", None if METHODS[method][0] == "ddp" else capacities)
    return float(json.loads(done.read_text())["final"]["full"]["ppl"])


def _executor(parallel: int):
    """`parallel` worker processes (spawned: each job starts clean) and each one's torch threads."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import os

    from ..core.train import die_with_parent

    return cf.ProcessPoolExecutor(parallel, mp_context=mp.get_context("spawn"), initializer=die_with_parent), \
        max(1, (os.cpu_count() or 1) // parallel)


def _pool(parallel: int, jobs: list[tuple]) -> None:
    pool, threads = _executor(parallel)
    with pool:
        for f in [pool.submit(_job, *j, threads) for j in jobs]:
            f.result()


def lrs_from(path: Path, methods: list[str]) -> dict[str, float]:
    """Each method's learning rate from a `tune table`'s tuning.json (its tuned rows)."""
    try:
        rows = json.loads(Path(path).read_text())["tuned"]
        lrs = {r.get("method", r.get("strategy")): float(r["lr"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--lrs-from={str(path)!r} is not a tuning.json written by `twist-fl tune table` ({e})") \
            from None
    missing = [m for m in methods if m not in lrs]
    if missing:
        raise ValueError(f"--lrs-from={str(path)!r} has no learning rate for {missing}; it has {sorted(lrs)}")
    return {m: lrs[m] for m in methods}


def run_grid(out: Path, strategies: list[str], lrs: list[float], seeds: int, nodes: int,
             overrides: dict[str, Any], capacities: list[float] | None = None, parallel: int = 1,
             fixed: dict[str, float] | None = None) -> dict[str, float]:
    """Train the grid (every method and lr at seed 0), then each method's other seeds at its best
    lr; returns each method's chosen learning rate. `strategies` are method names (`METHODS`);
    `capacities` are the nodes' (cycled over nodes). `parallel` > 1 runs that many jobs at once in
    worker processes, a method's seeds starting as soon as its grid is done. `fixed` (method -> lr)
    skips the grid: every seed at that rate."""
    best: dict[str, float] = {}
    if fixed:  # learning rates tuned elsewhere: every seed at once, seed by seed
        jobs = [(m, fixed[m], seed) for seed in range(seeds) for m in strategies]
        if parallel <= 1:
            for j in jobs:
                _job(out, *j, nodes, overrides, capacities)
        else:
            _pool(parallel, [(out, *j, nodes, overrides, capacities) for j in jobs])
        return {m: fixed[m] for m in strategies}

    def choose(method: str, grid: dict[float, float]) -> None:
        best[method] = min(grid, key=grid.get)
        edge = " (at the edge of the grid: widen it)" if best[method] in (min(lrs), max(lrs)) else ""
        log.info("tune: %s best lr %g, validation perplexity %.3f at seed 0%s", method, best[method],
                 grid[best[method]], edge)

    if parallel <= 1:
        for m in strategies:
            choose(m, {lr: _job(out, m, lr, 0, nodes, overrides, capacities) for lr in lrs})
        for seed in range(1, seeds):
            for m in strategies:
                _job(out, m, best[m], seed, nodes, overrides, capacities)
        return best

    import concurrent.futures as cf

    grids: dict[str, dict[float, float]] = {m: {} for m in strategies}
    pool, threads = _executor(parallel)
    with pool:
        pending = {pool.submit(_job, out, m, lr, 0, nodes, overrides, capacities, threads): (m, lr)
                   for m in strategies for lr in lrs}
        while pending:
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                m, lr = pending.pop(f)
                if lr is None:  # one of a method's other seeds
                    f.result()
                    continue
                grids[m][lr] = f.result()
                if len(grids[m]) == len(lrs):
                    choose(m, grids[m])
                    pending.update({pool.submit(_job, out, m, best[m], seed, nodes, overrides, capacities, threads):
                                    (m, None) for seed in range(1, seeds)})
    return best


# --- the table ---------------------------------------------------------------------------


def collect(roots: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for root in roots:
        for f in sorted(Path(root).rglob("summary.json")):
            s = json.loads(f.read_text())
            if "strategy" in s and "run" in s and s.get("final") and (f.parent / "model").is_dir():
                runs.append({**s, "run_folder": str(f.parent), "root": str(root)})  # where it is now
    if not runs:
        raise ValueError(f"no finished run folder (summary.json, model/) under {[str(r) for r in roots]}")
    return runs


def pick_lr(ppl_by_lr: dict[float, list[float]], min_seeds: int = MIN_SEEDS) -> float:
    """A strategy's learning rate from its runs' validation perplexities (one list of seeds per lr):
    the lowest mean among the learning rates run with at least `min_seeds` seeds; when none has
    that many, the most-seeded, then the lowest mean."""
    def score(lr: float) -> tuple[bool, int, float]:
        n = len(ppl_by_lr[lr])
        return n < min_seeds, 0 if n >= min_seeds else -n, float(np.mean(ppl_by_lr[lr]))

    return min(ppl_by_lr, key=score)


def _ms(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def bytes_per_node_round(run_folder: str) -> float:
    """Bytes a node sends and receives in a round, averaged over the run's rounds and nodes
    (from metrics.jsonl: every round row's totals over the nodes that trained)."""
    total, nodes = 0, 0
    for line in (Path(run_folder) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "bytes_down_total" in row and row.get("nodes"):
            total += int(row["bytes_down_total"]) + int(row["bytes_up_total"])
            nodes += len(row["nodes"])
    return total / nodes if nodes else float("nan")


def _plans(roots: list[Path]) -> list[dict[str, Any]]:
    """The commands `run` was given under these roots (their plan.json)."""
    return [p for r in roots if (Path(r) / PLAN).is_file() for p in json.loads((Path(r) / PLAN).read_text())["runs"]]


def paired_rows(rows: list[dict[str, Any]], keys: list[str], n: int) -> tuple[list[dict[str, Any]], str]:
    """Every method against every later one at its own rate, on the test split, paired by seed: what
    each deploys (full, and each size), and the random subnets where either deploys a prefix.
    Returns the rows (for tuning.json) and their markdown section ('' when fewer than two methods
    share a seed)."""
    cols = ["full"] + keys + [f"random-{k}" for k in keys]
    out, lines = [], []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            ratios = {}
            for c in cols:
                va, vb = a["test"].get(c) or [], b["test"].get(c) or []
                if len(va) != len(a["seeds"]) or len(vb) != len(b["seeds"]):
                    continue  # a column some seed lacks: no pairing
                r = paired_ratio(dict(zip(a["seeds"], va, strict=True)), dict(zip(b["seeds"], vb, strict=True)))
                if r is not None:
                    ratios[c] = r
            if ratios:
                out.append({"a": a["method"], "b": b["method"], **{c: r.to_dict() for c, r in ratios.items()}})
                lines.append(f"| {a['method']} / {b['method']} | "
                             + " | ".join(ratios[c].text() if c in ratios else "" for c in cols) + " |")
    if not lines:
        return out, ""
    frac = [f"{k.split('-')[1]}/{n}" for k in keys]
    head = "| test perplexity ratio | full | " + " | ".join(frac + [f"random {f}" for f in frac]) + " |"
    md = ("\n## Paired by seed\n\nEach method at its rate against each other, on the test split: the ratio of "
          "their perplexities per seed, mean ± sample sd [95% t interval] over the seeds both hold. Below 1 favours "
          "the first; an interval that holds 1 is level. X/N: what each deploys (the prefix for ordered methods); "
          "random X/N: random subnets of both.\n\n" + head + "\n|---|" + "---|" * (len(cols)) + "\n"
          + "\n".join(lines) + "\n")
    return out, md


def table(roots: list[Path], out: Path, draws: int = 3, tokens: int = 32768) -> dict[str, Any]:
    from ..core.precision import machine_line
    from ..core.report import tuning_plot
    from .finetune import cached_eval

    runs = collect(roots)
    keys = sorted({k for r in runs for k in r["final"] if k != "full"}, key=lambda k: int(k.split("-")[1]))
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        group = groups.setdefault((method_of(r["run"], r["n_blocks"]), float(r["run"]["lr"])), [])
        twin = next((x for x in group if int(x["run"]["seed"]) == int(r["run"]["seed"])), None)
        if twin is not None:  # one seed counts once: the same method, lr and seed in two folders
            log.warning("tune table: %s is seed %s of %s at lr %g again (as %s); it is counted once", r["run_folder"],
                        r["run"]["seed"], method_of(r["run"], r["n_blocks"]), float(r["run"]["lr"]),
                        twin["run_folder"])
            continue
        group.append(r)
    names = list(METHODS)
    order = sorted(groups, key=lambda g: (names.index(g[0]) if g[0] in names else 99, g[1]))
    n = runs[0]["n_blocks"]
    frac = [f"{k.split('-')[1]}/{n}" for k in keys]
    head = "| method | lr | seeds | full | " + " | ".join(frac) + " |"
    sep = "|---|---|---|---|" + "---|" * len(keys)
    grid = [head, sep]
    for g in order:
        rs = groups[g]
        cells = [_ms([r["final"][k]["mean"] for r in rs]) if all(k in r["final"] for r in rs) else "" for k in keys]
        grid.append(f"| {g[0]} | {g[1]:g} | {len(rs)} | {_ms([r['final']['full']['ppl'] for r in rs])} | "
                    + " | ".join(cells) + " |")
    best: dict[str, float] = {}
    for s in dict.fromkeys(g[0] for g in order):
        best[s] = pick_lr({g[1]: [r["final"]["full"]["ppl"] for r in groups[g]] for g in order if g[0] == s})
    keeps = [int(k.split("-")[1]) for k in keys]
    ordered = any(r["run"].get("subnet-policy") == "ordered" or int(r["run"].get("core-blocks") or 0) > 0
                  for r in runs)
    rnd = [f"random {f}" for f in frac] if ordered else []
    tuned = ["| method | lr | seeds | split | full | " + " | ".join(frac + rnd) + " | MB / node / round |",
             "|---|---|---|---|---|" + "---|" * (len(keys) + len(rnd)) + "---|"]
    rows = []
    for s, lr in best.items():
        rs = groups[(s, lr)]
        tests = [cached_eval(Path(r["root"]), "test_ppl", [Path(r["run_folder"])],
                             {"keeps": keeps, "draws": draws, "tokens": tokens},
                             lambda r=r: test_ppl(r["run_folder"], keeps, draws, tokens)) for r in rs]
        mb = [bytes_per_node_round(r["run_folder"]) / 1e6 for r in rs]
        valid = {"full": [r["final"]["full"]["ppl"] for r in rs],
                 **{k: [r["final"][k]["mean"] for r in rs if k in r["final"]] for k in keys}}
        test = {"full": [t["full"] for t in tests],
                **{k: [t.get(f"deployed-{k.split('-')[1]}", t[k]) for t in tests] for k in keys},
                **{f"random-{k}": [t[k] for t in tests] for k in keys}}
        rows.append({"method": s, "strategy": rs[0]["strategy"], "lr": lr, "seeds": [int(r["run"]["seed"]) for r in rs],
                     "valid": valid, "test": test, "mb_per_node_round": mb,
                     "run_folders": [r["run_folder"] for r in rs]})
        for split, vals in (("valid", valid), ("test", test)):
            cells = [_ms(vals[k]) if vals[k] else "" for k in keys]
            if ordered:
                cells += [_ms(vals[f"random-{k}"]) if split == "test" else "" for k in keys]
            tuned.append(f"| {s} | {lr:g} | {len(rs)} | {split} | {_ms(vals['full'])} | " + " | ".join(cells)
                         + f" | {np.mean(mb):.2f} |")
    pairs, paired_md = paired_rows(rows, keys, n)
    plans = _plans(roots)
    setup = ("\n\nThe commands run into these folders (a job already finished is not run again):\n\n"
             + "\n".join(f"- `{shown(p['command'])}`" for p in plans)) if plans else ""
    deployed = (" For `ordered` methods (HeteroFL, FjORD) X/N is the nested prefix the model is deployed as (the "
                "*random* columns: random subnets of the same models); for the others, random subnets."
                if ordered else "")
    md = ("# Tuned learning rates, over seeds\n\n![each method at its learning rate, test perplexity against "
          "blocks kept](tuning.png)\n\nPerplexity of the final model (full) and of subnets "
          f"keeping X of {n} blocks per layer (random subnets: mean over draws), mean ± std over seeds.{deployed} "
          "MB / node / round: what a node sends and receives in a round, averaged over rounds and nodes. "
          f"Machine: {machine_line()}; deterministic for the same command on the same CPU kind." + setup
          + "\n\n## Learning-rate grid\n\n"
          + "\n".join(grid) + "\n\n## Each method at its learning rate\n\nEach method's learning rate: the "
          f"lowest mean validation perplexity (full model) among those run with at least {MIN_SEEDS} seeds (when "
          "none has that many: the most seeds, then the lowest mean). Validation: the runs' last evaluation "
          f"({runs[0]['run']['eval-tokens']} tokens); test: {tokens} tokens of the test split, {draws} random "
          "subnets per size.\n\n" + "\n".join(tuned) + "\n" + paired_md)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "TUNING.md", md)
    result = {"grid": {f"{g[0]}-lr{g[1]:g}": [r["final"] for r in groups[g]] for g in order}, "tuned": rows,
              "paired": pairs, "plans": plans, "n_blocks": n}
    write_json(out / "tuning.json", result)
    tuning_plot(result, out / "tuning.png")
    return {"markdown": md, **result}


def build_parser() -> argparse.ArgumentParser:
    ap = H.parser("twist-fl tune", __doc__, "tune")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="<verb>")
    p = H.sub(sub, "run", "tune run", "the LR grid at seed 0, then the other seeds at each method's best")
    p.add_argument("--out", required=True, help="the folder of the jobs (one setting per folder; resumable)")
    p.add_argument("--methods", "--strategies", dest="methods", default="twist,fedavg,ddp",
                   help=f"comma list of {list(METHODS)}")
    p.add_argument("--capacities", default="", help="comma list of node capacities in (0, 1], cycled over the "
                   "nodes (e.g. 1,0.75,0.5,0.25); default: every node at 1")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="the learning-rate grid (seed 0)")
    p.add_argument("--lrs-from", default="", help="a tuning.json (`tune table`): each method at the learning rate "
                   "tuned there, no grid")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each method at its best rate")
    p.add_argument("--nodes", type=int, default=4, help="nodes (Flower; run-config num-nodes samples from them "
                   "each round) and workers (DDP)")
    p.add_argument("--parallel", type=int, default=1, help="jobs at once, each in its own process with its share "
                   "of the cores")
    p.add_argument("--run-config", default="", help="'key=value ...' on top of the defaults, for every job")
    q = H.sub(sub, "table", "tune table", "TUNING.md and tuning.json from run folders")
    q.add_argument("roots", nargs="+", help="folders of `tune run` (each seed of a method and rate counts once)")
    q.add_argument("--out", required=True, help="the folder for TUNING.md and tuning.json")
    q.add_argument("--draws", type=int, default=3, help="random subnets per size (test split)")
    q.add_argument("--test-tokens", type=int, default=32768, help="test tokens per evaluation")
    q.add_argument("--force", action="store_true", help="write into an --out that holds files (TUNING.md and "
                   "tuning.json are replaced, nothing else is touched)")
    f = H.sub(sub, "finetune", "tune finetune", "dense model, then TwIST vs DDP fine-tuning, budget-matched, with "
              "levers, the recovery baseline and equal bytes")
    f.add_argument("--out", required=True, help="the folder of the jobs (several processes may share it)")
    f.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1: a dense model each, and every stage's job")
    f.add_argument("--nodes", type=int, default=4, help="nodes per round (Flower) and workers (DDP)")
    f.add_argument("--dense-steps", type=int, default=900, help="optimizer steps of the dense stage (DDP)")
    f.add_argument("--dense-lr", type=float, default=1.5e-3, help="the dense stage's lr (DDP's tuned rate)")
    f.add_argument("--ft-steps", type=int, default=300, help="F: fine-tune steps of the main comparison")
    f.add_argument("--ft-ablation", default="150,600", help="other F values, both sides, every seed")
    f.add_argument("--twist-lrs", default="2.5e-4,5e-4,1e-3,1.5e-3,2e-3", help="TwIST's fine-tune grid (seed 0; "
                   "chosen by validation at N/2; a grid holding every rate the folder's plan.json records widens it)")
    f.add_argument("--ddp-lrs", default="2.5e-4,5e-4,1e-3,1.5e-3,2e-3", help="DDP's fine-tune grid (seed 0; chosen "
                   "by validation of its full model; widened like --twist-lrs)")
    f.add_argument("--variants", default=None, help="levers: 'name:key=value ...;name2:...' (default: distill, "
                   "full1, mixed, nesterov, distill-full1)")
    f.add_argument("--ablation-levers", default="", help="comma list of --variants names also run at every F of "
                   "--ft-ablation, every seed")
    f.add_argument("--recovery-lrs", default="5e-4,1e-3,2e-3", help="the recovery baseline's learning-rate grid "
                   "(FLAP-pruned dense model fine-tuned at one size; seed 0, N/2, chosen on validation and kept "
                   "in recovery.json; a rate the kept grid lacks widens it)")
    f.add_argument("--recovery-distill", default="distill-weight=0.8 distill-temperature=2.0",
                   help="the recovery baseline's distillation from the dense model (its second variant; 'none': "
                   "the plain variant only)")
    f.add_argument("--recovery-keeps", default="", help="sizes of the recovery stage (comma list; default N/4, N/2, "
                   "3N/4)")
    f.add_argument("--eqb-levers", default="", help="comma list of --variants names: the eqb stage trains DDP for as "
                   "many steps as the bytes of TwIST (as today, and of each of these levers) buy")
    f.add_argument("--lr-seeds", default="", help="comma list of rates the lr-seeds stage runs on every seed, both "
                   "sides (the grid runs on seed 0 only): the grid's choice checked over seeds")
    f.add_argument("--scratch-variants", default=None, help="levers of the scratch stage, the same form, no "
                   "distillation (default: full1)")
    f.add_argument("--stages", default="dense,grid,pairs,levers,eqc,ablation,scratch",
                   help="which stages to run (the dense stage and the grid always run first)")
    f.add_argument("--no-equal-compute", action="store_true", help="skip TwIST's equal-compute runs")
    f.add_argument("--seed-list", default="", help="after the dense stage and the grid, run only these seeds' "
                   "jobs (e.g. '2'), so that several processes can share the stages; default: every seed")
    f.add_argument("--reverse", action="store_true", help="take the jobs in reverse order: a second process on the "
                   "same --out shares the work (a job one process runs, the other waits for)")
    f.add_argument("--threads", type=int, default=0, help="torch threads of this process (0: torch's default, "
                   "every core); with several processes sharing the machine, cores / processes")
    f.add_argument("--run-config", default="", help="'key=value ...' on top of the defaults, for every job")
    g = H.sub(sub, "finetune-table", "tune finetune-table", "FINETUNE.md and finetune.json from a finetune folder")
    g.add_argument("root", help="the --out of `tune finetune`")
    g.add_argument("--out", required=True, help="the folder for FINETUNE.md and finetune.json")
    g.add_argument("--draws", type=int, default=3, help="random subnets per size and model (test split)")
    g.add_argument("--test-tokens", type=int, default=32768, help="test tokens per evaluation")
    g.add_argument("--keeps", default="", help="comma list; default N/4, N/2, 3N/4")
    g.add_argument("--recipe", default="", help="the lever the table's headline is about (default: the one whose "
                   "deployed N/2 subnets have the lowest validation perplexity)")
    g.add_argument("--lr-choice", choices=LR_CHOICES, default="grid", help="each side's fine-tune rate: "
                   "'grid', the seed-0 grid's choice that `tune finetune` made (plan.json); 'seeds', the lowest mean "
                   "validation perplexity over every seed among the rates run on every seed (the grid's and "
                   "--lr-seeds')")
    g.add_argument("--force", action="store_true", help="write into an --out that holds files (FINETUNE.md and "
                   "finetune.json are replaced, nothing else is touched)")
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..federated.server import flower_logs_once

    flower_logs_once()
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.verb in ("finetune", "finetune-table"):
            return _finetune(args, argv if argv is not None else sys.argv[1:])
        if args.verb == "run":
            from ..baselines.ddp import parse_overrides

            methods = [s.strip() for s in args.methods.split(",") if s.strip()]
            for s in methods:
                if s not in METHODS:
                    raise ValueError(f"--methods entry {s!r} is not allowed; allowed: {list(METHODS)}")
            lrs = _floats(args.lrs, "--lrs")
            caps = _floats(args.capacities, "--capacities") if args.capacities.strip() else None
            if caps and max(caps) > 1:
                raise ValueError(f"--capacities={args.capacities!r} must list numbers in (0, 1]")
            if args.seeds < 1 or args.nodes < 1 or args.parallel < 1:
                raise ValueError(f"--seeds={args.seeds}, --nodes={args.nodes} and --parallel={args.parallel} must "
                                 "be >= 1")
            overrides = parse_overrides(args.run_config)
            RunConfig.from_flat({**RunConfig().to_flat(), **overrides})  # a bad key fails before any job
            fixed = lrs_from(Path(args.lrs_from), methods) if args.lrs_from.strip() else None
            out = Path(args.out)
            if out.exists() and not out.is_dir():
                raise ValueError(f"--out {args.out!r} is a file; it takes a folder for the jobs")
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"--out {args.out!r} cannot be made: {e.strerror or e}") from None
            claim_output(out, force=True)  # one `tune run` per folder at a time (its workers lock each job)
            for old in _plans([out]):  # a folder holds the jobs of one setting
                theirs = {k: old.get(k) for k in ("run_config", "nodes", "capacities")}
                mine = {"run_config": overrides, "nodes": args.nodes, "capacities": caps}
                if theirs != mine:
                    raise ValueError(f"--out {args.out!r} holds the jobs of another setting ({theirs}, by `"
                                     f"{old.get('command')}`); their runs would be reused as if they were this one's: "
                                     "choose another --out")
            plan = {"out": str(out), "methods": methods, "lrs": lrs, "seeds": args.seeds, "nodes": args.nodes,
                    "capacities": caps, "run_config": overrides,
                    "command": "twist-fl tune " + " ".join(shlex.quote(a) for a in
                                                           (argv if argv is not None else sys.argv[1:]))}
            if fixed:
                plan["lrs"] = fixed
            before = [p for p in _plans([out]) if p["command"] != plan["command"]]
            write_json(out / PLAN, {"runs": [*before, plan]})  # every command run into this folder
            best = run_grid(out, methods, lrs, args.seeds, args.nodes, overrides, caps, args.parallel, fixed)
            print(json.dumps({"best_lr": best}))
        else:
            if args.draws < 1 or args.test_tokens < 1:
                raise ValueError(f"--draws={args.draws} and --test-tokens={args.test_tokens} must be >= 1")
            claim_output(args.out, inputs=tuple(args.roots), force=args.force)
            print(table([Path(r) for r in args.roots], Path(args.out), args.draws, args.test_tokens)["markdown"])
    except (ValueError, WriteError) as e:
        print(f"tune: error: {e}", file=sys.stderr)
        return 2
    finally:
        release_claims()
    return 0


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}={text!r} must be a comma list of numbers") from None
    if not vals or min(vals) <= 0:
        raise ValueError(f"{what}={text!r} must list positive numbers")
    return vals


def _seeds(text: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seed-list={text!r} must be a comma list of seeds, e.g. '0,1'") from None
    if min(seeds) < 0:
        raise ValueError(f"--seed-list={text!r} must list seeds >= 0")
    return seeds


def _finetune(args: argparse.Namespace, argv: list[str]) -> int:
    from .finetune import DEFAULT_SCRATCH_VARIANTS, DEFAULT_VARIANTS, Finetune, FinetuneOptions
    from .finetune_table import finetune_table

    if args.verb == "finetune-table":
        if args.draws < 1 or args.test_tokens < 1:
            raise ValueError(f"--draws={args.draws} and --test-tokens={args.test_tokens} must be >= 1")
        claim_output(args.out, inputs=(args.root,), force=args.force)
        print(finetune_table(Path(args.root), Path(args.out), args.draws, args.test_tokens, args.keeps,
                             argv, recipe=args.recipe, lr_choice=args.lr_choice)["markdown"])
        return 0
    from ..baselines.ddp import parse_overrides

    opts = FinetuneOptions(out=args.out, seeds=args.seeds, nodes=args.nodes, dense_steps=args.dense_steps,
                           dense_lr=args.dense_lr, ft_steps=args.ft_steps,
                           ft_ablation=[int(x) for x in _floats(args.ft_ablation, "--ft-ablation")]
                           if args.ft_ablation.strip() else [],
                           twist_lrs=_floats(args.twist_lrs, "--twist-lrs"), ddp_lrs=_floats(args.ddp_lrs, "--ddp-lrs"),
                           variants=DEFAULT_VARIANTS if args.variants is None else args.variants,
                           ablation_levers=[x.strip() for x in args.ablation_levers.split(",") if x.strip()],
                           recovery_lrs=_floats(args.recovery_lrs, "--recovery-lrs"),
                           recovery_distill=args.recovery_distill,
                           recovery_keeps=[int(x) for x in _floats(args.recovery_keeps, "--recovery-keeps")]
                           if args.recovery_keeps.strip() else [],
                           eqb_levers=[x.strip() for x in args.eqb_levers.split(",") if x.strip()],
                           lr_seeds=_floats(args.lr_seeds, "--lr-seeds") if args.lr_seeds.strip() else [],
                           scratch_variants=DEFAULT_SCRATCH_VARIANTS if args.scratch_variants is None
                           else args.scratch_variants,
                           equal_compute=not args.no_equal_compute, run_config=parse_overrides(args.run_config),
                           stages=args.stages, argv=argv,
                           seed_list=_seeds(args.seed_list), reverse=args.reverse)
    if args.threads < 0:
        raise ValueError(f"--threads={args.threads} must be >= 0 (0: torch's default)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps({"best_lr": Finetune(opts).run()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

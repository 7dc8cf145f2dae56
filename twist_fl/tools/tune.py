"""Tuned and seeded comparison of TwIST, FedAvg and DDP at one budget.

    twist-fl tune run --out runs/tune            # LR grid at seed 0, then seeds at each best
    twist-fl tune table runs/tune --out docs/results/tuned
    twist-fl tune finetune --out runs/ft           # the fine-tune regime (tools/finetune.py)
    twist-fl tune finetune-table runs/ft --out docs/results/finetune

`run` trains every (strategy, lr) of the grid at seed 0 with the sweep's job runner (the Flower
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
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import STRATEGIES, RunConfig
from ..core.io import atomic_write_text, write_json
from ..evaluation.compare import test_ppl

log = logging.getLogger(__name__)

LRS = (1e-3, 1.5e-3, 2e-3, 3e-3, 6e-3)
MIN_SEEDS = 3  # a learning rate is compared on its mean over at least this many seeds


def job_dir(out: Path, strategy: str, lr: float, seed: int) -> Path:
    return out / f"{strategy}-lr{lr:g}-s{seed}"


def run_grid(out: Path, strategies: list[str], lrs: list[float], seeds: int, nodes: int,
             overrides: dict[str, Any]) -> dict[str, float]:
    """Train the grid and the seeds; returns each strategy's chosen learning rate."""
    from .sweep import run_job

    def job(strategy: str, lr: float, seed: int) -> dict[str, Any]:
        d = job_dir(out, strategy, lr, seed)
        done = d / "run" / "summary.json"
        if done.is_file():
            return json.loads(done.read_text())
        flat = {**RunConfig().to_flat(), **overrides, "strategy": strategy, "lr": lr, "seed": seed,
                "out-dir": str(d), "run-name": "run"}
        RunConfig.from_flat(flat)
        log.info("tune: %s lr=%g seed=%d -> %s", strategy, lr, seed, d)
        return run_job(flat, nodes, "local")

    best = {}
    for s in strategies:
        grid = {lr: job(s, lr, 0)["final"]["full"]["ppl"] for lr in lrs}
        best[s] = min(grid, key=grid.get)
        edge = " (at the edge of the grid: widen it)" if best[s] in (min(lrs), max(lrs)) else ""
        log.info("tune: %s best lr %g, validation perplexity %.3f at seed 0%s", s, best[s], grid[best[s]], edge)
    for seed in range(1, seeds):
        for s in strategies:
            job(s, best[s], seed)
    return best


# --- the table ---------------------------------------------------------------------------


def collect(roots: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for root in roots:
        for f in sorted(Path(root).rglob("summary.json")):
            s = json.loads(f.read_text())
            if "strategy" in s and "run" in s and s.get("final") and (f.parent / "model").is_dir():
                runs.append({**s, "run_folder": str(f.parent)})  # where it is now, if it was moved
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


def table(roots: list[Path], out: Path, draws: int = 3, tokens: int = 32768) -> dict[str, Any]:
    runs = collect(roots)
    keys = sorted({k for r in runs for k in r["final"] if k != "full"}, key=lambda k: int(k.split("-")[1]))
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["strategy"], float(r["run"]["lr"])), []).append(r)
    order = sorted(groups, key=lambda g: (STRATEGIES.index(g[0]) if g[0] in STRATEGIES else 99, g[1]))
    n = runs[0]["n_blocks"]
    head = "| strategy | lr | seeds | full | " + " | ".join(f"{k.split('-')[1]}/{n}" for k in keys) + " |"
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
    tuned, rows = [head.replace("| seeds |", "| seeds | split |"), sep + "---|"], []
    for s, lr in best.items():
        g = (s, lr)
        rs = groups[g]
        tests = [test_ppl(r["run_folder"], keeps, draws, tokens) for r in rs]
        valid = {"full": [r["final"]["full"]["ppl"] for r in rs],
                 **{k: [r["final"][k]["mean"] for r in rs if k in r["final"]] for k in keys}}
        test = {k: [t[k] for t in tests] for k in ["full", *keys]}
        rows.append({"strategy": s, "lr": g[1], "seeds": [int(r["run"]["seed"]) for r in rs], "valid": valid,
                     "test": test, "run_folders": [r["run_folder"] for r in rs]})
        for split, vals in (("valid", valid), ("test", test)):
            tuned.append(f"| {s} | {g[1]:g} | {len(rs)} | {split} | {_ms(vals['full'])} | "
                         + " | ".join(_ms(vals[k]) if vals[k] else "" for k in keys) + " |")
    md = ("# Tuned learning rates, over seeds\n\nPerplexity of the final model (full) and of random subnets "
          f"keeping X of {n} blocks per layer (mean over draws), mean ± std over seeds.\n\n## Learning-rate grid\n\n"
          + "\n".join(grid) + "\n\n## Each strategy at its learning rate\n\nEach strategy's learning rate: the "
          f"lowest mean validation perplexity (full model) among those run with at least {MIN_SEEDS} seeds (when "
          "none has that many: the most seeds, then the lowest mean). Validation: the runs' last evaluation "
          f"({runs[0]['run']['eval-tokens']} tokens); test: {tokens} tokens of the test split, {draws} random "
          "subnets per size.\n\n" + "\n".join(tuned) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "TUNING.md", md)
    result = {"grid": {f"{g[0]}-lr{g[1]:g}": [r["final"] for r in groups[g]] for g in order}, "tuned": rows}
    write_json(out / "tuning.json", result)
    return {"markdown": md, **result}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="twist-fl tune", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("run", help="the LR grid at seed 0, then the other seeds at each strategy's best")
    p.add_argument("--out", required=True)
    p.add_argument("--strategies", default="twist,fedavg,ddp")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=4, help="nodes per round (Flower) and workers (DDP)")
    p.add_argument("--run-config", default="", help="'key=value ...' on top of the defaults, for every job")
    q = sub.add_parser("table", help="TUNING.md and tuning.json from run folders")
    q.add_argument("roots", nargs="+")
    q.add_argument("--out", required=True)
    q.add_argument("--draws", type=int, default=3)
    q.add_argument("--test-tokens", type=int, default=32768)
    f = sub.add_parser("finetune", help="dense model, then TwIST vs DDP fine-tuning, budget-matched, with levers")
    f.add_argument("--out", required=True)
    f.add_argument("--seeds", type=int, default=3)
    f.add_argument("--nodes", type=int, default=4, help="nodes per round (Flower) and workers (DDP)")
    f.add_argument("--dense-steps", type=int, default=900, help="optimizer steps of the dense stage (DDP)")
    f.add_argument("--dense-lr", type=float, default=1.5e-3, help="the dense stage's lr (DDP's tuned rate)")
    f.add_argument("--ft-steps", type=int, default=300, help="F: fine-tune steps of the main comparison")
    f.add_argument("--ft-ablation", default="150,600", help="other F values, both sides, every seed")
    f.add_argument("--twist-lrs", default="2.5e-4,5e-4,1e-3")
    f.add_argument("--ddp-lrs", default="2.5e-4,5e-4,1e-3")
    f.add_argument("--variants", default=None, help="levers: 'name:key=value ...;name2:...' (default: distill, "
                   "full1, mixed, nesterov, distill-full1)")
    f.add_argument("--scratch-variants", default=None, help="levers of the scratch stage, the same form, no "
                   "distillation (default: full1)")
    f.add_argument("--stages", default="dense,grid,pairs,levers,eqc,ablation,scratch",
                   help="which stages to run (the dense stage and the grid always run first)")
    f.add_argument("--no-equal-compute", action="store_true", help="skip TwIST's equal-compute runs")
    f.add_argument("--seed-list", default="", help="after the dense stage and the grid, run only these seeds' "
                   "jobs (e.g. '2'), so that several processes can share the stages; default: every seed")
    f.add_argument("--reverse", action="store_true", help="take the jobs in reverse order: a second process on the "
                   "same --out shares the work (a job one process runs, the other waits for)")
    f.add_argument("--run-config", default="", help="'key=value ...' on top of the defaults, for every job")
    g = sub.add_parser("finetune-table", help="FINETUNE.md and finetune.json from a finetune folder")
    g.add_argument("root")
    g.add_argument("--out", required=True)
    g.add_argument("--draws", type=int, default=3)
    g.add_argument("--test-tokens", type=int, default=32768)
    g.add_argument("--keeps", default="", help="comma list; default N/4, N/2, 3N/4")
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.verb in ("finetune", "finetune-table"):
            return _finetune(args, argv if argv is not None else sys.argv[1:])
        if args.verb == "run":
            from ..baselines.ddp import parse_overrides

            strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
            for s in strategies:
                if s not in STRATEGIES:
                    raise ValueError(f"--strategies entry {s!r} is not allowed; allowed: {list(STRATEGIES)}")
            try:
                lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--lrs={args.lrs!r} must be a comma list of numbers") from None
            if not lrs or min(lrs) <= 0:
                raise ValueError(f"--lrs={args.lrs!r} must list positive learning rates")
            if args.seeds < 1 or args.nodes < 1:
                raise ValueError(f"--seeds={args.seeds} and --nodes={args.nodes} must be >= 1")
            best = run_grid(Path(args.out), strategies, lrs, args.seeds, args.nodes, parse_overrides(args.run_config))
            print(json.dumps({"best_lr": best}))
        else:
            if args.draws < 1 or args.test_tokens < 1:
                raise ValueError(f"--draws={args.draws} and --test-tokens={args.test_tokens} must be >= 1")
            print(table([Path(r) for r in args.roots], Path(args.out), args.draws, args.test_tokens)["markdown"])
    except ValueError as e:
        print(f"tune: error: {e}", file=sys.stderr)
        return 2
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
    from .finetune import DEFAULT_SCRATCH_VARIANTS, DEFAULT_VARIANTS, Finetune, FinetuneOptions, finetune_table

    if args.verb == "finetune-table":
        if args.draws < 1 or args.test_tokens < 1:
            raise ValueError(f"--draws={args.draws} and --test-tokens={args.test_tokens} must be >= 1")
        print(finetune_table(Path(args.root), Path(args.out), args.draws, args.test_tokens, args.keeps,
                             argv)["markdown"])
        return 0
    from ..baselines.ddp import parse_overrides

    opts = FinetuneOptions(out=args.out, seeds=args.seeds, nodes=args.nodes, dense_steps=args.dense_steps,
                           dense_lr=args.dense_lr, ft_steps=args.ft_steps,
                           ft_ablation=[int(x) for x in _floats(args.ft_ablation, "--ft-ablation")]
                           if args.ft_ablation.strip() else [],
                           twist_lrs=_floats(args.twist_lrs, "--twist-lrs"), ddp_lrs=_floats(args.ddp_lrs, "--ddp-lrs"),
                           variants=DEFAULT_VARIANTS if args.variants is None else args.variants,
                           scratch_variants=DEFAULT_SCRATCH_VARIANTS if args.scratch_variants is None
                           else args.scratch_variants,
                           equal_compute=not args.no_equal_compute, run_config=parse_overrides(args.run_config),
                           stages=args.stages, argv=argv,
                           seed_list=_seeds(args.seed_list), reverse=args.reverse)
    print(json.dumps({"best_lr": Finetune(opts).run()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

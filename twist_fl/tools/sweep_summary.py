"""Gather the runs of a Hydra sweep into one table and one plot.

    twist-fl sweep-summary multirun/<time> [--x run.local_steps] [--dense <run folder>]

Reads each job's `.hydra/overrides.yaml` and `run/summary.json`; writes `summary.md`,
`summary.json` and `summary.png` (final perplexity at each evaluated keep vs the swept value,
with the dense baseline as a horizontal line: a job of the sweep with `strategy=fedavg`, or the
run folder given with --dense).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..core.io import atomic_write_text, write_json
from ..core.report import save_figure

log = logging.getLogger(__name__)


def collect(root: Path) -> list[dict[str, Any]]:
    jobs = []
    for ov in sorted(root.glob("*/.hydra/overrides.yaml")):
        job = ov.parent.parent
        summaries = list(job.glob("*/summary.json"))
        if not summaries:
            continue
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(ov.read_text()) or [])
        jobs.append({"job": job.name, "overrides": overrides, "summary": json.loads(summaries[0].read_text())})
    if not jobs:
        raise ValueError(f"{root} holds no finished sweep job (no */.hydra/overrides.yaml with */summary.json)")
    return jobs


def _num(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


def summarize(root: Path, x: str | None = None, dense: Path | None = None) -> dict[str, Any]:
    """One row per value of the swept key `x`; when the sweep also varies `run.seed`, each cell is
    the mean ± std over seeds (a random subnet's perplexity first averaged over its draws)."""
    jobs = collect(root)
    dense_jobs = [j for j in jobs if j["summary"]["strategy"] == "fedavg"]
    twist_jobs = [j for j in jobs if j["summary"]["strategy"] == "twist"]
    keys = {k for j in twist_jobs for k in j["overrides"]} - {"run.strategy", "run.seed"}
    swept = sorted(k for k in keys if len({j["overrides"].get(k) for j in twist_jobs}) > 1)
    x = x or (swept[0] if len(swept) == 1 else None)
    if x is None:
        raise ValueError(f"cannot tell the swept key among {swept or sorted(keys)}; pass --x (e.g. run.local_steps)")
    dense_ppl = None
    if dense is not None:
        dense_ppl = json.loads((Path(dense) / "summary.json").read_text())["final"]["full"]["ppl"]
    elif dense_jobs:
        dense_ppl = float(np.mean([j["summary"]["final"]["full"]["ppl"] for j in dense_jobs]))
    groups: dict[str, list[dict[str, Any]]] = {}
    for j in twist_jobs:
        group = groups.setdefault(str(j["overrides"].get(x, "")), [])
        def seed_of(job: dict[str, Any]) -> str | None:
            seed = job["overrides"].get("run.seed", job["summary"].get("run", {}).get("seed"))
            return None if seed is None else str(seed)

        seed = seed_of(j)
        twin = next((g for g in group if seed is not None and seed_of(g) == seed), None)
        if twin is not None:  # one seed counts once: the same value of x and the same seed twice
            log.warning("sweep-summary: job %s repeats %s=%s at seed %s (as job %s); it is counted once", j["job"], x,
                        j["overrides"].get(x, ""), seed, twin["job"])
            continue
        group.append(j)
    seeds = max(len(g) for g in groups.values())
    rows = []
    for value in sorted(groups, key=_num):
        finals = [j["summary"]["final"] for j in groups[value]]
        full = [f["full"]["ppl"] for f in finals]
        row: dict[str, Any] = {"x": value, "seeds": len(finals), "full": float(np.mean(full)),
                               "full_std": float(np.std(full)), "rounds": groups[value][0]["summary"]["rounds"],
                               "jobs": [j["job"] for j in groups[value]]}
        for k in {k for f in finals for k in f if k != "full"}:
            means = [f[k]["mean"] for f in finals if k in f]
            # over seeds when there are several; over the draws of the one run otherwise
            spread = float(np.std(means)) if len(means) > 1 else float(finals[0][k]["std"])
            row[k] = (float(np.mean(means)), spread)
        rows.append(row)
    keys = sorted({k for r in rows for k in r if k.startswith("keep-")}, key=lambda k: int(k.split("-")[1]))
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "random subnets: mean ± std over draws"
    lines = [f"Final validation perplexity; {spread}.", "",
             f"| {x} | full | " + " | ".join(keys) + " | rounds | seeds |",
             "|---|---|" + "---|" * len(keys) + "---|---|"]
    for r in rows:
        cells = [f"{r[k][0]:.3f} ± {r[k][1]:.3f}" if k in r else "" for k in keys]
        full = f"{r['full']:.3f} ± {r['full_std']:.3f}" if r["seeds"] > 1 else f"{r['full']:.3f}"
        lines.append(f"| {r['x']} | {full} | " + " | ".join(cells) + f" | {r['rounds']} | {r['seeds']} |")
    if dense_ppl is not None:
        lines.append(f"\nDense FedAvg baseline (full model{', mean over its runs' if len(dense_jobs) > 1 else ''}): "
                     f"{dense_ppl:.3f}")
    out = {"x": x, "rows": rows, "dense_full_ppl": dense_ppl, "table": "\n".join(lines)}
    atomic_write_text(root / "summary.md", f"![final validation perplexity against {x}](summary.png)\n\n"
                      + out["table"] + "\n")
    write_json(root / "summary.json", out)
    _plot(out, keys, root / "summary.png")
    return out


def _plot(out: dict[str, Any], keys: list[str], path: Path) -> None:
    from ..core.report import pyplot, readable

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    at = {str(r["x"]): i for i, r in enumerate(out["rows"])}  # the swept values, evenly spaced, in order
    ax.errorbar(list(at.values()), [r["full"] for r in out["rows"]], yerr=[r["full_std"] for r in out["rows"]],
                fmt="k-o", capsize=3, label="full model")
    for k in keys:
        pts = [(at[str(r["x"])], r[k]) for r in out["rows"] if k in r]
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], fmt="-o",
                    capsize=3, label=f"random subnets, {k}")
    ax.set_xticks(list(at.values()), list(at))
    if out["dense_full_ppl"] is not None:
        ax.axhline(out["dense_full_ppl"], color="gray", ls="--", label="dense FedAvg")
    ax.set_xlabel(out["x"])
    ax.set_ylabel("final validation perplexity")
    readable(ax)
    fig.tight_layout()
    save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    from . import help as H

    ap = H.parser("twist-fl sweep-summary", __doc__, "sweep-summary")
    ap.add_argument("root", help="a Hydra multirun folder")
    ap.add_argument("--x", help="the swept override, e.g. run.local_steps (default: the only one)")
    ap.add_argument("--dense", help="a fedavg run folder for the baseline line")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        out = summarize(Path(args.root), args.x, Path(args.dense) if args.dense else None)
    except (ValueError, OSError) as e:
        print(f"sweep_summary: error: {e}", file=sys.stderr)
        return 2
    print(out["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

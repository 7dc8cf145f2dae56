"""Plots and the end-of-run table, from the rows of metrics.jsonl (no Flower, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Validation perplexity vs round: the full model and each evaluated subnet size (mean +- std)."""
    evals = [r for r in rows if r.get("valid")]
    if not evals:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in evals], [r["valid"]["full"]["ppl"] for r in evals], "k-o", label="full model")
    keys = sorted({k for r in evals for k in r["valid"] if k != "full"}, key=lambda k: int(k.split("-")[1]))
    for k in keys:
        pts = [(r["round"], r["valid"][k]) for r in evals if k in r["valid"]]
        xs = [p[0] for p in pts]
        mean = [p[1]["mean"] for p in pts]
        std = [p[1]["std"] for p in pts]
        ax.plot(xs, mean, "-o", label=f"random subnets, keep {k.split('-')[1]}")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_keeps(final: dict[str, Any], n_total: int, path: Path, title: str) -> Path | None:
    """Validation perplexity vs blocks kept per layer at the end (mean +- std over draws)."""
    if not final:
        return None
    plt = _plt()
    pts = sorted((int(k.split("-")[1]), v["mean"], v["std"]) for k, v in final.items() if k != "full")
    pts.append((n_total, final["full"]["ppl"], 0.0))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="-o", capsize=4)
    ax.set_xlabel(f"blocks kept per layer (of {n_total})")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def final_table(final: dict[str, Any], n_total: int, params: dict[str, int]) -> str:
    """A small table: kept blocks, parameters, perplexity (mean +- std over random subnets)."""
    lines = [f"{'kept blocks':>12} | {'params':>10} | validation perplexity",
             f"{'-' * 12}-+-{'-' * 10}-+-{'-' * 24}",
             f"{f'{n_total}/{n_total} (full)':>12} | {params.get('full', 0):>10,} | {final['full']['ppl']:.3f}"]
    for k, v in sorted(((k, v) for k, v in final.items() if k != "full"), key=lambda kv: -int(kv[0].split("-")[1])):
        keep = int(k.split("-")[1])
        lines.append(f"{f'{keep}/{n_total}':>12} | {params.get(k, 0):>10,} | {v['mean']:.3f} ± {v['std']:.3f} "
                     f"({len(v['draws'])} random subnets)")
    return "\n".join(lines)

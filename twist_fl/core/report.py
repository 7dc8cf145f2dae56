"""Plots and the end-of-run table, from the rows of metrics.jsonl (no Flower, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write


def save_figure(fig, path: Path) -> None:
    """A figure as a PNG, written atomically (a full disk leaves the old file or none), then closed."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(Path(path), lambda p: fig.savefig(p, dpi=120, format="png"))
    finally:
        plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def readable(ax, legend: bool = True, log_y: bool = False, integer_x: bool = False) -> None:
    """The house style of every plot: the legend outside the curves (to the right), a log axis
    labelled with plain numbers (7, 8, 9, 10, not 9x10^0), whole-number ticks where x counts
    (rounds, blocks)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if log_y:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def plot_rounds(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Validation perplexity vs round: the full model and each evaluated subnet size (mean +- std)."""
    evals = [r for r in rows if r.get("valid")]
    if not evals:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([r["round"] for r in evals], [r["valid"]["full"]["ppl"] for r in evals], "k-o", label="full model")
    keys = sorted({k for r in evals for k in r["valid"] if k != "full"}, key=lambda k: int(k.split("-")[1]))
    for k in keys:
        pts = [(r["round"], r["valid"][k]) for r in evals if k in r["valid"]]
        xs = [p[0] for p in pts]
        mean = [p[1]["mean"] for p in pts]
        std = [p[1]["std"] for p in pts]
        ax.plot(xs, mean, "-o", label=f"random subnets, keep {k.split('-')[1]}")
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(xs, lo, hi, alpha=0.2)
    fed = [r for r in rows if r.get("fed_eval", {}).get("nodes")]
    if fed:  # the nodes' own held-out text: token-weighted mean, and the range over the nodes
        xs = [r["round"] for r in fed]
        ax.plot(xs, [r["fed_eval"]["full"]["ppl"] for r in fed], "k--", label="full model, on the nodes' own text")
        ax.fill_between(xs, [r["fed_eval"]["full"]["min"] for r in fed], [r["fed_eval"]["full"]["max"] for r in fed],
                        color="gray", alpha=0.15, label="range over the evaluating nodes")
    ax.set_xlabel("round")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    readable(ax, log_y=True, integer_x=True)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_keeps(final: dict[str, Any], n_total: int, path: Path, title: str) -> Path | None:
    """Validation perplexity vs blocks kept per layer at the end (mean +- std over draws)."""
    if not final:
        return None
    plt = pyplot()
    pts = sorted((int(k.split("-")[1]), v["mean"], v["std"]) for k, v in final.items() if k != "full")
    pts.append((n_total, final["full"]["ppl"], 0.0))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="-o", capsize=4)
    ax.set_xlabel(f"blocks kept per layer (of {n_total})")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    readable(ax, legend=False, integer_x=True)
    fig.tight_layout()
    save_figure(fig, path)
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


def heatmap_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Perplexity of models trained at keep X (rows) evaluated at keep Y (columns)."""
    plt = pyplot()
    keys = sorted({k for r in rows for k in r["eval"]}, key=int)
    grid = [[r["eval"].get(k, float("nan")) for k in keys] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 0.6 * len(rows) + 2))
    im = ax.imshow(grid, cmap="viridis_r")
    ax.set_xticks(range(len(keys)), [f"{k}" for k in keys])
    ax.set_yticks(range(len(rows)), [f"{r.get('strategy') or ''} {r['trained_keep']}".strip() for r in rows])
    ax.set_xlabel("evaluated at keep")
    ax.set_ylabel("trained at keep")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, label="perplexity")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def comparison_plot(results: dict[str, Any], path: Path) -> Path:
    """Perplexity vs share of block weights removed, TwIST and every baseline."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, series in results["structured"].items():
        xs = [p["removed_of_block_params"] for p in series]
        ys = [p["ppl"] for p in series]
        style = "-o" if label.startswith("TwIST") else "--s"
        ax.plot(xs, ys, style, label=label, markersize=4)
        if series and "std" in series[0]:
            ax.fill_between(xs, [p["ppl"] - p["std"] for p in series], [p["ppl"] + p["std"] for p in series],
                            alpha=0.2)
    for label, series in results["unstructured"].items():
        ax.plot([p["removed_of_block_params"] for p in series], [p["ppl"] for p in series], ":x", markersize=7,
                label=f"{label} (unstructured)")
    ax.axhline(results["twist_full_ppl"], color="k", lw=0.8, ls=":", label="TwIST full model")
    ax.axhline(results["dense_full_ppl"], color="gray", lw=0.8, ls=":", label="dense full model")
    ax.set_xlabel("share of block weights removed")
    ax.set_ylabel(f"{results['split']} perplexity")
    readable(ax, log_y=True)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def keeps_plot(series: dict[str, list[tuple[float, float, float]]], path: Path, n_blocks: int, ylabel: str,
               lines: dict[str, float] | None = None, title: str = "") -> Path:
    """Perplexity against blocks kept per layer, one curve per row: `series[label]` holds
    (kept blocks, mean, sd) points (sd drawn as an error bar); `lines` are horizontal references
    (a full model)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, pts in series.items():
        pts = sorted(pts)
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", markersize=4,
                    capsize=3, label=label, ls="-" if label.lower().startswith("twist") else "--")
    for label, y in (lines or {}).items():
        ax.axhline(y, color="gray", lw=0.8, ls=":", label=label)
    ax.set_xlabel(f"blocks kept per pruned layer (of {n_blocks})")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    readable(ax, log_y=True, integer_x=True)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def tuning_plot(tuning: dict[str, Any], path: Path) -> Path | None:
    """`tune table`'s figure, from its tuning.json: each method at its learning rate, test
    perplexity of what it deploys (nested prefixes for ordered methods, random subnets otherwise)
    against blocks kept, mean ± sd over seeds; the full model at N."""
    rows = tuning.get("tuned") or []
    if not rows:
        return None
    keys = sorted({k for r in rows for k in r["test"] if k.startswith("keep-")}, key=lambda k: int(k[5:]))
    # N: recorded by `tune table`; in an older tuning.json, the sizes are N/4, N/2 and 3N/4
    n = int(tuning.get("n_blocks") or 0) or max(int(k[5:]) for k in keys) + min(int(k[5:]) for k in keys)
    series = {}
    for r in rows:
        pts = [(int(k[5:]), *_mean_sd(r["test"][k])) for k in keys if r["test"].get(k)]
        if r["test"].get("full"):
            pts.append((n, *_mean_sd(r["test"]["full"])))
        series[f"{r.get('method') or r['strategy']} (lr {r['lr']:g}, {len(r['seeds'])} seeds)"] = pts
    return keeps_plot(series, path, n, "test perplexity (mean ± sd over seeds)")


def finetune_plot(res: dict[str, Any], path: Path) -> Path:
    """`tune finetune-table`'s figure, from its finetune.json: the recipe and TwIST as today (what
    each deploys) against the fine-tuned DDP model pruned by its best structured method and by
    SparseGPT, and the recovery baseline; test perplexity against blocks kept, mean ± sd over seeds."""
    n, keeps = int(res["n_blocks"]), [int(k) for k in res["keeps"]]

    def row(label: str) -> list[tuple[float, float, float]]:
        per_seed = res["test"].get(label, {})
        pts = []
        for k in keeps:
            vals = [v.get(f"deployed-{k}", v.get(f"keep-{k}")) for v in per_seed.values()]
            if vals and all(x is not None for x in vals):
                pts.append((k, *_mean_sd(vals)))
        if per_seed:
            pts.append((n, *_mean_sd([v["full"] for v in per_seed.values()])))
        return pts

    base = res["baselines"]
    series = {f"{res['recipe']} (the recipe)": row(res["recipe"]), "TwIST (as today)": row("TwIST (as today)")}
    best = res["best_structured"]
    series[f"DDP + {best} (structured)"] = [(k, *_mean_sd([b["structured"][best][str(k)] for b in base.values()]))
                                           for k in keeps]
    series["DDP + SparseGPT (unstructured)"] = [
        (k, *_mean_sd([b["unstructured"]["SparseGPT"][str(k)] for b in base.values()])) for k in keeps]
    for label, per_k in res.get("recovery_runs", {}).items():
        series[f"DDP + {label}"] = [(int(k), *_mean_sd(list(v.values()))) for k, v in per_k.items()]
    full = _mean_sd([b["full"] for b in base.values()])[0]
    return keeps_plot(series, path, n, "test perplexity (mean ± sd over seeds)", {"DDP fine-tuned, full model": full},
                      title=f"fine-tuned F = {res['F']} steps from a dense model")

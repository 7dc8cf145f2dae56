"""TwIST against post-training pruning, side by side (`twist-fl report`).

The TwIST model and the dense model must be trained with the same data and budget (a
`strategy = "twist"` run and a dense one of the same config: `twist-fl ddp`, or the app's
`strategy = "fedavg"`). Every method removes whole
heads and FFN blocks of the same (non-shared) layers, or, unstructured, the same share of the
weights of the same matrices, with no recovery training — as in the paper's comparison.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.blocks import sparsity
from ..core.config import DENSE_STRATEGIES, RunConfig
from ..core.io import atomic_write_text, staged_folder, write_json
from ..core.progress import progress
from ..core.report import comparison_plot
from ..core.train import evaluate
from .loading import UsageError, data_settings, load_model, parse_keeps, windows_for
from .prune import (
    core_of,
    deployed_subnet_ppl,
    policy_of,
    prune_structured,
    random_blueprint,
    random_subnet_ppl,
    unstructured_prune,
)

log = logging.getLogger(__name__)

PAPER_TWIST_OVER_SPARSEGPT = 23.14 / 31.64  # the paper's headline at 50% (GPT-2 124M, WikiText-103)
DENSE_NAMES = {"fedavg": "FedAvg", "ddp": "DDP"}
UNSTRUCTURED = {"dense magnitude": "magnitude", "dense Wanda": "wanda", "dense SparseGPT": "sparsegpt"}


@dataclass(frozen=True)
class ReportOptions:
    """What `twist-fl report` compares, and how."""

    twist: list[str]  # run folders (or models) trained with strategy twist, one per seed
    dense: list[str]  # run folders (or models) trained dense (strategy ddp or fedavg), paired with `twist`
    out: str  # folder for REPORT.md, results.json, comparison.png
    keeps: str = ""  # comma list of subnet sizes; "" = every size 1..N-1
    draws: int = 5  # random subnets per keep
    k: int = 8  # draws for best-of-k
    seed: int = 0
    split: str = "test"
    eval_tokens: int = 32768
    calib_tokens: int = 16384
    data: dict[str, Any] = field(default_factory=dict)  # dataset, tokenizer, data_path, seq_len overrides
    argv: list[str] = field(default_factory=list)  # the command line, quoted in the report


def _ppl(model, windows) -> float:
    return evaluate(model, windows)["ppl"]


def run_comparison(args: ReportOptions) -> dict[str, Any]:
    """Every method on each (twist, dense) pair; with several pairs (seeds), mean ± std over them."""
    twist, dense = list(args.twist), list(args.dense)
    if not twist or len(twist) != len(dense):
        raise UsageError(f"--twist and --dense take one run folder per seed, paired: {len(twist)} and {len(dense)} "
                         "given")
    per_seed = [compare_pair(t, d, args) for t, d in zip(twist, dense, strict=True)]
    return per_seed[0] if len(per_seed) == 1 else aggregate(per_seed)


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One result with each perplexity the mean over seeds and `std` its spread over seeds."""
    first = per_seed[0]
    if any(r["keeps"] != first["keeps"] or r["n_blocks"] != first["n_blocks"] for r in per_seed):
        raise UsageError("the runs of a report must share one architecture and keeps")
    out = {**first, "seeds": len(per_seed), "per_seed": per_seed,
           "dense_strategy": ",".join(sorted({r["dense_strategy"] for r in per_seed}))}
    for key in ("twist_full_ppl", "dense_full_ppl"):
        vals = [r[key] for r in per_seed]
        out[key], out[key.replace("_ppl", "_std")] = float(np.mean(vals)), float(np.std(vals))
    for kind in ("structured", "unstructured"):
        out[kind] = {}
        for label, series in first[kind].items():
            out[kind][label] = []
            for i, point in enumerate(series):
                vals = [r[kind][label][i]["ppl"] for r in per_seed]
                out[kind][label].append({**point, "ppl": float(np.mean(vals)), "std": float(np.std(vals)),
                                         "per_seed": vals})
    out["draws"] = {k: [x for r in per_seed for x in r["draws"][k]] for k in first["draws"]}
    return out


def compare_pair(twist_path: str, dense_path: str, args: ReportOptions) -> dict[str, Any]:
    twist, meta_t = load_model(twist_path)
    dense, meta_d = load_model(dense_path)
    if twist.cfg != dense.cfg:
        raise UsageError("the TwIST and dense models have different architectures; train both from one config")
    if twist.blueprint is not None or dense.blueprint is not None:
        raise UsageError("report needs the full trained models, not pruned subnets")
    st, sd = meta_t.get("run", {}).get("strategy"), meta_d.get("run", {}).get("strategy")
    if st != "twist":
        raise UsageError(f"--twist {twist_path} was trained with strategy {st!r}; it needs a strategy 'twist' run "
                         "(a run folder, or the model/ of one, which records its strategy)")
    if sd not in DENSE_STRATEGIES:
        raise UsageError(f"--dense {dense_path} was trained with strategy {sd!r}; it needs a dense run "
                         f"(allowed: {list(DENSE_STRATEGIES)}; a run folder, or the model/ of one)")
    cfg = twist.cfg
    d = data_settings(meta_t, **args.data)
    windows = windows_for(twist, d, args.split, args.eval_tokens)
    calib = windows_for(twist, d, "calib", args.calib_tokens)
    n = cfg.n_blocks
    keeps = parse_keeps(args.keeps, cfg) if args.keeps else list(range(1, n))
    res: dict[str, Any] = {"split": args.split, "tokens": int(windows[:, 1:].size), "keeps": keeps, "n_blocks": n,
                           "twist_full_ppl": _ppl(twist, windows), "dense_full_ppl": _ppl(dense, windows),
                           "structured": {}, "unstructured": {}, "draws": {},
                           "twist_run": meta_t.get("run", {}), "dense_run": meta_d.get("run", {}),
                           "twist_nodes": run_nodes(twist_path), "dense_nodes": run_nodes(dense_path),
                           "dense_strategy": sd}
    methods = {"TwIST random": (twist, "random"), "TwIST best-of-k": (twist, "best-of-k"),
               "TwIST magnitude": (twist, "magnitude"), "dense random": (dense, "random"),
               "dense best-of-k": (dense, "best-of-k"), "dense magnitude": (dense, "magnitude"),
               "dense Wanda": (dense, "wanda"), "dense Taylor": (dense, "taylor"), "dense FLAP": (dense, "flap")}
    if policy_of(meta_t) == "ordered":  # a nested-prefix run (HeteroFL, FjORD) is deployed as its prefix
        methods = {"TwIST prefix": (twist, "prefix"), **methods}
    res["twist_policy"] = policy_of(meta_t)
    shares = {}
    for k in keeps:  # what keep k removes: the same share for every method at k
        sp = sparsity(cfg, random_blueprint(cfg, k, args.seed))
        shares[k] = {"keep": k, "removed_of_block_params": sp["removed_of_block_params"],
                     "removed_of_all_params": sp["removed_of_all_params"], "params": sp["params_kept"]}
    steps = [("structured", label, k) for label in methods for k in keeps] + \
        [("unstructured", label, k) for label in UNSTRUCTURED for k in keeps]
    for kind, label, k in progress(steps, f"report: {twist_path} vs {dense_path}"):
        point = dict(shares[k])
        if kind == "structured":
            model, method = methods[label]
            if method == "random":
                draws = random_subnet_ppl(model, k, args.seed, args.draws, windows)
                point.update(ppl=float(np.mean(draws)), std=float(np.std(draws)))
                res["draws"][f"{label} keep {k}"] = draws
            else:
                point["ppl"] = _ppl(prune_structured(model, k, method, args.seed, calib, args.k), windows)
            res["structured"].setdefault(label, []).append(point)
        else:  # unstructured: the same share (1 - k/N) of every block matrix of the pruned layers
            point["sparsity_in_pruned_matrices"] = 1 - k / n
            point["ppl"] = _ppl(unstructured_prune(dense, UNSTRUCTURED[label], 1 - k / n, calib), windows)
            res["unstructured"].setdefault(label, []).append(point)
    return res


def test_ppl(run_folder: str, keeps: list[int], draws: int, tokens: int) -> dict[str, float]:
    """Test perplexity of a run's final model: the full model, random subnets at `keeps`
    (`keep-k`, mean over draws; with core-blocks, each holding the core) and the nested prefix
    (`deployed-k`) for `ordered` and core-blocks runs, the same random subnets otherwise. A pruned
    model (a recovery fine-tune) has the full entry only."""
    model, meta = load_model(run_folder)
    windows = windows_for(model, data_settings(meta), "test", tokens)
    out = {"full": evaluate(model, windows)["ppl"]}
    if model.blueprint is not None:  # a pruned model trained on (a recovery fine-tune): no subnets to cut
        return out
    seed = int(meta.get("run", {}).get("seed", 0))
    policy, core = policy_of(meta), core_of(meta)
    for k in keeps:
        out[f"keep-{k}"] = float(np.mean(random_subnet_ppl(model, k, seed, draws, windows, core)))
        out[f"deployed-{k}"] = float(np.mean(deployed_subnet_ppl(model, "ordered", k, seed, draws, windows))) \
            if policy == "ordered" or core else out[f"keep-{k}"]
    return out


def write_report(args: ReportOptions) -> dict[str, Any]:
    res = run_comparison(args)
    text = markdown(res, args)  # before anything is written: a failure leaves no partial report
    with staged_folder(Path(args.out)) as out:
        comparison_plot(res, out / "comparison.png")
        write_json(out / "results.json", res)
        atomic_write_text(out / "REPORT.md", text)
    return res


def headline_keep(keeps: list[int], n: int) -> int:
    """The keep the report's summary is about: N/2 when it was evaluated, else the nearest."""
    return min(keeps, key=lambda k: (abs(2 * k - n), k))


def _cell(p: dict[str, Any]) -> str:
    return f"{p['ppl']:.3f} ± {p['std']:.3f}" if "std" in p else f"{p['ppl']:.3f}"


def markdown(res: dict[str, Any], args: ReportOptions) -> str:
    keeps = res["keeps"]
    structured, unstructured = res["structured"], res["unstructured"]
    n = res["n_blocks"]  # N of the models themselves, never derived from the keeps asked for
    seeds = res.get("seeds", 1)
    spread = f"mean ± std over {seeds} seeds (each random subnet's perplexity a mean over draws)" if seeds > 1 \
        else f"random subnets: mean ± std over {args.draws} draws"
    dense_name = DENSE_NAMES.get(res["dense_strategy"], res["dense_strategy"])
    lines = ["# TwIST vs post-training pruning", "",
             f"Perplexity on the {res['split']} split ({res['tokens']:,} tokens); no recovery training for any "
             f"method. Full models: TwIST {res['twist_full_ppl']:.3f}, dense ({dense_name}) "
             f"{res['dense_full_ppl']:.3f}. Blocks per layer: N = {n}.",
             "", f"Cells: {spread}.", "", "![perplexity vs share removed](comparison.png)", "",
             "| method | " + " | ".join(f"keep {k} of {n} ({p['removed_of_block_params']:.0%})"
                                       for k, p in zip(keeps, structured["TwIST random"], strict=True)) + " |",
             "|---|" + "---|" * len(keeps)]
    for label, series in structured.items():
        lines.append(f"| {label} (structured) | " + " | ".join(_cell(p) for p in series) + " |")
    for label, series in unstructured.items():
        lines.append(f"| {label} (unstructured) | " + " | ".join(_cell(p) for p in series) + " |")
    lines += ["", "Share in parentheses: block weights removed, over the block weights of all layers (shared "
              "layers are never pruned). Structured methods remove N - keep of the N heads and FFN blocks of every "
              "pruned layer; unstructured ones zero the same share, 1 - keep/N, of the weights of each of those "
              "layers' block matrices (and need sparse kernels to run faster).", ""]
    k = headline_keep(keeps, n)
    i = keeps.index(k)
    removed = structured["TwIST random"][i]["removed_of_block_params"]
    tw = structured["TwIST random"][i]["ppl"]
    best_label, best = min(((lbl, s[i]["ppl"]) for lbl, s in structured.items() if not lbl.startswith("TwIST")),
                           key=lambda x: x[1])
    what = "half the blocks of every pruned layer" if 2 * k == n else \
        f"{n - k} of the {n} blocks of every pruned layer removed"
    lines += [f"## At keep {k} of {n} ({what}; {removed:.0%} of the block weights of all layers)", "",
              f"- TwIST random subnets: {_cell(structured['TwIST random'][i])} ({spread}).",
              f"- Best structured baseline: {best_label}, {best:.3f}. Ratio TwIST / best = **{tw / best:.3f}**.",
              ]
    for label, series in unstructured.items():
        lines.append(f"- {label}, unstructured, {1 - k / n:.0%} of each pruned matrix (the same share of block "
                     f"weights): {series[i]['ppl']:.3f}; TwIST / it = {tw / series[i]['ppl']:.3f}.")
    sg = next((series[i]["ppl"] for label, series in unstructured.items() if "SparseGPT" in label), None)
    if sg is not None and 2 * k == n:
        lines.append(f"- The paper's headline is TwIST / SparseGPT at 50% = {PAPER_TWIST_OVER_SPARSEGPT:.2f} (23.14 "
                     f"against 31.64, GPT-2 124M fine-tuned on WikiText-103); here TwIST / SparseGPT = "
                     f"{tw / sg:.3f}: " + ("reversed: " if tw > sg else "the same direction: ")
                     + "the settings differ (a far smaller model and corpus here, and only the pruned layers' "
                     "block weights cut), and which difference reverses it is not measured.")
    best_u = min(series[i]["ppl"] for series in unstructured.values())
    lines += [f"- Each relative to its own full model: TwIST random subnets {tw / res['twist_full_ppl']:.3f}, "
              f"best structured baseline {best / res['dense_full_ppl']:.3f}, best unstructured "
              f"{best_u / res['dense_full_ppl']:.3f}. ({_full_models(res)})"]
    per = [r["draws"][f"TwIST random keep {k}"] for r in res.get("per_seed", [res])]
    lines += ["- The spread over random draws (the 'golden ticket'), per model: "
              + "; ".join(", ".join(f"{x:.3f}" for x in d) for d in per)
              + f"; worst / best within a model: up to {max(max(d) / min(d) for d in per):.3f}.", ""]
    lines += ["## Commands", "", "The two models were trained with (keys that differ from the defaults):", "", "```"]
    for r in res.get("per_seed", [res]):
        lines += [train_command(r["twist_run"], r.get("twist_nodes")),
                  train_command(r["dense_run"], r.get("dense_nodes"))]
    lines += ["```", "",
              "and this report was made with:", "", "```",
              "twist-fl " + " ".join(shlex.quote(a) for a in args.argv), "```", ""]
    return "\n".join(lines)


def _full_models(res: dict[str, Any]) -> str:
    t, d = res["twist_full_ppl"], res["dense_full_ppl"]
    if f"{t:.3f}" == f"{d:.3f}":
        return f"The two full models have the same perplexity here ({t:.3f}), so the ratios above are pruning alone."
    better = "TwIST" if t < d else "dense"
    return (f"The {better} model's full perplexity is the lower one here ({t:.3f} TwIST, {d:.3f} dense), "
            "so part of the ratios above is training, not pruning.")


def run_nodes(path: str) -> int | None:
    """The nodes a run trained with: DDP's workers, or the most nodes of a Flower run's rounds;
    None when the path is a model folder without its run."""
    import json

    p = Path(path)
    folder = p if (p / "summary.json").is_file() else p.parent
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(summary.get("ddp"), dict) and "nproc" in summary["ddp"]:
        return int(summary["ddp"]["nproc"])
    try:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return max((len(r.get("nodes", [])) for r in rows), default=None) or None


def train_command(run: dict[str, Any], nodes: int | None = None) -> str:
    """The `flwr run` (or `twist-fl ddp`) that reproduces a run config (its keys that differ from
    the defaults), with the nodes or workers it trained with (`N` where they are unknown)."""
    default = RunConfig().to_flat()
    ddp = run.get("strategy") == "ddp"
    diff = {k: v for k, v in run.items() if default.get(k) != v and k not in ("out-dir", "run-name")
            and not (ddp and k == "strategy")}
    parts = [f'{k}=\\"{v}\\"' if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in sorted(diff.items())]
    n = str(nodes) if nodes else "N"
    head = f"twist-fl ddp --nproc {n}" if ddp else f'flwr run . --stream --federation-config "num-supernodes={n}"'
    return head + (
        f' --run-config "{" ".join(parts)}"' if parts else "")


STRUCTURED_LABELS = {"random": "random", "best-of-k": "best-of-k", "magnitude": "magnitude", "wanda": "Wanda",
                     "taylor": "Taylor", "flap": "FLAP"}


def prune_baselines(dense_path: str, keeps: list[int], alphas: tuple[float, ...] = (0.5, 0.0), draws: int = 3,
                    k: int = 8, seed: int = 0, split: str = "test", tokens: int = 32768,
                    calib_tokens: int = 16384, methods: tuple[str, ...] = tuple(STRUCTURED_LABELS),
                    unstructured: tuple[str, ...] = ("magnitude", "Wanda", "SparseGPT")) -> dict[str, Any]:
    """A dense model and its post-training prunings at `keeps`: {"full": ppl, "structured":
    {"<method> a<alpha>": {keep: ppl}}, "unstructured": {"<method>": {keep: ppl}}}. Structured
    `methods` run at each `alpha` (the subnet's (N/n)**alpha output scale; FLAP's bias compensation
    follows it); a random subnet's entry is the mean over `draws`."""
    from ..core.model import GPT

    dense, meta = load_model(dense_path)
    if dense.blueprint is not None:
        raise UsageError(f"{dense_path} is a pruned subnet; the baselines prune a full model")
    d = data_settings(meta)
    windows = windows_for(dense, d, split, tokens)
    calib = windows_for(dense, d, "calib", calib_tokens)
    n = dense.cfg.n_blocks
    out: dict[str, Any] = {"full": _ppl(dense, windows), "structured": {}, "unstructured": {}}
    for alpha in alphas:
        model = GPT.from_state(dataclasses.replace(dense.cfg, alpha=alpha), dense.state_dict()).eval()
        for method in progress(methods, f"structured pruning at alpha {alpha:g}"):
            label = STRUCTURED_LABELS[method]
            row = {}
            for keep in keeps:
                if method == "random":
                    row[str(keep)] = float(np.mean(random_subnet_ppl(model, keep, seed, draws, windows)))
                else:
                    row[str(keep)] = _ppl(prune_structured(model, keep, method, seed, calib, k), windows)
            out["structured"][f"{label} a{alpha:g}"] = row
    for label, method in UNSTRUCTURED.items():
        if label[len("dense "):] not in unstructured:
            continue
        out["unstructured"][label[len("dense "):]] = {str(keep): _ppl(unstructured_prune(dense, method, 1 - keep / n,
                                                                                         calib), windows)
                                                      for keep in keeps}
    return out

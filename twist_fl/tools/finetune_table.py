"""FINETUNE.md and finetune.json from a `tune finetune` folder: every job it holds, evaluated on
the test split and compared paired by seed (`twist-fl tune finetune-table`).

Jobs are found by their folder names (`tools/finetune.py` names them), so a folder filled by
several `tune finetune` commands (other levers, other F, more seeds) gives one table. Every
comparison is a ratio of perplexities per seed (the same dense model, data and draws), reported
as mean ± sample sd [95% t interval] (`evaluation/stats.py`). Each run's evaluation is cached in
`<root>/.table-cache/` (`finetune.cached_eval`), so a rebuilt table evaluates only new runs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.io import atomic_write_text, write_json
from ..evaluation.stats import Paired, mean_sd, paired_ratio
from .finetune import Finetune, cached_eval, side_validation
from .help import shown

log = logging.getLogger(__name__)

LR_CHOICES = ("grid", "seeds")  # each side's rate: the seed-0 grid's (plan.json), or the best mean over seeds
LEVER = re.compile(r"^lever-(?P<name>.+?)(?:-F(?P<f>\d+))?-s(?P<seed>\d+)$")
TEACHER_FORWARD = 1 / 3  # a forward pass is about a third of a training step's FLOPs (backward = 2 x forward)
ALPHAS = (0.5, 0.0)


def _summary(folder: Path) -> dict[str, Any] | None:
    f = folder / "summary.json"
    return json.loads(f.read_text()) if f.is_file() and (folder / "model").is_dir() else None


def rate_over_seeds(side: str, scores: dict[float, dict[int, float]], seeds: list[int]) -> float:
    """`--lr-choice seeds`: the rate with the lowest mean validation perplexity over `seeds`, among the
    rates run on every one of them (`scores`: rate -> seed -> validation). A rate run on fewer seeds
    that does better on each seed it ran, or a choice at the edge of the rates run, is logged: the grid
    should be widened there (`tune finetune --stages lr-seeds --lr-seeds <rate>`)."""
    full = {lr: v for lr, v in scores.items() if set(seeds) <= set(v)}
    if not full:
        raise ValueError(f"--lr-choice seeds: no {side} rate was run on every seed {seeds} (rates and seeds run: "
                         f"{ {f'{lr:g}': sorted(v) for lr, v in scores.items()} }); run one with `tune finetune "
                         f"--stages lr-seeds --lr-seeds <rate>`")
    best = min(full, key=lambda lr: sum(full[lr][s] for s in seeds) / len(seeds))
    for lr, v in scores.items():
        if lr not in full and all(v[s] < full[best][s] for s in v):
            log.warning("finetune-table: %s at lr %g (seeds %s) does better than the chosen %g on each seed it ran; "
                        "run it on every seed", side, lr, sorted(v), best)
    if len(scores) > 1 and best in (min(scores), max(scores)):
        log.warning("finetune-table: %s lr %g is at the edge of the rates run (%s): widen them", side, best,
                    ", ".join(f"{lr:g}" for lr in scores))
    return best


@dataclass
class Runs:
    """The finished jobs of one name pattern, by seed: run folder and summary."""

    folders: dict[int, Path]
    summaries: dict[int, dict[str, Any]]

    @classmethod
    def find(cls, root: Path, name_of) -> Runs:
        folders, summaries = {}, {}
        for d in sorted(root.glob("*-s*")):
            m = re.match(r"^(.*)-s(\d+)$", d.name)
            if not m or name_of(int(m.group(2))) != d.name:
                continue
            s = _summary(d / "run")
            if s is not None:
                folders[int(m.group(2))], summaries[int(m.group(2))] = d / "run", s
        return cls(folders, summaries)

    def __bool__(self) -> bool:
        return bool(self.folders)


class Table:
    """Evaluations of one finetune folder, cached, and the paired comparisons built from them."""

    def __init__(self, root: Path, draws: int, tokens: int, keeps: list[int] | None, lr_choice: str = "grid"):
        from ..evaluation.loading import load_model

        self.root, self.draws, self.tokens = root, draws, tokens
        plan_file = root / "plan.json"
        if not plan_file.is_file():
            raise ValueError(f"{root} has no plan.json: run `tune finetune --out {root}` first")
        self.plan = json.loads(plan_file.read_text())
        if "best_lrs" not in self.plan:
            raise ValueError(f"{plan_file} is not a `tune finetune` plan (it has no best_lrs): finetune-table reads "
                             "the folder of `tune finetune`, not of `tune run` (use `tune table` there)")
        self.best, self.F = self.plan["best_lrs"], int(self.plan["F"])
        dense = Runs.find(root, lambda s: f"dense-s{s}")
        if not dense:
            raise ValueError(f"{root} holds no finished dense run (dense-s<seed>/run)")
        self.dense = dense
        model, _ = load_model(str(next(iter(dense.folders.values()))))
        self.cfg = model.cfg
        n = self.n = model.cfg.n_blocks
        self.keeps = keeps or sorted({max(1, round(n * f)) for f in (.25, .5, .75)} - {n})
        self.half = min(self.keeps, key=lambda k: (abs(2 * k - n), k))
        self.recovery = json.loads((root / "recovery.json").read_text()) if (root / "recovery.json").is_file() else {}
        if lr_choice not in LR_CHOICES:
            raise ValueError(f"--lr-choice={lr_choice!r} is not one of {list(LR_CHOICES)}")
        self.lr_choice = lr_choice
        if lr_choice == "seeds":
            self.best = {side: rate_over_seeds(side, self.rate_scores(side), sorted(dense.folders))
                         for side in ("twist", "ddp")}

    def rate_scores(self, side: str) -> dict[float, dict[int, float]]:
        """Validation perplexity of what `side` deploys, by rate and seed, for every `<side>-lr<lr>-F<F>-s<seed>`
        job: TwIST's random N/2 subnets (what it is trained to deploy), DDP's full model (before pruning)."""
        out: dict[float, dict[int, float]] = {}
        for d in sorted(self.root.iterdir()):
            m = re.match(rf"^{side}-lr([0-9.e-]+)-F{self.F}-s(\d+)$", d.name)
            s = _summary(d / "run") if m else None
            if s is not None:
                out.setdefault(float(m.group(1)), {})[int(m.group(2))] = side_validation(side, s, self.half)
        return dict(sorted(out.items()))

    # --- evaluations ---------------------------------------------------------------------

    def test(self, runs: Runs) -> dict[int, dict[str, float]]:
        """Per seed: the final model's test perplexity, full and at each keep (`compare.test_ppl`)."""
        from ..evaluation.compare import test_ppl

        return {s: cached_eval(self.root, "test_ppl", [d], {"keeps": self.keeps, "draws": self.draws,
                                                              "tokens": self.tokens},
                               lambda d=d: test_ppl(str(d), self.keeps, self.draws, self.tokens))
                for s, d in runs.folders.items()}

    def baselines(self, runs: Runs, light: bool = False) -> dict[int, dict[str, Any]]:
        """Per seed: a dense run pruned by every post-training method (`compare.prune_baselines`);
        `light`: FLAP (both alphas) and SparseGPT at N/2 only."""
        from ..evaluation.compare import prune_baselines

        keeps = [self.half] if light else self.keeps
        kw = {"keeps": keeps, "alphas": list(ALPHAS), "draws": self.draws, "tokens": self.tokens, "light": light}

        def compute(d: Path) -> dict[str, Any]:
            if not light:
                return prune_baselines(str(d), keeps, ALPHAS, self.draws, tokens=self.tokens)
            return prune_baselines(str(d), keeps, ALPHAS, self.draws, tokens=self.tokens, methods=("flap",),
                                   unstructured=("SparseGPT",))

        return {s: cached_eval(self.root, "prune_baselines", [d], kw, lambda d=d: compute(d))
                for s, d in runs.folders.items()}

    # --- facts of a run -------------------------------------------------------------------

    def steps(self, summary: dict[str, Any]) -> int:
        return int(summary["rounds"]) * int(summary["run"]["local-steps"])

    def nodes(self, summary: dict[str, Any]) -> int:
        """Nodes per round (Flower) or workers (DDP) of a run."""
        return int(summary["run"].get("num-nodes") or 0) or int(self.plan.get("nodes", 4))

    def bytes_per_node_step(self, summary: dict[str, Any]) -> float:
        """What a node (a DDP worker) sends and receives per optimizer step, measured."""
        return (summary["bytes_down_total"] + summary["bytes_up_total"]) / self.nodes(summary) / self.steps(summary)

    def compute(self, summary: dict[str, Any]) -> float:
        """Training FLOPs of a run over those of F dense steps: each step's subnet (mixed keeps: the
        mean of the choices; full nodes: their share), plus the teacher's forward pass per step when
        it distils. Counted from the shapes (`bench.train_flops_ratio`)."""
        from .bench import train_flops_ratio

        run, seq = summary["run"], int(summary["run"]["seq-len"])
        if summary.get("blueprint"):  # a pruned model trained on (the recovery baseline)
            per = train_flops_ratio(self.cfg, int(summary["keep"]), seq)
        elif run["strategy"] != "twist":
            per = 1.0
        else:
            from ..core.config import RunConfig, quarters_of

            choices = list(RunConfig.from_flat({"keep-choices": run.get("keep-choices") or "",
                                                "keep": int(run.get("keep") or 0)}).choices_for(self.cfg)) or \
                [int(run.get("keep") or 0) or quarters_of(self.n, 2)]
            sub = sum(train_flops_ratio(self.cfg, min(k, self.n), seq) for k in choices) / len(choices)
            nodes = self.nodes(summary)
            full = min(int(run.get("full-nodes") or 0), nodes)
            per = (full + (nodes - full) * sub) / nodes
        if run.get("distill-from") and float(run.get("distill-weight") or 0) > 0:
            per += TEACHER_FORWARD
        return self.steps(summary) * per / self.F


def _deployed(run: dict[str, Any]) -> bool:
    """Whether a run is deployed as its nested prefix (ordered policy, or a core of fixed blocks)."""
    return run.get("subnet-policy") == "ordered" or int(run.get("core-blocks") or 0) > 0


def _cell(vals: dict[int, float]) -> str:
    return mean_sd([vals[s] for s in sorted(vals)])


def _ratio(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    return paired_ratio(a, b)


def _txt(p: Paired | None) -> str:
    return p.text() if p is not None else ""


def finetune_table(root: Path, out: Path, draws: int = 3, tokens: int = 32768, keeps: str = "",
                   argv: list[str] | None = None, recipe: str = "", lr_choice: str = "grid") -> dict[str, Any]:
    """Write FINETUNE.md and finetune.json into `out` (the command line claims it first:
    `io.claim_output`)."""
    from ..core.precision import machine, vector_text
    from ..core.report import finetune_plot
    from ..evaluation.loading import load_model, parse_keeps

    root, out = Path(root), Path(out)
    keep_list = None
    if keeps:
        model, _ = load_model(str(next(root.glob("dense-s*/run"))))
        keep_list = parse_keeps(keeps, model.cfg)
    t = Table(root, draws, tokens, keep_list, lr_choice)
    n, half, F, best = t.n, t.half, t.F, t.best
    H = f"keep-{half}"

    # --- the jobs ---------------------------------------------------------------------------
    tw = Runs.find(root, lambda s, f=F: Finetune.pair_name("twist", best["twist"], f, s))
    dd = Runs.find(root, lambda s, f=F: Finetune.pair_name("ddp", best["ddp"], f, s))
    if not tw or not dd:
        raise ValueError(f"{root} holds no finished TwIST/DDP pair at F={F}")
    lever_names = sorted({m.group("name") for d in root.iterdir() if (m := LEVER.match(d.name)) and not m.group("f")})
    levers = {name: Runs.find(root, lambda s, name=name: f"lever-{name}-s{s}") for name in lever_names}
    levers = {k: v for k, v in levers.items() if v}
    eqc = Runs.find(root, lambda s: f"twist-eqc-F{F}-s{s}")

    # --- evaluations ------------------------------------------------------------------------
    log.info("finetune-table: evaluating (cached in %s)", root / ".table-cache")
    test = {"TwIST (as today)": t.test(tw), **{f"TwIST + {k}": t.test(v) for k, v in levers.items()}}
    runs = {"TwIST (as today)": tw, **{f"TwIST + {k}": v for k, v in levers.items()}}
    if eqc:
        test["TwIST at equal compute"], runs["TwIST at equal compute"] = t.test(eqc), eqc
    base = t.baselines(dd)
    ddp_full = {s: b["full"] for s, b in base.items()}
    structured = {label: {s: base[s]["structured"][label][str(half)] for s in base}
                  for label in next(iter(base.values()))["structured"]}
    best_struct = min((lbl for lbl in structured if not lbl.startswith("random")),
                      key=lambda lbl: sum(structured[lbl].values()) / len(structured[lbl]))
    sparsegpt = {s: base[s]["unstructured"]["SparseGPT"][str(half)] for s in base}

    # the recovery baseline: FLAP-pruned dense model fine-tuned at one size, with and without distillation
    rec: dict[str, dict[int, dict[int, float]]] = {}
    if t.recovery:
        for kd in (False, True):
            label = "FLAP + recovery fine-tune" + (" with distillation" if kd else "")
            per_k = {}
            for k in t.keeps:
                r = Runs.find(root, lambda s, k=k, kd=kd: Finetune.recovery_name(k, F, s, kd, t.recovery["lr"]))
                if r:
                    per_k[k] = {s: v["full"] for s, v in t.test(r).items()}
                    runs[f"{label} k{k}"] = r
            if per_k:
                rec[label] = per_k
    rec_best = {k: min((lbl for lbl in rec if k in rec[lbl]), key=lambda lbl: sum(rec[lbl][k].values()) /
                       len(rec[lbl][k])) for k in t.keeps if any(k in r for r in rec.values())}

    def deployed(label: str, k: int) -> dict[int, float]:
        """The subnets a row deploys at k: the prefix for ordered and core runs, random otherwise."""
        key = f"deployed-{k}" if any(_deployed(s["run"]) for s in runs[label].summaries.values()) else f"keep-{k}"
        return {s: v[key] for s, v in test[label].items() if key in v}

    # --- the recipe ------------------------------------------------------------------------
    def valid_half(label: str) -> float:
        vals = [s["final"][H]["mean"] for s in runs[label].summaries.values() if H in s.get("final", {})]
        return sum(vals) / len(vals) if vals else float("inf")

    candidates = [lbl for lbl in test if lbl.startswith("TwIST + ")]
    if recipe:
        chosen = f"TwIST + {recipe}"
        if chosen not in test:
            raise ValueError(f"--recipe {recipe!r} names no lever of {root}; allowed: {sorted(levers)}")
    else:  # the lever whose deployed N/2 subnets have the lowest validation perplexity, on the most seeds
        most = max((len(test[lbl]) for lbl in candidates), default=0)
        pool = [lbl for lbl in candidates if len(test[lbl]) == most] or ["TwIST (as today)"]
        chosen = min(pool, key=valid_half)

    # --- markdown ---------------------------------------------------------------------------
    m = machine()
    seeds = sorted(t.dense.folders)
    head_keeps = " | ".join(f"{k}/{n}" for k in t.keeps)
    lines = [f"# Fine-tuning a dense model with TwIST: the recipe against every baseline "
             f"({_seeds(len(seeds))}, paired)",
             "",
             f"A dense model (DDP, {t.plan['dense_steps']} steps at lr {t.plan['dense_lr']:g}, one per seed) is "
             f"fine-tuned for F = {F} more steps with TwIST (lr {best['twist']:g}; each lever below on top of it) or "
             f"with DDP (lr {best['ddp']:g}), at equal tokens; the DDP model is then pruned after training by every "
             f"post-training method. Each side's rate: {_choice_text(t)} Test perplexity "
             f"({tokens:,} tokens); random subnets are a mean over {draws} draws per model; nested-prefix rows "
             "(`subnet-policy=ordered`, `core-blocks`) deploy their prefix. Every ratio is paired by seed: mean ± "
             "sample sd [95% t interval]; an interval that holds 1 is a difference within noise (level). "
             f"Machine: {m['cpu']} ({vector_text(m)}), torch {m['torch']}; deterministic for the same command on the "
             "same CPU kind.", "", "![the recipe and TwIST as today against the pruned DDP model and the recovery "
             "baseline, test perplexity against blocks kept](finetune.png)", ""]

    def ratio_lines(label: str, what: str) -> list[str]:
        out = []
        for k in t.keeps:
            dep = deployed(label, k)
            struct_k = {lbl: {s: base[s]["structured"][lbl][str(k)] for s in base} for lbl in structured}
            bs = min((lbl for lbl in struct_k if not lbl.startswith("random")),
                     key=lambda lbl: sum(struct_k[lbl].values()) / len(struct_k[lbl]))
            sg = {s: base[s]["unstructured"]["SparseGPT"][str(k)] for s in base}
            line = (f"- keep {k}/{n}: TwIST {what} / best structured ({_struct_name(bs)}) = "
                    f"**{_txt(_ratio(dep, struct_k[bs]))}**; TwIST / SparseGPT = {_txt(_ratio(dep, sg))}")
            if k in rec_best:
                line += f"; TwIST / recovery ({rec_best[k]}) = {_txt(_ratio(dep, rec[rec_best[k]][k]))}"
            out.append(line + ".")
        full = {s: v["full"] for s, v in test[label].items()}
        out.append(f"- full: TwIST {what} / DDP = {_txt(_ratio(full, ddp_full))}.")
        return out

    if candidates:
        lines += [f"## The recipe: `{chosen[len('TwIST + '):]}`", "",
                  f"{'Chosen by --recipe' if recipe else 'Chosen on the validation split'}: the lever whose deployed "
                  f"{half}/{n} subnets have the lowest validation perplexity"
                  + ("" if recipe else " (among the levers run on the most seeds)")
                  + f". Its run-config keys: `{_keys(runs[chosen], tw)}`.", ""]
        lines += ratio_lines(chosen, f"({chosen[len('TwIST + '):]})")
        lines += ["", "TwIST as it ships (local-steps 15, no lever), for reference:", ""]
    else:
        lines += ["## TwIST as it ships", "", "No lever was run into this folder: TwIST as it ships (local-steps 15, "
                  "no lever) against the baselines.", ""]
    lines += ratio_lines("TwIST (as today)", "(as today)")

    # every row, perplexities
    lines += ["", f"## Every lever and baseline (F = {F}, equal tokens; test perplexity)", "",
              f"| | full | {head_keeps} | random {half}/{n} | seeds |",
              "|---|---|" + "---|" * len(t.keeps) + "---|---|"]
    for label in test:
        dep = [_cell(deployed(label, k)) for k in t.keeps]
        rnd = _cell({s: v[H] for s, v in test[label].items()}) if any(
            _deployed(s["run"]) for s in runs[label].summaries.values()) else ""
        lines.append(f"| {label} | {_cell({s: v['full'] for s, v in test[label].items()})} | " + " | ".join(dep)
                     + f" | {rnd} | {len(test[label])} |")
    lines.append(f"| DDP fine-tuned (full model) | {_cell(ddp_full)} | " + " | " * len(t.keeps) + f" | {len(base)} |")
    for lbl in structured:
        lines.append(f"| DDP + {_struct_name(lbl)} (structured) | | " + " | ".join(
            _cell({s: base[s]["structured"][lbl][str(k)] for s in base}) for k in t.keeps) + f" | | {len(base)} |")
    for lbl in next(iter(base.values()))["unstructured"]:
        lines.append(f"| DDP + {lbl} (unstructured, same share) | | " + " | ".join(
            _cell({s: base[s]["unstructured"][lbl][str(k)] for s in base}) for k in t.keeps) + f" | | {len(base)} |")
    for label, per_k in rec.items():
        lines.append(f"| {label} (one run per size) | | " + " | ".join(_cell(per_k[k]) if k in per_k else ""
                                                                      for k in t.keeps)
                     + f" | | {max(len(v) for v in per_k.values())} |")

    # every row, ratios and costs
    lines += ["", f"## Paired ratios at {half}/{n} and what each costs", "",
              f"Ratios below 1 favour the row. References: TwIST as today; the DDP model pruned by its best "
              f"structured method at {half}/{n} ({_struct_name(best_struct)}, chosen by mean test perplexity over "
              "methods and alpha 0 / 0.5); SparseGPT at the same share; the better recovery baseline. Bytes: what a "
              "node sends and receives per optimizer step (DDP: its all-reduced gradient buckets). Compute: "
              f"training FLOPs over F = {F} dense steps, counted from the shapes, the teacher's forward passes "
              "included.", "",
              f"| | vs today | vs DDP + {_struct_name(best_struct)} | vs SparseGPT | vs recovery | full vs DDP full | "
              "MB / node / step | compute |", "|---|---|---|---|---|---|---|---|"]
    today = deployed("TwIST (as today)", half)
    for label in test:
        dep = deployed(label, half)
        sums = list(runs[label].summaries.values())
        mb = sum(t.bytes_per_node_step(s) for s in sums) / len(sums) / 1e6
        comp = sum(t.compute(s) for s in sums) / len(sums)
        rr = _txt(_ratio(dep, rec[rec_best[half]][half])) if half in rec_best else ""
        lines.append(f"| {label} | {_txt(_ratio(dep, today))} | {_txt(_ratio(dep, structured[best_struct]))} | "
                     f"{_txt(_ratio(dep, sparsegpt))} | {rr} | "
                     f"{_txt(_ratio({s: v['full'] for s, v in test[label].items()}, ddp_full))} | {mb:.3f} | "
                     f"{comp:.2f} |")
    dsum = list(dd.summaries.values())
    mb = sum(t.bytes_per_node_step(s) for s in dsum) / len(dsum) / 1e6
    lines.append(f"| DDP fine-tuned | | | | | 1 | {mb:.3f} | {sum(t.compute(s) for s in dsum) / len(dsum):.2f} |")
    for label, per_k in rec.items():
        costs = [t.compute(s) for k in per_k for s in runs[f"{label} k{k}"].summaries.values()]
        one = len(per_k) == 1
        lines.append(f"| {label}, {len(per_k)} size{'' if one else 's'} | | | | | | | "
                     f"{sum(costs) / max(1, len(costs)) * len(per_k):.2f} ({'its size' if one else 'all sizes'}) |")

    result: dict[str, Any] = {
        "root": shown(str(root.resolve())), "F": F, "best_lrs": best, "lr_choice": t.lr_choice, "seeds": seeds,
        "keeps": t.keeps, "n_blocks": n,
        "half": half, "recipe": chosen, "machine": m, "tokens": tokens, "draws": draws, "split": "test",
        "dense_steps": t.plan["dense_steps"], "dense_lr": t.plan["dense_lr"], "recovery": t.recovery,
        "best_structured": best_struct,
        "test": {k: {str(s): v for s, v in r.items()} for k, r in test.items()},
        "baselines": {str(s): v for s, v in base.items()},
        "recovery_runs": {lbl: {str(k): {str(s): v for s, v in r.items()} for k, r in per_k.items()}
                          for lbl, per_k in rec.items()},
        "ratios": {label: {
            "vs_today": _dict(_ratio(deployed(label, half), today)),
            "vs_best_structured": _dict(_ratio(deployed(label, half), structured[best_struct])),
            "vs_sparsegpt": _dict(_ratio(deployed(label, half), sparsegpt)),
            "vs_recovery": _dict(_ratio(deployed(label, half), rec[rec_best[half]][half])) if half in rec_best
            else None,
            "full_vs_ddp": _dict(_ratio({s: v["full"] for s, v in test[label].items()}, ddp_full))}
            for label in test}}

    lines += _local_steps_section(t, root, test, runs, deployed, dd, ddp_full, structured[best_struct],
                                  best_struct, result)
    lines += _lr_section(t, result)
    lines += _recipe_lr_section(t, runs, test, deployed, chosen, bool(recipe), result)
    lines += _length_section(t, root, result)
    lines += _alpha_section(t, base)
    lines += _scratch_section(t, root, result)
    lines += ["", "## Commands", "", "Every command run into this folder (each resumable; a finished job is not run "
              "again), then this table:", "", "```"]
    lines += [shown(c) for c in t.plan.get("commands", [])]
    lines.append(shown("twist-fl tune " + " ".join(_quote(a) for a in (argv or ["finetune-table", str(root), "--out",
                                                                                str(out)]))))
    lines += ["```", ""]
    md = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "FINETUNE.md", md)
    write_json(out / "finetune.json", result)
    finetune_plot(result, out / "finetune.png")
    return {"markdown": md, **result}


def _dict(p: Paired | None) -> dict[str, Any] | None:
    return p.to_dict() if p is not None else None


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def _struct_name(label: str) -> str:
    """'FLAP a0' -> 'FLAP, alpha 0'."""
    name, _, alpha = label.rpartition(" a")
    return f"{name}, alpha {alpha}" if name else label


# run-config keys that set up a job (its seed, folders, length) rather than the method it trains
_SETUP_KEYS = frozenset({"seed", "init-from", "out-dir", "run-name", "num-server-rounds", "eval-every", "resume-from"})


def _keys(runs: Runs, today: Runs) -> str:
    """The run-config keys a lever sets on top of TwIST as today (from one run of each)."""
    run = next(iter(runs.summaries.values()))["run"]
    base = next(iter(today.summaries.values()))["run"]
    skip = _SETUP_KEYS | {"distill-from"}
    keys = [f"{k}={v}" for k, v in sorted(run.items()) if k not in skip and base.get(k) != v]
    if run.get("distill-from"):
        keys.insert(0, f"distill-from={'init' if run['distill-from'] == 'init' else '<the dense model>'}")
    return " ".join(keys) or "(none: TwIST as today)"


def _local_steps_section(t: Table, root: Path, test, runs, deployed, dd: Runs, ddp_full, flap_half, best_struct,
                         result) -> list[str]:
    """Local steps between syncs at equal tokens, with bytes; then DDP at the bytes TwIST spends."""
    n, half = t.n, t.half
    ls_rows = [lbl for lbl in test if lbl == "TwIST (as today)" or re.fullmatch(r"TwIST \+ ls\d+", lbl)]
    if len(ls_rows) < 2:
        return []
    ls_rows.sort(key=lambda lbl: int(next(iter(runs[lbl].summaries.values()))["run"]["local-steps"]))
    out = ["", f"## Local steps between syncs (F = {t.F}, equal tokens)", "",
           "Each node trains `local-steps` batches between two averagings (TwIST's repartition interval); a new "
           "subnet is drawn every sync. Bytes per node and optimizer step, measured.", "",
           f"| | local steps | full | {half}/{n} | vs today at {half}/{n} | vs DDP + {_struct_name(best_struct)} | "
           "full vs DDP full | MB / node / step |", "|---|---|---|---|---|---|---|---|"]
    for lbl in ls_rows:
        sums = list(runs[lbl].summaries.values())
        dep = deployed(lbl, half)
        out.append(f"| {lbl} | {sums[0]['run']['local-steps']} | {_cell({s: v['full'] for s, v in test[lbl].items()})} "
                   f"| {_cell(dep)} | {_txt(_ratio(dep, deployed('TwIST (as today)', half)))} | "
                   f"{_txt(_ratio(dep, flap_half))} | "
                   f"{_txt(_ratio({s: v['full'] for s, v in test[lbl].items()}, ddp_full))} | "
                   f"{sum(t.bytes_per_node_step(s) for s in sums) / len(sums) / 1e6:.3f} |")
    dsum = list(dd.summaries.values())
    out.append(f"| DDP | every step | {_cell(ddp_full)} | | | | 1 | "
               f"{sum(t.bytes_per_node_step(s) for s in dsum) / len(dsum) / 1e6:.3f} |")
    eqb = {}
    for lbl in ls_rows + [x for x in test if x not in ls_rows]:  # every row with a DDP run at its bytes (eqb stage)
        name = "base" if lbl == "TwIST (as today)" else lbl[len("TwIST + "):]
        r = Runs.find(root, lambda s, name=name: f"ddp-eqb-{name}-s{s}")
        if r:
            eqb[lbl] = (r, t.baselines(r, light=True))
    if eqb:
        out += ["", "**Equal bytes.** DDP trained for as many steps as its all-reduce bytes allow within what a TwIST "
                "node sends and receives in F steps, then pruned by FLAP (the better alpha); the same seeds.", "",
                f"| TwIST | DDP steps at its bytes | DDP full | DDP + FLAP {half}/{n} | "
                f"TwIST {half}/{n} / DDP + FLAP | TwIST full / DDP full |", "|---|---|---|---|---|---|"]
        for lbl, (r, b) in eqb.items():
            flap = {s: min(v["structured"][f"FLAP a{a:g}"][str(half)] for a in ALPHAS) for s, v in b.items()}
            full = {s: v["full"] for s, v in b.items()}
            steps = t.steps(next(iter(r.summaries.values())))
            out.append(f"| {lbl} | {steps} | {_cell(full)} | {_cell(flap)} | {_txt(_ratio(deployed(lbl, half), flap))} "
                       f"| {_txt(_ratio({s: v['full'] for s, v in test[lbl].items()}, full))} |")
            result.setdefault("equal_bytes", {})[lbl] = {"ddp_steps": steps, "ddp_full": full, "ddp_flap_half": flap}
    return out


def _seeds(n: int) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} seed{'' if n == 1 else 's'}"


def _choice_text(t: Table, where: str = "; the table \"The learning rate over seeds\" below") -> str:
    """How the table's two rates were chosen, as a sentence (`--lr-choice`)."""
    if t.lr_choice == "grid":
        return "the lower validation perplexity on the seed-0 grid (`tune finetune`'s choice, plan.json)."
    text = (f"the lowest mean validation perplexity over the {_seeds(len(t.dense.folders))} among the rates run on "
            f"every seed (`--lr-choice seeds`{where}).")
    grid = t.plan["best_lrs"]  # the seed-0 grid's rates, which `tune finetune` ran the levers at
    if float(t.best["twist"]) != float(grid["twist"]):
        text += (f" The levers ran at the seed-0 grid's TwIST rate ({grid['twist']:g}) unless their keys set "
                 "lr.")
    return text


def _lr_section(t: Table, result) -> list[str]:
    """Each side's fine-tune rates over seeds (the grid is seed 0's; the `lr-seeds` stage runs rates
    on the other seeds): validation perplexity of what the side deploys, paired against the chosen
    rate."""
    rows, out = [], []
    for side, what in (("twist", f"random {t.half}/{t.n} subnets"), ("ddp", "full model")):
        vals = t.rate_scores(side)
        chosen = vals.get(float(t.best[side]), {})
        if len(vals) < 2:  # one rate: nothing was chosen
            continue
        for lr, v in vals.items():
            mark = " (chosen)" if lr == float(t.best[side]) else ""
            rows.append(f"| {'TwIST' if side == 'twist' else 'DDP'} | {lr:g}{mark} | {what} | {len(v)} | {_cell(v)} | "
                        f"{_txt(_ratio(v, chosen)) if not mark and len(v) > 1 else ''} |")
            result.setdefault("lr_over_seeds", {}).setdefault(side, {})[f"{lr:g}"] = {
                "valid": {str(s): x for s, x in v.items()}, "vs_chosen": _dict(_ratio(v, chosen)) if not mark else None}
    if rows:
        out = ["", f"## The learning rate over seeds (F = {t.F}, validation)", "",
               "The grid is run on seed 0; the `lr-seeds` stage runs rates on the other seeds too. Each side's rate: "
               f"{_choice_text(t, '')} Validation perplexity of what each side deploys; ratios paired by seed "
               "against the chosen rate (above 1: the chosen rate is better).", "",
               "| side | lr | measured on | seeds | validation | vs the chosen rate |", "|---|---|---|---|---|---|",
               *rows]
    return out


def _recipe_lr_section(t: Table, runs: dict[str, Runs], test, deployed, chosen: str, named: bool,
                       result) -> list[str]:
    """The recipe's own rate over seeds: every lever whose run-config keys are the chosen recipe's but
    for `lr` (e.g. `--variants 'recipe-lr2:recipe=finetune lr=0.002'`), on validation (what the recipe is
    chosen on: its deployed N/2 subnets) and on the test split at every size, paired by seed against the
    recipe."""
    if not chosen.startswith("TwIST + "):
        return []
    H, half, n = f"keep-{t.half}", t.half, t.n
    skip = _SETUP_KEYS | {"lr"}

    def keys(label: str) -> dict[str, Any]:
        return {k: v for k, v in next(iter(runs[label].summaries.values()))["run"].items() if k not in skip}

    def lr(label: str) -> float:
        return float(next(iter(runs[label].summaries.values()))["run"]["lr"])

    def valid(label: str) -> dict[int, float]:
        return {s: v["final"][H]["mean"] for s, v in runs[label].summaries.items() if H in v.get("final", {})}

    same = [lbl for lbl in runs if lbl.startswith("TwIST + ") and keys(lbl) == keys(chosen)]
    if len({lr(lbl) for lbl in same}) < 2:
        return []
    v0 = valid(chosen)

    def test_at(label: str, k: int | None) -> dict[int, float]:  # full model (None) or deployed k/N, on test
        return deployed(label, k) if k else {s: v["full"] for s, v in test[label].items()}

    sizes = [None, *t.keeps]
    names = ["full" if k is None else f"{k}/{n}" for k in sizes]
    rows = []
    for lbl in sorted(same, key=lr):
        mark = lbl == chosen
        v = valid(lbl)
        ratios = {name: None if mark else _ratio(test_at(lbl, k), test_at(chosen, k))
                  for name, k in zip(names, sizes, strict=True)}
        rv = None if mark else _ratio(v, v0)
        rows.append(f"| {lbl[len('TwIST + '):]} | {lr(lbl):g}{' (the recipe)' if mark else ''} | {len(v)} | "
                    f"{_cell(v)} | {_txt(rv)} | " + " | ".join(_txt(ratios[name]) for name in names) + " |")
        result.setdefault("recipe_lr", {})[f"{lr(lbl):g}"] = {
            "lever": lbl, "chosen": mark, "valid": {str(s): x for s, x in v.items()}, "valid_vs_recipe": _dict(rv),
            "test_vs_recipe": {name: _dict(r) for name, r in ratios.items()}}
    return ["", f"## The recipe's learning rate over seeds (F = {t.F})", "",
            f"Levers with the recipe's run-config keys but another `lr`: validation perplexity of their deployed "
            f"{half}/{n} subnets (what the recipe is chosen on), and test perplexity at every size, each paired by "
            "seed against the recipe (above 1: the recipe's rate is better). "
            + ("The recipe is the one --recipe names." if named else "The recipe is the lever chosen on validation "
             "(among the levers run on the most seeds)."), "",
            f"| lever | lr | seeds | validation {half}/{n} | vs the recipe | "
            + " | ".join(f"test {name} vs the recipe" for name in names) + " |",
            "|---|---|---|---|---|" + "---|" * len(names), *rows]


def _length_section(t: Table, root: Path, result) -> list[str]:
    """Fine-tune length F: TwIST as today and every lever run at other F, against DDP and its prunings."""
    fs = sorted({int(m.group(1)) for d in root.iterdir()
                 if (m := re.match(rf"^twist-lr{t.best['twist']:g}-F(\d+)-s\d+$", d.name))} |
                {int(m.group("f")) for d in root.iterdir() if (m := LEVER.match(d.name)) and m.group("f")})
    if len(fs) < 2:
        return []
    half, n = t.half, t.n
    out = ["", "## Fine-tune length F (equal tokens; test)", "",
           f"TwIST as today, and each lever run at several F (`--ablation-levers`), against DDP fine-tuned for the "
           f"same F: its full model, FLAP (the better alpha) and SparseGPT at {half}/{n}. Ratios paired by seed.", "",
           f"| F | row | full | {half}/{n} | vs DDP + FLAP | vs SparseGPT | full vs DDP full |",
           "|---|---|---|---|---|---|---|"]
    names = sorted({m.group("name") for d in root.iterdir() if (m := LEVER.match(d.name)) and m.group("f")})
    for f in fs:
        dd = Runs.find(root, lambda s, f=f: Finetune.pair_name("ddp", t.best["ddp"], f, s))
        if not dd:
            continue
        b = t.baselines(dd, light=f != t.F)
        flap = {s: min(v["structured"][f"FLAP a{a:g}"][str(half)] for a in ALPHAS) for s, v in b.items()}
        sg = {s: v["unstructured"]["SparseGPT"][str(half)] for s, v in b.items()}
        full = {s: v["full"] for s, v in b.items()}
        rows = {"TwIST (as today)": Runs.find(root, lambda s, f=f: Finetune.pair_name("twist", t.best["twist"], f, s))}
        for name in names:
            rows[f"TwIST + {name}"] = Runs.find(root, lambda s, f=f, name=name:
                                                f"lever-{name}-s{s}" if f == t.F else f"lever-{name}-F{f}-s{s}")
        out.append(f"| {f} | DDP fine-tuned | {_cell(full)} | FLAP {_cell(flap)}; SparseGPT {_cell(sg)} | | | 1 |")
        for lbl, r in rows.items():
            if not r:
                continue
            te = t.test(r)
            dep_key = f"deployed-{half}" if any(_deployed(s["run"]) for s in r.summaries.values()) else f"keep-{half}"
            dep = {s: v[dep_key] for s, v in te.items()}
            fl = {s: v["full"] for s, v in te.items()}
            out.append(f"| {f} | {lbl} | {_cell(fl)} | {_cell(dep)} | {_txt(_ratio(dep, flap))} | "
                       f"{_txt(_ratio(dep, sg))} | {_txt(_ratio(fl, full))} |")
            result.setdefault("length", {}).setdefault(str(f), {})[lbl] = {
                "vs_flap": _dict(_ratio(dep, flap)), "vs_sparsegpt": _dict(_ratio(dep, sg)),
                "full_vs_ddp": _dict(_ratio(fl, full))}
    return out


def _alpha_section(t: Table, base: dict[int, dict[str, Any]]) -> list[str]:
    """Every structured pruning of the DDP model at alpha 0.5 (the subnets' (N/n)**alpha output scale,
    as TwIST trains) and at alpha 0 (no scale: FLAP's own setting)."""
    first = next(iter(base.values()))["structured"]
    methods = sorted({lbl.rpartition(" a")[0] for lbl in first})
    out = ["", f"## The pruning baselines at alpha 0 and 0.5 (DDP fine-tuned, F = {t.F}, test)", "",
           "| method | " + " | ".join(f"{k}/{t.n} alpha {a:g}" for k in t.keeps for a in ALPHAS) + " |",
           "|---|" + "---|" * (len(t.keeps) * len(ALPHAS))]
    for name in methods:
        out.append(f"| {name} | " + " | ".join(
            _cell({s: base[s]["structured"][f"{name} a{a:g}"][str(k)] for s in base}) for k in t.keeps
            for a in ALPHAS) + " |")
    return out


def _scratch_section(t: Table, root: Path, result) -> list[str]:
    names = sorted({d.name[len("scratch-"):-len("-s0")] for d in root.glob("scratch-*-s0")})
    if not names:
        return []
    half, n = t.half, t.n
    dense_test = t.test(t.dense)
    ddp_full = {s: v["full"] for s, v in dense_test.items()}
    out = ["", f"## From scratch ({t.plan['dense_steps']} steps, the dense stage's budget; test)", "",
           "TwIST from a random init (no teacher), against DDP trained from scratch with the same tokens (the dense "
           "stage; its subnets are random draws).", "",
           "| | full | " + " | ".join(f"{k}/{n}" for k in t.keeps) + f" | vs today at {half}/{n} | full vs DDP full |",
           "|---|---|" + "---|" * len(t.keeps) + "---|---|"]
    base = t.test(Runs.find(root, lambda s: f"scratch-base-s{s}"))
    rows = {"DDP (the dense stage)": dense_test}
    for name in names:
        rows["TwIST (as today)" if name == "base" else f"TwIST + {name}"] = \
            t.test(Runs.find(root, lambda s, name=name: f"scratch-{name}-s{s}"))
    base_half = {s: v[f"keep-{half}"] for s, v in base.items()}
    for lbl, te in rows.items():
        out.append(f"| {lbl} ({_seeds(len(te))}) | {_cell({s: v['full'] for s, v in te.items()})} | "
                   + " | ".join(_cell({s: v[f'keep-{k}'] for s, v in te.items()}) for k in t.keeps)
                   + f" | {_txt(_ratio({s: v[f'keep-{half}'] for s, v in te.items()}, base_half))}"
                   f" | {_txt(_ratio({s: v['full'] for s, v in te.items()}, ddp_full))} |")
    result["scratch"] = {k: {str(s): v for s, v in r.items()} for k, r in rows.items()}
    return out

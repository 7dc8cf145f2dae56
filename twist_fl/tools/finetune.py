"""The fine-tune regime, budget-matched: a dense model made prunable with TwIST, against the
same dense model trained on (`tune finetune` and `tune finetune-table`).

    twist-fl tune finetune --out runs/ft                  # every stage below, resumable
    twist-fl tune finetune-table runs/ft --out docs/results/finetune

Stages (each a run folder `<out>/<name>/run/`; a job whose summary.json exists is skipped):

1. `dense-s<seed>`: DDP from scratch, `--dense-steps` optimizer steps at `--dense-lr` (the
   tuned DDP rate), per seed. This is the dense model a user already has.
2. `twist-lr<lr>-F<F>-s0` and `ddp-lr<lr>-F<F>-s0`: from `dense-s0`, F = `--ft-steps` more
   steps, TwIST (init-from the dense model) and DDP (the same init-from, the same data) on a
   short learning-rate grid. TwIST's rate is picked by its validation perplexity at N/2 (the
   subnets it is trained to deploy), DDP's by its full model (what it deploys, before pruning).
3. Both at their rates, every seed (seed s starts from `dense-s<s>`), and every F of
   `--ft-ablation`: the pairs of the comparison, at equal tokens (the same steps, batch and nodes).
4. `twist-eqc-F<F>-s<seed>`: TwIST at equal compute: as many steps as the training FLOPs of F
   dense steps buy at its keep (`train_flops_ratio`, counted from the shapes).
5. `lever-<name>-s<seed>`: each `--variants` entry (run-config keys on top of TwIST's), every seed.
6. `scratch-base-s<seed>`, `scratch-<name>-s<seed>`: TwIST from a random init at the dense stage's
   budget (the main job's: 900 steps), as it is and with each `--scratch-variants` lever (no
   distillation: there is no teacher; default: the sandwich rule, `full-nodes=1`).

`finetune-table` evaluates the final models on the test split (the full model, random subnets,
and every post-training pruning of `twist-fl report` on the DDP model at the main F) and writes
FINETUNE.md and finetune.json: mean ± std over seeds, and ratios paired by seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.config import RunConfig
from ..core.io import atomic_write_text, write_json

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("distill:distill-from=init distill-weight=0.5 distill-temperature=1.0;"
                    "full1:full-nodes=1;"
                    "mixed:keep-choices=2,4,6,8;"
                    "nesterov:server-optimizer=nesterov server-lr=0.7 server-momentum=0.9;"
                    "distill-full1:distill-from=init distill-weight=0.5 distill-temperature=1.0 full-nodes=1")
# From scratch there is no teacher; the sandwich rule is the lever the literature trains with.
DEFAULT_SCRATCH_VARIANTS = "full1:full-nodes=1"


STAGES = ("dense", "grid", "pairs", "levers", "eqc", "ablation", "scratch")


@dataclass
class FinetuneOptions:
    out: str
    seeds: int = 3
    nodes: int = 4
    dense_steps: int = 900
    dense_lr: float = 1.5e-3
    ft_steps: int = 300
    ft_ablation: list[int] = field(default_factory=lambda: [150, 600])
    twist_lrs: list[float] = field(default_factory=lambda: [2.5e-4, 5e-4, 1e-3, 1.5e-3, 2e-3])
    ddp_lrs: list[float] = field(default_factory=lambda: [2.5e-4, 5e-4, 1e-3, 1.5e-3, 2e-3])
    variants: str = DEFAULT_VARIANTS
    ablation_levers: list[str] = field(default_factory=list)  # levers also run at every F of ft_ablation
    scratch_variants: str = DEFAULT_SCRATCH_VARIANTS  # levers of the scratch stage (no distillation: no teacher)
    equal_compute: bool = True
    run_config: dict[str, Any] = field(default_factory=dict)  # on top of the defaults, for every job
    stages: str = "dense,grid,pairs,levers,eqc,ablation,scratch"
    argv: list[str] = field(default_factory=list)  # the command line, quoted in the table's Commands
    seed_list: list[int] | None = None  # run only these seeds' jobs after the grid (parallel lanes); None: all
    reverse: bool = False  # take the jobs in reverse order (a second process sharing the folder)


def parse_variants(text: str) -> dict[str, dict[str, Any]]:
    """'name:key=value key=value;name2:...' -> {name: overrides}; each override set is checked."""
    from ..baselines.ddp import parse_overrides

    out: dict[str, dict[str, Any]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"--variants entry {part!r} must read 'name:key=value ...' with a plain name")
        if name in out:
            raise ValueError(f"--variants names {name!r} twice")
        out[name] = parse_overrides(body)
    return out


def resumable_round(run_dir: Path, flat: dict[str, Any]) -> int | None:
    """The round an interrupted Flower job can resume from: that of its newest checkpoint that
    verifies, when the folder holds its config.json; None when it has none (a job that never
    finished a round, a damaged one, or a DDP job, which restarts)."""
    from ..core.checkpoint import load_checkpoint

    if flat.get("strategy") == "ddp" or not (run_dir / "config.json").is_file():
        return None
    try:
        return load_checkpoint(run_dir)[0]
    except ValueError:
        return None


def _steps_to_rounds(steps: int, local_steps: int, what: str) -> int:
    if steps < local_steps or steps % local_steps:
        raise ValueError(f"{what}={steps} must be a positive multiple of local-steps={local_steps}")
    return steps // local_steps


class Finetune:
    """The stages of one `tune finetune` folder: names, configs, and the runs themselves."""

    def __init__(self, opts: FinetuneOptions):
        self.o = opts
        self.out = Path(opts.out)
        self.base = {**RunConfig().to_flat(), **opts.run_config}
        self.local_steps = int(self.base["local-steps"])
        self.variants = parse_variants(opts.variants)
        self.scratch_variants = parse_variants(opts.scratch_variants)
        for name, extra in self.scratch_variants.items():
            if "distill-from" in extra:
                raise ValueError(f"--scratch-variants entry {name!r} distils, but from scratch there is no teacher "
                                 "(init-from); leave distill-from out there")
        for f in (opts.dense_steps, opts.ft_steps, *opts.ft_ablation):
            _steps_to_rounds(f, self.local_steps, "a step count")
        unknown = [n for n in opts.ablation_levers if n not in self.variants]
        if unknown:
            raise ValueError(f"--ablation-levers names {unknown}, which --variants does not define; allowed: "
                             f"{sorted(self.variants)}")
        if opts.seeds < 1 or opts.nodes < 1:
            raise ValueError(f"--seeds={opts.seeds} and --nodes={opts.nodes} must be >= 1")
        for flat in self._all_configs():  # every job's config is checked before the first one trains
            RunConfig.from_flat({**flat, "init-from": "." if flat.get("init-from") else ""})  # (not trained yet)

    # --- names and configs ---------------------------------------------------------------

    def folder(self, name: str) -> Path:
        return self.out / name / "run"

    def dense(self, seed: int) -> dict[str, Any]:
        return {**self.base, "strategy": "ddp", "seed": seed, "lr": self.o.dense_lr,
                "num-server-rounds": _steps_to_rounds(self.o.dense_steps, self.local_steps, "--dense-steps"),
                "eval-every": 10**6}

    def ft(self, strategy: str, lr: float, steps: int, seed: int, extra: dict[str, Any] | None = None) -> dict:
        """A fine-tune job of `steps` optimizer steps from `dense-s<seed>`; a lever's `local-steps`
        sets the steps per round, so that every job of the same F trains the same tokens."""
        extra = extra or {}
        rounds = _steps_to_rounds(steps, int(extra.get("local-steps", self.local_steps)), "fine-tune steps")
        return {**self.base, "strategy": strategy, "lr": lr, "seed": seed, "init-from":
                str(self.folder(f"dense-s{seed}").resolve()), **extra, "num-server-rounds": rounds,
                "eval-every": rounds}

    def eqc_steps(self, steps: int) -> int:
        """TwIST steps whose training FLOPs equal `steps` dense steps, a multiple of local-steps."""
        from .bench import train_flops_ratio

        run = RunConfig.from_flat({k: v for k, v in self.base.items() if k != "init-from"})
        cfg = run.model_config()
        ratio = train_flops_ratio(cfg, run.keep_for(cfg), run.seq_len)
        return max(1, round(steps / ratio / self.local_steps)) * self.local_steps

    def _all_configs(self) -> list[dict[str, Any]]:
        o = self.o
        out = [self.dense(s) for s in range(o.seeds)]
        out += [self.ft(s, lr, o.ft_steps, 0) for s, lrs in (("twist", o.twist_lrs), ("ddp", o.ddp_lrs))
                for lr in lrs]
        out += [self.ft("twist", o.twist_lrs[0], f, 0, v) for v in self.variants.values() for f in
                [o.ft_steps, *o.ft_ablation]]
        out += [self.scratch(0, v) for v in self.scratch_variants.values()]
        return out

    # --- running -------------------------------------------------------------------------

    def job(self, name: str, flat: dict[str, Any]) -> dict[str, Any]:
        """Run one job, or return its summary when it is done. Several `finetune` processes may
        share a folder (`--reverse`, `--seed-list`): a job another process is running (its run
        folder is locked) is waited for, never run twice; an interrupted Flower job resumes from its
        newest checkpoint that verifies (`resumable_round`), one with none (or a DDP job) is run afresh."""
        import shutil
        import time

        from .sweep import clear_interrupted, run_job

        d = self.folder(name)
        done = d / "summary.json"
        while True:
            if done.is_file():
                return json.loads(done.read_text())
            resume = resumable_round(d, flat)
            if resume is None:
                try:
                    clear_interrupted(d, "finetune")
                except ValueError:  # another process is training it
                    time.sleep(5)
                    continue
            else:
                log.info("finetune: %s was interrupted after round %d of %d; resuming it from that round's "
                         "checkpoint", name, resume, flat["num-server-rounds"])
            run = {**flat, "out-dir": str(d.parent), "run-name": "run",
                   **({"resume-from": str(d)} if resume is not None else {})}
            RunConfig.from_flat(run)
            log.info("finetune: %s (%s lr=%g seed=%s, %d rounds)", name, run["strategy"], run["lr"], run["seed"],
                     run["num-server-rounds"])
            try:
                summary = run_job(run, self.o.nodes, "local", state_dir=d.parent / "node-state")
                shutil.rmtree(d.parent / "node-state", ignore_errors=True)  # the nodes' moments: for a resume only
                return summary
            except ValueError as e:
                if "another" not in str(e) and "already exists" not in str(e):
                    raise
                log.info("finetune: %s is being trained by another process; waiting for it", name)
                time.sleep(5)

    def best_lrs(self) -> dict[str, float]:
        """Each side's fine-tune rate from the seed-0 grid (see the module docstring)."""
        o, half = self.o, None
        best = {}
        for side, lrs in (("twist", o.twist_lrs), ("ddp", o.ddp_lrs)):
            scores = {}
            for lr in (reversed(lrs) if o.reverse else lrs):
                s = self.job(f"{side}-lr{lr:g}-F{o.ft_steps}-s0", self.ft(side, lr, o.ft_steps, 0))
                final = s["final"]
                if side == "twist":
                    half = half or f"keep-{max(1, s['n_blocks'] // 2)}"
                    scores[lr] = final[half]["mean"]
                else:
                    scores[lr] = final["full"]["ppl"]
            best[side] = min(scores, key=scores.get)
            edge = " (at the edge of the grid: widen it)" if len(lrs) > 1 and best[side] in (min(lrs), max(lrs)) \
                else ""
            log.info("finetune: %s fine-tune lr %g (validation %.3f)%s", side, best[side], scores[best[side]], edge)
        return best

    def scratch(self, seed: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """TwIST from a random init at the dense stage's budget (the same steps, nodes and tokens)."""
        rounds = _steps_to_rounds(self.o.dense_steps, self.local_steps, "--dense-steps")
        return {**self.base, "strategy": "twist", "seed": seed, "num-server-rounds": rounds,
                "eval-every": rounds, **(extra or {})}

    def run(self) -> dict[str, Any]:
        """Every stage, stage by stage over the seeds (so that an interrupted run has whole
        stages); a finished job is skipped."""
        o = self.o
        stages = [s.strip() for s in o.stages.split(",") if s.strip()]
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"--stages has {sorted(unknown)}; allowed: {list(STAGES)}")
        seeds = list(range(o.seeds)) if o.seed_list is None else [s for s in o.seed_list if 0 <= s < o.seeds]
        if o.reverse:
            seeds.reverse()
        if set(stages) <= {"scratch"}:  # needs neither the dense models nor the fine-tune rates
            for seed in seeds:
                self._scratch(seed)
            return {}
        for seed in (reversed(range(o.seeds)) if o.reverse else range(o.seeds)):
            self.job(f"dense-s{seed}", self.dense(seed))
        if set(stages) <= {"dense"}:
            return {}
        best = self.best_lrs()
        write_json(self.out / "plan.json", {"best_lrs": best, "F": o.ft_steps, "dense_steps": o.dense_steps,
                                            "dense_lr": o.dense_lr, "ablation": o.ft_ablation, "seeds": o.seeds,
                                            "nodes": o.nodes, "twist_lrs": o.twist_lrs, "ddp_lrs": o.ddp_lrs,
                                            "variants": o.variants, "scratch_variants": o.scratch_variants,
                                            "equal_compute": o.equal_compute, "run_config": o.run_config,
                                            "argv": o.argv})
        for stage in stages:
            for seed in seeds:
                if stage == "pairs":
                    for side in ("twist", "ddp"):
                        self.job(self.pair_name(side, best[side], o.ft_steps, seed),
                                 self.ft(side, best[side], o.ft_steps, seed))
                elif stage == "levers":
                    for name, extra in (reversed(self.variants.items()) if o.reverse else self.variants.items()):
                        self.job(f"lever-{name}-s{seed}", self.ft("twist", best["twist"], o.ft_steps, seed, extra))
                elif stage == "eqc" and o.equal_compute:
                    self.job(f"twist-eqc-F{o.ft_steps}-s{seed}",
                             self.ft("twist", best["twist"], self.eqc_steps(o.ft_steps), seed))
                elif stage == "ablation":
                    for f in o.ft_ablation:
                        for side in ("twist", "ddp"):
                            self.job(self.pair_name(side, best[side], f, seed), self.ft(side, best[side], f, seed))
                        for name in o.ablation_levers:
                            self.job(f"lever-{name}-F{f}-s{seed}",
                                     self.ft("twist", best["twist"], f, seed, self.variants[name]))
                elif stage == "scratch":
                    self._scratch(seed)
        return best

    def _scratch(self, seed: int) -> None:
        self.job(f"scratch-base-s{seed}", self.scratch(seed))
        for name, extra in self.scratch_variants.items():
            self.job(f"scratch-{name}-s{seed}", self.scratch(seed, extra))

    @staticmethod
    def pair_name(side: str, lr: float, steps: int, seed: int) -> str:
        return f"{side}-lr{lr:g}-F{steps}-s{seed}"


# --- the table ---------------------------------------------------------------------------


def _ms(values: list[float]) -> str:
    if not values:
        return ""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _summary(folder: Path) -> dict[str, Any] | None:
    f = folder / "summary.json"
    return json.loads(f.read_text()) if f.is_file() and (folder / "model").is_dir() else None


CACHE = ".table-cache"


def cached_eval(root: Path, what: str, runs: list[Path], params: dict[str, Any], compute) -> Any:
    """`compute()`, or what it gave before for the same runs (their final models, by size and
    mtime), the same parameters and the same kind of CPU (float kernels differ between kinds).
    The cache lives in `<root>/.table-cache/`, so a table rebuilt as jobs finish evaluates only
    the new ones; deleting that folder recomputes everything."""
    import hashlib

    from ..core.precision import machine

    stamp = []
    for r in runs:
        files = sorted(p for p in (r / "model").rglob("*") if p.is_file())
        stamp.append([str(r.relative_to(root)), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]])
    key = json.dumps({"what": what, "runs": stamp, "params": params, "machine": machine()}, sort_keys=True)
    f = root / CACHE / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if f.is_file():
        return json.loads(f.read_text())["value"]
    value = compute()
    f.parent.mkdir(exist_ok=True)
    write_json(f, {"what": what, "runs": [s[0] for s in stamp], "value": value})
    return value


def finetune_table(root: Path, out: Path, draws: int = 3, tokens: int = 32768, keeps: str = "",
                   argv: list[str] | None = None) -> dict[str, Any]:
    """FINETUNE.md and finetune.json from a `tune finetune` folder. Each run's evaluation is
    cached in `<root>/.table-cache/` (see `cached_eval`)."""
    from ..core.precision import machine
    from ..evaluation.compare import ReportOptions, aggregate, compare_pair, test_ppl
    from ..evaluation.loading import load_model, parse_keeps

    root = Path(root)
    plan_file = root / "plan.json"
    if not plan_file.is_file():
        raise ValueError(f"{root} has no plan.json: run `tune finetune --out {root}` first")
    plan = json.loads(plan_file.read_text())
    best, f_main = plan["best_lrs"], int(plan["F"])
    dense_runs = sorted(root.glob("dense-s*/run"), key=lambda p: int(p.parent.name.split("-s")[1]))
    seeds = [int(p.parent.name.split("-s")[1]) for p in dense_runs if _summary(p)]
    if not seeds:
        raise ValueError(f"{root} holds no finished dense run (dense-s<seed>/run)")
    model, _ = load_model(str(dense_runs[0]))
    n = model.cfg.n_blocks
    keep_list = parse_keeps(keeps, model.cfg) if keeps else sorted({max(1, round(n * f)) for f in (.25, .5, .75)})
    half = min(keep_list, key=lambda k: (abs(2 * k - n), k))
    fs = sorted({f_main, *plan["ablation"]})

    def tests(name_of) -> dict[int, dict[str, float]]:
        res = {}
        for s in seeds:
            d = root / name_of(s) / "run"
            if _summary(d):
                res[s] = cached_eval(root, "test_ppl", [d], {"keeps": keep_list, "draws": draws, "tokens": tokens},
                                 lambda d=d: test_ppl(str(d), keep_list, draws, tokens))
        return res

    result: dict[str, Any] = {"best_lrs": best, "seeds": seeds, "keeps": keep_list, "n_blocks": n, "F": f_main,
                              "command": plan_command(plan, str(root)), "machine": machine(),
                              "dense_steps": plan["dense_steps"], "dense_lr": plan["dense_lr"], "split": "test",
                              "tokens": tokens, "draws": draws}
    # The main comparison: TwIST fine-tuned vs DDP fine-tuned plus every post-training pruning.
    opts = ReportOptions(twist=[], dense=[], out=str(out), keeps=",".join(map(str, keep_list)), draws=draws,
                         split="test", eval_tokens=tokens)
    per_seed, pair_seeds = [], []
    for s in seeds:
        t = root / Finetune.pair_name("twist", best["twist"], f_main, s) / "run"
        d = root / Finetune.pair_name("ddp", best["ddp"], f_main, s) / "run"
        if _summary(t) and _summary(d):
            pair_seeds.append(s)
            log.info("finetune-table: seed %d: TwIST against DDP and every pruning of it", s)
            per_seed.append(cached_eval(root, "compare_pair", [t, d], {"opts": dataclasses.asdict(opts) | {"out": ""}},
                                    lambda t=t, d=d: compare_pair(str(t), str(d), opts)))
    if not per_seed:
        raise ValueError(f"{root} holds no finished TwIST/DDP pair at F={f_main}")
    main = per_seed[0] if len(per_seed) == 1 else aggregate(per_seed)
    result["comparison"] = main
    result["pair_seeds"] = pair_seeds
    # Per seed, the references every TwIST row is held against: the budget-matched DDP model's full
    # perplexity, and its best structured pruning (by mean) at N/2.
    best_label = min((lbl for lbl in main["structured"] if not lbl.startswith("TwIST")),
                     key=lambda lbl: main["structured"][lbl][main["keeps"].index(half)]["ppl"])
    refs = {"best_label": best_label[len("dense "):],
            "structured_half": {s: r["structured"][best_label][r["keeps"].index(half)]["ppl"]
                                for s, r in zip(pair_seeds, per_seed, strict=True)},
            "dense_full": {s: r["dense_full_ppl"] for s, r in zip(pair_seeds, per_seed, strict=True)}}
    result["references"] = {k: ({str(s): v for s, v in x.items()} if isinstance(x, dict) else x)
                            for k, x in refs.items()}
    # Levers, the equal-compute run and the F ablation.
    base = tests(lambda s: Finetune.pair_name("twist", best["twist"], f_main, s))
    rows = {"TwIST (as today)": base}
    for d in sorted(root.glob("lever-*-s0")):
        name = d.name[len("lever-"):-len("-s0")]
        rows[f"TwIST + {name}"] = tests(lambda s, name=name: f"lever-{name}-s{s}")
    eqc = tests(lambda s: f"twist-eqc-F{f_main}-s{s}")
    if eqc:
        rows["TwIST at equal compute"] = eqc
    result["levers"] = {k: {str(s): v for s, v in r.items()} for k, r in rows.items()}
    ablation = {}
    for f in fs:
        tw = tests(lambda s, f=f: Finetune.pair_name("twist", best["twist"], f, s))
        dd = tests(lambda s, f=f: Finetune.pair_name("ddp", best["ddp"], f, s))
        flap = {}
        for s in seeds:
            d = root / Finetune.pair_name("ddp", best["ddp"], f, s) / "run"
            if _summary(d):
                flap[s] = cached_eval(root, "flap", [d], {"keep": half, "tokens": tokens},
                                  lambda d=d: _flap_ppl(str(d), half, tokens))
        ablation[f] = {"twist": tw, "ddp": dd, "ddp_flap_half": flap}
    result["ablation"] = {str(f): {k: {str(s): v for s, v in r.items()} for k, r in a.items()}
                          for f, a in ablation.items()}
    scratch = {}
    for d in sorted(root.glob("scratch-*-s0")):
        name = d.name[len("scratch-"):-len("-s0")]
        scratch["TwIST (as today)" if name == "base" else f"TwIST + {name}"] = \
            tests(lambda s, name=name: f"scratch-{name}-s{s}")
    if scratch:
        scratch = {"DDP (the dense stage)": tests(lambda s: f"dense-s{s}"), **scratch}
    result["scratch"] = {k: {str(s): v for s, v in r.items()} for k, r in scratch.items()}
    md = _markdown(result, rows, ablation, half, argv or [], scratch, refs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "FINETUNE.md", md)
    write_json(out / "finetune.json", result)
    return {"markdown": md, **result}


def _flap_ppl(run_folder: str, keep: int, tokens: int) -> float:
    from ..core.train import evaluate
    from ..evaluation.loading import data_settings, load_model, windows_for
    from ..evaluation.prune import prune_structured

    model, meta = load_model(run_folder)
    d = data_settings(meta)
    windows = windows_for(model, d, "test", tokens)
    calib = windows_for(model, d, "calib", 16384)
    return evaluate(prune_structured(model, keep, "flap", 0, calib), windows)["ppl"]


def _lever_rows(rows: dict[str, dict[int, dict[str, float]]], base_label: str, keeps: list[int],
                half: int, refs: dict[str, Any] | None = None) -> list[str]:
    """One table row per entry: full and keeps (mean ± std over its seeds), the ratio at `half`
    paired by seed against `rows[base_label]`, and with `refs` the ratios paired by seed against
    the DDP model's best structured pruning at `half` (`structured_half`, when given) and against
    its full model (`dense_full`)."""
    out = []
    base = rows.get(base_label, {})

    def paired(r: dict[int, dict[str, float]], key: str, ref: dict[int, float]) -> str:
        common = [s for s in sorted(r) if s in ref and key in r[s]]
        return _ms([r[s][key] / ref[s] for s in common]) if common else ""

    for label, r in rows.items():
        ss = sorted(r)
        if not ss:
            continue
        cells = [_ms([r[s]["full"] for s in ss])] + [_ms([r[s][f"keep-{k}"] for s in ss]) for k in keeps]
        cells.append(paired(r, f"keep-{half}", {s: v[f"keep-{half}"] for s, v in base.items()
                                                   if f"keep-{half}" in v}))
        if refs is not None:
            if refs.get("structured_half") is not None:
                cells.append(paired(r, f"keep-{half}", refs["structured_half"]))
            cells.append(paired(r, "full", refs["dense_full"]))
        out.append(f"| {label} ({len(ss)} seeds) | " + " | ".join(cells) + " |")
    return out


def _markdown(res: dict[str, Any], rows: dict[str, dict[int, dict[str, float]]], ablation: dict, half: int,
              argv: list[str], scratch: dict[str, dict[int, dict[str, float]]] | None = None,
              refs: dict[str, Any] | None = None) -> str:
    n, keeps, main = res["n_blocks"], res["keeps"], res["comparison"]
    seeds = res["seeds"]
    st, un = main["structured"], main["unstructured"]
    idx = {k: i for i, k in enumerate(main["keeps"])}

    def cell(p: dict[str, Any]) -> str:
        return f"{p['ppl']:.3f} ± {p['std']:.3f}" if "std" in p and "per_seed" in p else f"{p['ppl']:.3f}"

    def per_seed(label: str, kind: str, k: int) -> list[float]:
        p = main[kind][label][idx[k]]
        return p.get("per_seed", [p["ppl"]])

    head = "| | full | " + " | ".join(f"{k}/{n}" for k in keeps) + " |"
    sep = "|---|---|" + "---|" * len(keeps)
    tw_full = [r["twist_full_ppl"] for r in main.get("per_seed", [main])]
    dd_full = [r["dense_full_ppl"] for r in main.get("per_seed", [main])]
    lines = [f"# Fine-tuning a dense model with TwIST, budget-matched ({len(seeds)} seeds, paired)", "",
             f"A dense model (DDP, {res['dense_steps']} steps at lr {res['dense_lr']:g}) is fine-tuned for F = "
             f"{res['F']} more steps either with TwIST (lr {res['best_lrs']['twist']:g}) or with DDP (lr "
             f"{res['best_lrs']['ddp']:g}), the same data and tokens; the DDP model is then pruned after training "
             "with every post-training method (no recovery training). Test perplexity "
             f"({res['tokens']:,} tokens), mean ± std over seeds {seeds}; random subnets are a mean over "
             f"{res['draws']} draws per model. **View: equal tokens.** Machine: {res['machine']['cpu']} "
             f"({res['machine']['vector']}), torch {res['machine']['torch']}; the figures are deterministic for "
             "the same command on the same CPU kind and differ between kinds (by about 1% on the main job).", "",
             head, sep,
             f"| TwIST fine-tuned, random subnets | {_ms(tw_full)} | "
             + " | ".join(cell(st["TwIST random"][idx[k]]) for k in keeps) + " |"]
    for label in st:
        if label.startswith("TwIST"):
            continue
        lines.append(f"| DDP fine-tuned, {label[len('dense '):]} (structured) | "
                     + (f"{_ms(dd_full)} | " if label == "dense random" else " | ")
                     + " | ".join(cell(st[label][idx[k]]) for k in keeps) + " |")
    for label in un:
        lines.append(f"| DDP fine-tuned, {label[len('dense '):]} (unstructured, same share) | | "
                     + " | ".join(cell(un[label][idx[k]]) for k in keeps) + " |")
    lines += ["", "Paired ratios (per seed, then mean ± std over seeds):", ""]
    for k in keeps:
        tw = np.array(per_seed("TwIST random", "structured", k))
        best_label = min((lbl for lbl in st if not lbl.startswith("TwIST")),
                         key=lambda lbl: np.mean(per_seed(lbl, "structured", k)))
        sg = np.array(per_seed("dense SparseGPT", "unstructured", k)) if "dense SparseGPT" in un else None
        line = (f"- keep {k}/{n}: TwIST / best structured ({best_label[len('dense '):]}) = "
                f"**{_ms(list(tw / np.array(per_seed(best_label, 'structured', k))))}**")
        if sg is not None:
            line += f"; TwIST / SparseGPT = {_ms(list(tw / sg))}"
        lines.append(line + ".")
    lines.append(f"- full: TwIST / DDP = {_ms(list(np.array(tw_full) / np.array(dd_full)))}.")
    best = refs["best_label"] if refs else ""
    lines += ["", f"## Levers (F = {res['F']}, TwIST's lr, the same seeds; test perplexity)", "",
              "Each lever is one run-config key set on top of TwIST as it is today. Ratios, paired by seed (below 1 "
              f"is better): against TwIST as today at {half}/{n}; against the budget-matched DDP model pruned with "
              f"its best structured method ({best}) at {half}/{n}; and the full model against DDP's. The random "
              "subnets here are drawn with each run's seed, those of the comparison above with seed 0, so the "
              "TwIST-as-today row differs from the comparison's first row by the draws.", "",
              head.rstrip() + f" vs today at {half}/{n} | vs DDP + {best} at {half}/{n} | full vs DDP full |",
              sep + "---|---|---|"]
    lines += _lever_rows(rows, "TwIST (as today)", keeps, half, refs)
    lines += ["", "\"At equal compute\": TwIST trained for as many steps as F dense steps' training FLOPs buy at its "
              "keep (counted from the shapes), against the DDP model of F steps. **View: equal compute.**", "",
              f"## Fine-tune length F (equal tokens; test; TwIST random subnets and DDP + FLAP at {half}/{n})", "",
              f"| F | TwIST full | DDP full | TwIST {half}/{n} | DDP + FLAP {half}/{n} | ratio (paired) |",
              "|---|---|---|---|---|---|"]
    for f, a in sorted(ablation.items()):
        common = sorted(set(a["twist"]) & set(a["ddp_flap_half"]))
        lines.append(f"| {f} ({len(a['twist'])} seeds) | {_ms([a['twist'][s]['full'] for s in sorted(a['twist'])])} | "
                     f"{_ms([a['ddp'][s]['full'] for s in sorted(a['ddp'])])} | "
                     f"{_ms([a['twist'][s][f'keep-{half}'] for s in sorted(a['twist'])])} | "
                     f"{_ms([a['ddp_flap_half'][s] for s in sorted(a['ddp_flap_half'])])} | "
                     f"{_ms([a['twist'][s][f'keep-{half}'] / a['ddp_flap_half'][s] for s in common])} |")
    if scratch:
        lines += ["", f"## From scratch ({res['dense_steps']} steps, the main job's budget; test perplexity)", "",
                  "TwIST from a random init, as today and with each `--scratch-variants` lever (no distillation: "
                  "there is no teacher), against DDP trained from scratch with the same tokens (the dense stage "
                  "above; its subnets are random draws). Ratios, paired by seed: against TwIST as today at "
                  f"{half}/{n}, and the full model against DDP's.", "",
                  head.rstrip() + f" vs today at {half}/{n} | full vs DDP full |", sep + "---|---|"]
        ddp_full = {s: v["full"] for s, v in scratch.get("DDP (the dense stage)", {}).items()}
        lines += _lever_rows(scratch, "TwIST (as today)", keeps, half, {"dense_full": ddp_full})
    lines += ["", "## Commands", "", "Every stage (resumable; a second process with `--reverse` on the same folder "
              "shares the jobs), then this table:", "", "```", res["command"]]
    if argv:
        lines.append("twist-fl tune " + " ".join(shlex.quote(a) for a in argv))
    lines += ["```", ""]
    return "\n".join(lines)


def plan_command(plan: dict[str, Any], root: str) -> str:
    """The `twist-fl tune finetune` command that runs every stage of `plan` (plan.json)."""
    def floats(xs: list[float]) -> str:
        return ",".join(f"{x:g}" for x in xs)

    o = FinetuneOptions(out=root)
    parts = ["twist-fl tune finetune --out", shlex.quote(root)]
    for flag, value, default in (
            ("--seeds", plan.get("seeds", o.seeds), o.seeds), ("--nodes", plan.get("nodes", o.nodes), o.nodes),
            ("--dense-steps", plan["dense_steps"], o.dense_steps), ("--dense-lr", f"{plan['dense_lr']:g}",
                                                                     f"{o.dense_lr:g}"),
            ("--ft-steps", plan["F"], o.ft_steps), ("--ft-ablation", ",".join(map(str, plan["ablation"])),
                                                    ",".join(map(str, o.ft_ablation))),
            ("--twist-lrs", floats(plan.get("twist_lrs", o.twist_lrs)), floats(o.twist_lrs)),
            ("--ddp-lrs", floats(plan.get("ddp_lrs", o.ddp_lrs)), floats(o.ddp_lrs)),
            ("--variants", plan.get("variants", o.variants), o.variants),
            ("--scratch-variants", plan.get("scratch_variants", o.scratch_variants), o.scratch_variants)):
        if value != default:
            parts += [flag, shlex.quote(str(value))]
    if not plan.get("equal_compute", True):
        parts.append("--no-equal-compute")
    if plan.get("run_config"):
        parts += ["--run-config", shlex.quote(" ".join(f"{k}={json.dumps(v)}" if isinstance(v, str) else f"{k}={v}"
                                                       for k, v in plan["run_config"].items()))]
    return " ".join(parts)

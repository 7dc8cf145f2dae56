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
6. `<side>-lr<lr>-F<F>-s<seed>` for each rate of `--lr-seeds` on every seed (stage `lr-seeds`):
   the grid's choice checked over seeds (it is made on seed 0); `finetune-table` reports each
   rate's validation perplexity paired by seed against the chosen one.
7. `scratch-base-s<seed>`, `scratch-<name>-s<seed>`: TwIST from a random init at the dense stage's
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

from ..core.config import RunConfig, parse_run_config, quarters_of
from ..core.io import write_json

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = ("distill:distill-from=init distill-weight=0.5 distill-temperature=1.0;"
                    "full1:full-nodes=1;"
                    "mixed:keep-choices=2,4,6,8;"
                    "nesterov:server-optimizer=nesterov server-lr=0.7 server-momentum=0.9;"
                    "distill-full1:distill-from=init distill-weight=0.5 distill-temperature=1.0 full-nodes=1")
# From scratch there is no teacher; the sandwich rule is the lever the literature trains with.
DEFAULT_SCRATCH_VARIANTS = "full1:full-nodes=1"


STAGES = ("dense", "grid", "pairs", "levers", "eqc", "ablation", "recovery", "eqb", "lr-seeds", "scratch")


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
    recovery_lrs: list[float] = field(default_factory=lambda: [5e-4, 1e-3, 2e-3])  # the recovery fine-tune's grid
    recovery_distill: str = "distill-weight=0.8 distill-temperature=2.0"  # its distillation from the dense model
    recovery_keeps: list[int] = field(default_factory=list)  # sizes of the recovery stage; [] = N/4, N/2, 3N/4
    eqb_levers: list[str] = field(default_factory=list)  # the eqb stage: DDP at the bytes of TwIST and these levers
    lr_seeds: list[float] = field(default_factory=list)  # the lr-seeds stage: these rates, both sides, every seed
    seed_list: list[int] | None = None  # run only these seeds' jobs after the grid (parallel lanes); None: all
    reverse: bool = False  # take the jobs in reverse order (a second process sharing the folder)


def parse_variants(text: str, flag: str = "--variants") -> dict[str, dict[str, Any]]:
    """'name:key=value key=value;name2:...' -> {name: overrides}; each override set is checked
    (an error names `flag` and the entry)."""
    out: dict[str, dict[str, Any]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"{flag} entry {part!r} must read 'name:key=value ...' with a plain name")
        if name in out:
            raise ValueError(f"{flag} names {name!r} twice")
        out[name] = parse_run_config(body, f"{flag} {name!r}:")
    return out


def n_blocks_of(run_dir: Path) -> int:
    """N of a run folder's model: the blocks of each kind per layer."""
    from ..core.config import GPTConfig

    return GPTConfig.from_dict(json.loads((run_dir / "model" / "config.json").read_text())["gpt"]).n_blocks


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


def side_validation(side: str, summary: dict[str, Any], half: int) -> float:
    """What a side's fine-tune rate is chosen on, from a finished job's summary: TwIST's random
    subnets at `half` (what it is trained to deploy), DDP's full model (what it deploys, before
    pruning)."""
    final = summary["final"]
    return final[f"keep-{half}"]["mean"] if side == "twist" else final["full"]["ppl"]


_WHERE = ("out-dir", "run-name", "resume-from")  # where a job runs, not what it trains


def _what_it_trains(flat: dict[str, Any]) -> dict[str, Any]:
    """A job's run config as it resolves (a recipe's keys set, defaults filled), less where it ran;
    keys this version does not know are left out, so an older finished job still compares."""
    known = RunConfig().to_flat()
    keys = {k: v for k, v in flat.items() if k in known and k not in _WHERE}
    init = keys.get("init-from", "")
    resolved = RunConfig.from_flat({**keys, "init-from": "." if init else ""}).to_flat()  # (it may not exist yet)
    return {**{k: v for k, v in resolved.items() if k not in _WHERE}, "init-from": init}


def check_same_job(name: str, folder: Path, recorded: dict[str, Any], flat: dict[str, Any]) -> None:
    """A job folder holds the job of that name only: a finished or interrupted job whose recorded
    run config differs from the one asked for now (a lever redefined under its name, another rate
    for a lever that takes TwIST's) is refused, never reused or resumed as if it were this one."""
    was, now = _what_it_trains(recorded), _what_it_trains(flat)
    differ = {k: (was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)}
    if differ:
        raise ValueError(f"{folder} holds job {name!r} trained with other keys: {differ} (key: (recorded, now)); "
                         "name the lever otherwise, or use another --out")


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
        self.scratch_variants = parse_variants(opts.scratch_variants, "--scratch-variants")
        for name, extra in self.scratch_variants.items():
            if "distill-from" in extra:
                raise ValueError(f"--scratch-variants entry {name!r} distils, but from scratch there is no teacher "
                                 "(init-from); leave distill-from out there")
        for f in (opts.dense_steps, opts.ft_steps, *opts.ft_ablation):
            _steps_to_rounds(f, self.local_steps, "a step count")
        for flag, names in (("--ablation-levers", opts.ablation_levers), ("--eqb-levers", opts.eqb_levers)):
            unknown = [n for n in names if n not in self.variants]
            if unknown:
                raise ValueError(f"{flag} names {unknown}, which --variants does not define; allowed: "
                                 f"{sorted(self.variants)}")
        if any(not lr > 0 for lr in opts.lr_seeds):
            raise ValueError(f"--lr-seeds={opts.lr_seeds} must hold rates > 0")
        # "none": the recovery stage runs its plain variant only (no distillation from the dense model)
        self.recovery_distill = None if opts.recovery_distill.strip() == "none" else \
            parse_run_config(opts.recovery_distill, "--recovery-distill")
        if self.recovery_distill is not None:
            unknown = set(self.recovery_distill) - {"distill-weight", "distill-temperature"}
            if unknown or not 0 < float(self.recovery_distill.get("distill-weight", 0)) <= 1:
                raise ValueError(f"--recovery-distill={opts.recovery_distill!r} must set distill-weight in (0, 1] and "
                                 "may set distill-temperature, nothing else; or be 'none'")
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
        flat = {**self.base, "strategy": strategy, "lr": lr, "seed": seed, "init-from":
                str(self.folder(f"dense-s{seed}").resolve()), **(extra or {})}
        # the steps per round as the run will resolve them (a lever's own local-steps, or its recipe's)
        local_steps = RunConfig.from_flat({**flat, "init-from": "."}).local_steps  # (the dense model may not exist yet)
        rounds = _steps_to_rounds(steps, local_steps, "fine-tune steps")
        return {**flat, "local-steps": local_steps, "num-server-rounds": rounds, "eval-every": rounds}

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
        out += [self.ft(s, lr, o.ft_steps, 0) for s in ("twist", "ddp") for lr in o.lr_seeds]
        out += [self.scratch(0, v) for v in self.scratch_variants.values()]
        return out

    # --- running -------------------------------------------------------------------------

    def in_order(self, items) -> list:
        """`items` in the order this process takes them: reversed under --reverse, so that a second
        process on the same --out starts at the other end of every stage."""
        items = list(items)
        return items[::-1] if self.o.reverse else items

    def job(self, name: str, flat: dict[str, Any]) -> dict[str, Any]:
        """Run one job, or return its summary when it is done. Several `finetune` processes may
        share a folder (`--reverse`, `--seed-list`): a job another process is running (its run
        folder is locked) is waited for, never run twice; an interrupted Flower job resumes from its
        newest checkpoint that verifies (`resumable_round`), one with none (or a DDP job) is run afresh."""
        import shutil
        import time

        from ..core.runs import RunFolder
        from .sweep import clear_interrupted, run_job

        d = self.folder(name)
        done = d / "summary.json"
        waiting_for = None
        while True:
            if done.is_file():
                summary = json.loads(done.read_text())
                check_same_job(name, d, summary["run"], flat)
                return summary
            holder = RunFolder(d).holder()
            if holder is not None:  # running now: its checkpoints are not an interruption's
                if holder != waiting_for:
                    log.info("finetune: %s is being trained by another process (%s); waiting for it", name, holder)
                    waiting_for = holder
                time.sleep(5)
                continue
            resume = resumable_round(d, flat)
            if resume is None:
                try:
                    clear_interrupted(d, "finetune")
                except ValueError:  # another process is training it
                    time.sleep(5)
                    continue
            else:
                check_same_job(name, d, json.loads((d / "config.json").read_text())["run"], flat)
                log.info("finetune: %s was interrupted after round %d of %d; resuming it from that round's "
                         "checkpoint", name, resume, flat["num-server-rounds"])
            run = {**flat, "out-dir": str(d.parent), "run-name": "run",
                   **({"resume-from": str(d)} if resume is not None else {})}
            RunConfig.from_flat(run).check_nodes(self.o.nodes)
            log.info("finetune: %s (%s lr=%g seed=%s, %d rounds)", name, run["strategy"], run["lr"], run["seed"],
                     run["num-server-rounds"])
            try:
                summary = run_job(run, self.o.nodes, "local", state_dir=d.parent / "node-state")
                shutil.rmtree(d.parent / "node-state", ignore_errors=True)  # the nodes' moments: for a resume only
                return summary
            except ValueError as e:
                if "another" not in str(e) and "already exists" not in str(e):
                    raise
                time.sleep(5)  # another process took it between the check above and this run

    def best_lrs(self) -> dict[str, float]:
        """Each side's fine-tune rate from the seed-0 grid (see the module docstring)."""
        o = self.o
        best = {}
        for side, lrs in (("twist", o.twist_lrs), ("ddp", o.ddp_lrs)):
            scores = {}
            for lr in self.in_order(lrs):
                s = self.job(f"{side}-lr{lr:g}-F{o.ft_steps}-s0", self.ft(side, lr, o.ft_steps, 0))
                scores[lr] = side_validation(side, s, quarters_of(s["n_blocks"], 2))
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
        self.check_plan()
        seeds = self.in_order(range(o.seeds) if o.seed_list is None else [s for s in o.seed_list if 0 <= s < o.seeds])
        if set(stages) <= {"scratch"}:  # needs neither the dense models nor the fine-tune rates
            for seed in seeds:
                self._scratch(seed)
            return {}
        for seed in self.in_order(range(o.seeds)):
            self.job(f"dense-s{seed}", self.dense(seed))
        if set(stages) <= {"dense"}:
            return {}
        best = self.best_lrs()
        self.record_plan(best)
        for stage in stages:
            for seed in seeds:
                if stage == "pairs":
                    for side in ("twist", "ddp"):
                        self.job(self.pair_name(side, best[side], o.ft_steps, seed),
                                 self.ft(side, best[side], o.ft_steps, seed))
                elif stage == "levers":
                    for name, extra in self.in_order(self.variants.items()):
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
                elif stage == "recovery":
                    rec = self.recovery_plan()
                    for keep in self.in_order(self.recovery_keeps()):
                        for kd in self.in_order((False, True) if self.recovery_distill is not None else (False,)):
                            self.job(self.recovery_name(keep, o.ft_steps, seed, kd, rec["lr"]),
                                     self.recovery(seed, keep, rec, kd))
                elif stage == "eqb":
                    for name in ("", *o.eqb_levers):
                        steps = self.eqb_steps(best, name)
                        self.job(f"ddp-eqb-{name or 'base'}-s{seed}",
                                 self.ft("ddp", best["ddp"], steps, seed, {"local-steps": 1}))
                elif stage == "lr-seeds":
                    for side in self.in_order(("twist", "ddp")):
                        for lr in self.in_order(o.lr_seeds):
                            self.job(self.pair_name(side, lr, o.ft_steps, seed), self.ft(side, lr, o.ft_steps, seed))
                elif stage == "scratch":
                    self._scratch(seed)
        return best

    # --- the recovery baseline: prune the dense model with FLAP, then fine-tune that size -------

    def recovery_keeps(self) -> list[int]:
        """The recovery stage's sizes: --recovery-keeps, or N/4, N/2 and 3N/4."""
        n = n_blocks_of(self.folder("dense-s0"))
        return self.o.recovery_keeps or sorted({max(1, round(n * f)) for f in (.25, .5, .75)} - {n})

    def pruned(self, seed: int, keep: int, alpha: float) -> Path:
        """`<out>/flap-a<alpha>-k<keep>-s<seed>/model`: dense-s<seed> pruned to `keep` by FLAP (with
        its bias compensation) at `alpha`, made once (calibration: the training split's middle)."""
        from ..core.io import staged_folder
        from ..core.model import GPT, WEIGHTS_FILE
        from ..evaluation.loading import data_settings, load_model, windows_for
        from ..evaluation.prune import prune_structured

        d = self.out / f"flap-a{alpha:g}-k{keep}-s{seed}" / "model"
        if (d / WEIGHTS_FILE).is_file():
            return d
        model, meta = load_model(str(self.folder(f"dense-s{seed}")))
        model = GPT.from_state(dataclasses.replace(model.cfg, alpha=alpha), model.state_dict())
        calib = windows_for(model, data_settings(meta), "calib", 16384)
        pruned = prune_structured(model, keep, "flap", 0, calib)
        d.parent.mkdir(parents=True, exist_ok=True)
        with staged_folder(d) as tmp:
            pruned.save(tmp, extra={"run": {**meta.get("run", {}), "alpha": alpha},
                                    "pruned_from": str(self.folder(f"dense-s{seed}").resolve()),
                                    "pruning": {"method": "flap", "keep": keep, "alpha": alpha}})
        log.info("finetune: %s: FLAP at keep %d, alpha %g, from dense-s%d", d, keep, alpha, seed)
        return d

    def recovery_plan(self) -> dict[str, Any]:
        """The recovery baseline's alpha (FLAP at N/2 on dense-s0's validation split, alpha 0 against
        the run's) and learning rate (its grid at N/2, seed 0, no distillation, by the validation
        perplexity of the recovered model), each chosen once and kept in recovery.json. A
        --recovery-lrs that names a rate the kept grid lacks widens it: the new rates run, the rates
        already run are read back, and the choice is made again over all of them."""
        from ..core.model import GPT
        from ..core.train import evaluate
        from ..evaluation.loading import data_settings, load_model, windows_for

        f = self.out / "recovery.json"
        old = json.loads(f.read_text()) if f.is_file() else None
        lrs = list(self.o.recovery_lrs)
        if old is not None:
            ran = [float(lr) for lr in old["valid_by_lr"]]
            if set(lrs) <= set(ran):
                return old
            log.info("finetune: widening the recovery baseline's rates %s with %s", ran,
                     sorted(set(lrs) - set(ran)))
            lrs = sorted(set(ran) | set(lrs))
        keep = min(self.recovery_keeps(), key=lambda k: abs(2 * k - n_blocks_of(self.folder("dense-s0"))))
        if old is not None:  # the alpha stays the one chosen first
            valid, alpha = {float(a): v for a, v in old["valid_flap_by_alpha"].items()}, float(old["alpha"])
        else:
            model, meta = load_model(str(self.folder("dense-s0")))
            windows = windows_for(model, data_settings(meta), "valid", int(self.base["eval-tokens"]))
            valid = {a: evaluate(GPT.load(self.pruned(0, keep, a)), windows)["ppl"]
                     for a in sorted({0.0, float(self.base["alpha"])})}
            alpha = min(valid, key=valid.get)
        scores = {}
        for lr in self.in_order(lrs):
            summary = self.job(self.recovery_name(keep, self.o.ft_steps, 0, False, lr),
                               self.recovery(0, keep, {"alpha": alpha, "lr": lr}, False))
            scores[lr] = summary["final"]["full"]["ppl"]
        plan = {"alpha": alpha, "lr": min(scores, key=scores.get), "keep": keep, "valid_flap_by_alpha": valid,
                "valid_by_lr": scores}
        write_json(f, plan)
        log.info("finetune: recovery baseline at alpha %g (FLAP at %d, validation %s), lr %g (validation %s)",
                 plan["alpha"], keep, valid, plan["lr"], scores)
        return plan

    @staticmethod
    def recovery_name(keep: int, steps: int, seed: int, kd: bool, lr: float) -> str:
        return f"recovery{'-kd' if kd else ''}-lr{lr:g}-k{keep}-F{steps}-s{seed}"

    def recovery(self, seed: int, keep: int, rec: dict[str, Any], kd: bool) -> dict[str, Any]:
        """DDP fine-tuning of the FLAP-pruned dense model at `keep` for F steps (the fine-tune's
        tokens), with distillation from the dense model it was cut from when `kd`."""
        extra = {"alpha": rec["alpha"], **({"distill-from": str(self.folder(f"dense-s{seed}").resolve()),
                                             **self.recovery_distill} if kd else {})}
        flat = self.ft("ddp", rec["lr"], self.o.ft_steps, seed, extra)
        flat["init-from"] = str(self.pruned(seed, keep, rec["alpha"]).resolve())
        return flat

    # --- equal bytes -----------------------------------------------------------------------

    def eqb_steps(self, best: dict[str, float], lever: str) -> int:
        """DDP steps whose all-reduced bytes per worker equal what a TwIST node sends and receives
        in F steps (TwIST as today, or `lever`), both measured from the seed-0 runs."""
        tw = self.folder(self.pair_name("twist", best["twist"], self.o.ft_steps, 0) if not lever
                         else f"lever-{lever}-s0")
        dd = self.folder(self.pair_name("ddp", best["ddp"], self.o.ft_steps, 0))
        for d in (tw, dd):
            if not (d / "summary.json").is_file():
                raise ValueError(f"the eqb stage measures bytes from {d}, which has not finished: run the pairs and "
                                 "levers stages first")
        per_node = [json.loads((d / "summary.json").read_text()) for d in (tw, dd)]
        tw_bytes = (per_node[0]["bytes_down_total"] + per_node[0]["bytes_up_total"]) / self.o.nodes
        dd_bytes = (per_node[1]["bytes_down_total"] + per_node[1]["bytes_up_total"]) / self.o.nodes
        return max(1, round(self.o.ft_steps * tw_bytes / dd_bytes))

    def check_plan(self) -> None:
        """A folder holds the jobs of one setting: a command whose F, dense stage, nodes or run config
        differ from those recorded in its plan.json is refused (its jobs would not be comparable).
        Fine-tune rates that hold every recorded rate widen the grid: the new rates run, the rates
        already run are read back, and each side's rate is chosen again over all of them (pair jobs
        are named by their rate, so a new choice runs its own; a lever already run at the old rate
        is refused, not reused: check_same_job)."""
        f = self.out / "plan.json"
        if not f.is_file():
            return
        plan = json.loads(f.read_text())
        mine = self._plan_settings()
        widened = {k for k in ("twist_lrs", "ddp_lrs") if k in plan and set(plan[k]) < set(mine[k])}
        differ = {k: (plan.get(k), v) for k, v in mine.items() if k in plan and plan[k] != v and k not in widened}
        if differ:
            raise ValueError(f"{self.out} holds the jobs of another setting: {differ} (key: (recorded, now)); use "
                             "another --out, or --ft-ablation for other fine-tune lengths")
        for k in sorted(widened):  # logged once the command is known to be taken
            log.info("finetune: widening %s %s with %s", k, plan[k], sorted(set(mine[k]) - set(plan[k])))

    def _plan_settings(self) -> dict[str, Any]:
        o = self.o
        return {"F": o.ft_steps, "dense_steps": o.dense_steps, "dense_lr": o.dense_lr, "nodes": o.nodes,
                "twist_lrs": o.twist_lrs, "ddp_lrs": o.ddp_lrs, "run_config": o.run_config}

    def record_plan(self, best: dict[str, float]) -> None:
        """plan.json: the setting, the fine-tune rates, and every command run into the folder."""
        f = self.out / "plan.json"
        old = json.loads(f.read_text()) if f.is_file() else {}
        command = "twist-fl tune " + " ".join(shlex.quote(a) for a in self.o.argv) if self.o.argv else ""
        before = old.get("commands") or (["twist-fl tune " + " ".join(shlex.quote(a) for a in old["argv"])]
                                         if old.get("argv") else [])
        commands = [c for c in before if c != command] + ([command] if command else [])
        write_json(f, {**self._plan_settings(), "best_lrs": best, "commands": commands})

    def _scratch(self, seed: int) -> None:
        self.job(f"scratch-base-s{seed}", self.scratch(seed))
        for name, extra in self.scratch_variants.items():
            self.job(f"scratch-{name}-s{seed}", self.scratch(seed, extra))

    @staticmethod
    def pair_name(side: str, lr: float, steps: int, seed: int) -> str:
        return f"{side}-lr{lr:g}-F{steps}-s{seed}"


# --- evaluations of finished runs, cached (the tables: finetune_table.py, tune.py) ---------


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

"""twist-fl: sweep, tune and benchmark TwIST runs; prune, evaluate, export and deploy their models.

`twist-fl <verb>` (or `python -m twist_fl <verb>`): ddp, prune, evaluate, generate, export,
heatmap, report, deploy; and sweep, sweep-summary, tune and bench, which hand their arguments to
their own modules (`python -m twist_fl.tools.<module>` stays an alias).

Every verb reads models in the core save format (a run's `model/` folder, or a pruned model).
Data settings (dataset, tokenizer, data path, sequence length) default to those the model was
trained with, as recorded in its config.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from ..baselines.ddp import DDPError
from ..core.blocks import sparsity
from ..core.config import DATASETS, DENSE_STRATEGIES, PRECISIONS, TOKENIZERS
from ..core.data import get_tokenizer
from ..core.io import WriteError, atomic_write_text, claim_output, release_claims, staged_folder, write_json
from ..core.model import GPT, WEIGHTS_FILE
from ..core.precision import precision_scope, resolve_precision
from ..core.progress import enable as enable_progress
from ..core.progress import progress
from ..core.train import evaluate
from ..deploy.local import DeploymentError
from ..evaluation.loading import (
    UsageError,
    check_tokenizer,
    data_settings,
    load_model,
    model_facts,
    parse_keeps,
    windows_for,
)
from ..evaluation.prune import (
    CALIBRATED,
    STRUCTURED,
    core_of,
    deployed_subnet_ppl,
    policy_of,
    prune_structured,
    random_blueprint,
    random_subnet_ppl,
)
from . import help as H


def _data(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    return data_settings(meta, args.dataset, args.tokenizer, args.data_path, args.seq_len)


def _model_dir(path: str) -> Path:
    """The folder holding model.safetensors: a model folder, or a run folder's model/."""
    p = Path(path)
    return p / "model" if (p / "model").is_dir() else p


def _finite_ppl(ppl: float, what: str) -> float:
    if not math.isfinite(ppl):
        raise ValueError(f"{what} gives a non-finite perplexity ({ppl}): its outputs overflow, so it has no "
                         "perplexity to report")
    return ppl


# --- verbs ---------------------------------------------------------------------------------------


CHECK = {"model": "tiny", "keep": 2, "local-steps": 5, "batch-size": 16, "seq-len": 64, "eval-tokens": 8192,
         "eval-draws": 2, "lr": 3e-3, "lr-schedule": "constant", "optimizer-state": "reset"}


def cmd_check(args: argparse.Namespace) -> int:
    """A tiny TwIST run (4 simulated nodes on the embedded plays, keep 2 of 4 blocks) that shows,
    in under a minute, that the install trains, averages and cuts subnets: exit 0 when every
    subnet and the full model end well below the unigram baseline, 1 otherwise."""
    import tempfile
    import time

    from ..core.config import RunConfig
    from ..federated.server import flower_logs_once
    from .sweep import run_job

    if args.out:
        claim_output(args.out)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="twist-fl-check-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        flat = {**RunConfig().to_flat(), **CHECK, "num-server-rounds": args.rounds, "eval-every": args.rounds,
                "out-dir": str(out.parent if args.out else out), "run-name": out.name if args.out else "run"}
        flower_logs_once()  # (and configures Flower's logger before its level is set here)
        quiet = [logging.getLogger(n) for n in ("flwr", "twist_fl")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        try:
            summary = run_job(flat, 4, "local")
        finally:
            for lg, level in zip(quiet, levels, strict=True):
                lg.setLevel(level)
    final, n, uni = summary["final"], summary["n_blocks"], summary["unigram_ppl_valid"]
    print(f"twist-fl check: tiny model ({summary['params']['full']:,} parameters), 4 nodes, {args.rounds} rounds x "
          f"5 local steps, keep 2 of {n}")
    print("validation perplexity: full " + f"{final['full']['ppl']:.1f}" + "".join(
        f" | {k.split('-')[1]}/{n} {v['mean']:.1f}" for k, v in sorted(final.items(), reverse=True) if k != "full")
        + f" (unigram baseline {uni:.1f})")
    worst = max([final["full"]["ppl"]] + [v["mean"] for k, v in final.items() if k != "full"])
    ok = worst < 0.8 * uni
    print(f"{'OK' if ok else 'NOT OK'}: the full model and every subnet {'are' if ok else 'are not all'} well below "
          f"the unigram baseline ({time.monotonic() - t0:.0f} s)")
    return 0 if ok else 1


def cmd_replot(args: argparse.Namespace) -> int:
    from .replot import replot

    root = Path(args.root)
    if not root.is_dir():
        raise UsageError(f"{args.root!r} is not a folder; replot takes a results folder such as docs/results")
    done = replot(root)
    print(f"{len(done)} figures drawn again under {root}")
    return 0


def cmd_ddp(args: argparse.Namespace) -> dict[str, Any]:
    from ..baselines.ddp import ddp_run_config, parse_overrides, run_ddp
    from ..core.config import app_defaults

    app = Path(args.app).expanduser()
    if not app.is_dir():
        raise UsageError(f"--app {args.app!r} is not a folder; it takes an app folder whose pyproject.toml holds "
                         "[tool.flwr.app.config] (default: the current folder)")
    run = ddp_run_config(parse_overrides(args.run_config), app_defaults(app))
    summary = run_ddp(run, args.nproc, threads=args.threads, backend=args.backend, timeout=args.timeout)
    print(f"DDP over {args.nproc} workers: validation perplexity {summary['final']['full']['ppl']:.3f} (full), "
          f"median step {summary['ddp']['step_s_median'] * 1e3:.1f} ms, "
          f"{summary['ddp']['grad_bytes_per_step']:,.0f} gradient bytes per worker and step -> {summary['run_folder']}")
    return summary


def cmd_prune(args: argparse.Namespace) -> dict[str, Any]:
    out = claim_output(args.out, inputs=(args.model,), force=args.force)
    model, meta = load_model(args.model)
    if model.blueprint is not None:
        raise UsageError(f"{args.model} is already a pruned subnet; prune the full model")
    d = _data(args, meta)
    check_tokenizer(model, d["tokenizer"])
    calib = windows_for(model, d, "calib", args.calib_tokens) if args.method in CALIBRATED else None
    try:
        pruned = prune_structured(model, args.keep, args.method, args.seed, calib, args.k)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.method == "prefix" and policy_of(meta) != "ordered" and not core_of(meta):
        logging.getLogger(__name__).warning(
            "prune --method prefix: %s was trained with subnet-policy %r, whose subnets are not nested, so its first "
            "%d blocks are no better than any other %d (use --method random, or a calibrated method)", args.model,
            policy_of(meta), args.keep, args.keep)
    with staged_folder(out) as tmp:
        pruned.save(tmp, extra={"run": meta.get("run", {}), "pruned_from": str(Path(args.model).resolve()),
                                "prune": {"keep": args.keep, "method": args.method, "seed": args.seed}})
    res = {"out": str(out), **model_facts(pruned, out),
           "size_ratio": (out / WEIGHTS_FILE).stat().st_size / (_model_dir(args.model) / WEIGHTS_FILE).stat().st_size}
    print(f"pruned to keep {args.keep} ({args.method}): {res['params']:,} of {res['params_full']:,} parameters, "
          f"{res['removed_of_block_params']:.1%} of block weights removed, file {res['size_ratio']:.2f}x -> {out}")
    return res


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    if args.json:
        claim_output(args.json, inputs=(args.model,), force=args.force, what="--json", kind="file")
    model, meta = load_model(args.model, allow_onnx=True)
    if args.keeps and model.blueprint is not None:
        raise UsageError("--keeps draws subnets of a full model; this model is already pruned")
    if args.keeps and not isinstance(model, GPT):
        raise UsageError("--keeps draws subnets of a twist-fl model; an exported ONNX model runs as it is")
    keeps = parse_keeps(args.keeps, model.cfg) if args.keeps else []
    d = _data(args, meta)
    windows = windows_for(model, d, args.split, args.eval_tokens)
    ppl = _finite_ppl(evaluate(model, windows, desc=f"evaluating on {args.split}")["ppl"], str(args.model))
    res: dict[str, Any] = {"model": str(args.model), "split": args.split, "tokens": int(windows[:, 1:].size),
                           **model_facts(model, _model_dir(args.model)), "ppl": ppl, "keeps": {}}
    print(f"{args.model}: {res['params']:,} parameters, perplexity {res['ppl']:.3f} on {args.split}")
    for k in keeps:
        draws = [_finite_ppl(x, f"a random subnet at keep {k} of {args.model}")
                 for x in random_subnet_ppl(model, k, args.seed, args.draws, windows, core_of(meta))]
        s = sparsity(model.cfg, random_blueprint(model.cfg, k, args.seed))
        res["keeps"][str(k)] = {"mean": float(np.mean(draws)), "std": float(np.std(draws)), "draws": draws,
                                "params": s["params_kept"], "removed_of_block_params": s["removed_of_block_params"],
                                "removed_of_all_params": s["removed_of_all_params"]}
        print(f"  keep {k}: perplexity {np.mean(draws):.3f} ± {np.std(draws):.3f} over {args.draws} random "
              f"subnets ({s['removed_of_block_params']:.1%} of block weights removed)")
        if policy_of(meta) == "ordered" or core_of(meta):  # the nested prefix (HeteroFL, FjORD, core-blocks)
            prefix = _finite_ppl(deployed_subnet_ppl(model, "ordered", k, args.seed, 1, windows)[0],
                                 f"the prefix subnet at keep {k} of {args.model}")
            res["keeps"][str(k)]["prefix"] = prefix
            print(f"  keep {k}: perplexity {prefix:.3f}, the nested prefix (the first {k} blocks of each layer)")
    if args.json:
        write_json(Path(args.json), res)
    return res


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Prints the prompt, then each piece of text as soon as its tokens decode to whole characters."""
    model, meta = load_model(args.model, allow_onnx=True)
    d = _data(args, meta)
    check_tokenizer(model, d["tokenizer"])
    tok = get_tokenizer(d["tokenizer"])
    ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt is empty")
    gen = torch.Generator().manual_seed(args.seed)
    shown = tok.decode(ids)
    sys.stdout.write(shown)
    sys.stdout.flush()
    for nxt in model.stream(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, generator=gen):
        ids.append(int(nxt[0, 0]))
        text = tok.decode(ids)
        if text.startswith(shown) and not text.endswith("\ufffd"):  # not in the middle of a character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    text = tok.decode(ids)
    sys.stdout.write(text[len(shown):] if text.startswith(shown) else "\n" + text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return {"text": text}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    if args.int8 and args.format != "onnx":
        raise UsageError("--int8 quantizes an ONNX export; use it with --format onnx")
    out = claim_output(args.out, inputs=(args.model,), force=args.force)
    model, meta = load_model(args.model)
    tokenizer = args.tokenizer or meta.get("run", {}).get("tokenizer", "bytes")
    check_tokenizer(model, tokenizer)
    with staged_folder(out) as tmp:
        res = _export(args, model, meta, tmp, tokenizer)
    if args.format == "hf":
        how = "AutoModelForCausalLM.from_pretrained(DIR" + \
            (")" if res["kind"] == "gpt2" else ", trust_remote_code=True)")
        print(f"exported {res['params']:,} parameters as {res['kind']} -> {out}; load with {how}")
    else:
        print(f"exported to ONNX{' with int8 weights' if args.int8 else ''}: {res['file_bytes']:,} bytes -> {out}; "
              f"run it with twist-fl evaluate/generate {out}")
    return res


def _export(args: argparse.Namespace, model: GPT, meta: dict[str, Any], out: Path, tokenizer: str) -> dict[str, Any]:
    if args.format == "hf":
        import shlex

        from ..export.hf import export_hf, gpt2_expressible, model_card

        source = Path(args.model).expanduser().resolve()
        command = "twist-fl " + " ".join(shlex.quote(a) for a in args.argv)
        card = model_card(model, meta, source, "gpt2" if gpt2_expressible(model) else "twist_gpt", command)
        return export_hf(model, out, tokenizer, card)
    from ..export.onnx import export_onnx

    return export_onnx(model, out, {"run": meta.get("run", {}), "exported_from": str(Path(args.model).resolve())},
                       int8=args.int8)


def cmd_heatmap(args: argparse.Namespace) -> dict[str, Any]:
    from ..core.report import heatmap_plot

    out = claim_output(args.out, inputs=tuple(args.models), force=args.force)
    jobs = []
    for path in args.models:  # every model, its keeps and its data checked before any evaluation
        model, meta = load_model(path)
        if model.blueprint is not None:
            raise UsageError(f"{path} is already a pruned subnet; the heatmap draws subnets of full models")
        jobs.append((path, model, meta, parse_keeps(args.keeps, model.cfg), _data(args, meta)))
    rows = []
    for path, model, meta, keeps, d in progress(jobs, "heatmap: models"):
        windows = windows_for(model, d, args.split, args.eval_tokens)
        run = meta.get("run", {})
        n = model.cfg.n_blocks
        trained = n if run.get("strategy") in DENSE_STRATEGIES else int(run.get("keep") or n // 2)
        policy = policy_of(meta)
        row = {"model": path, "strategy": run.get("strategy"), "policy": policy, "trained_keep": trained,
               "eval": {}, "std": {}}
        for k in keeps:  # the subnets the model's policy deploys: the prefix for 'ordered', random draws otherwise
            draws = [_finite_ppl(x, f"a deployed subnet at keep {k} of {path}")
                     for x in deployed_subnet_ppl(model, policy, k, args.seed, args.draws, windows)]
            row["eval"][str(k)], row["std"][str(k)] = float(np.mean(draws)), float(np.std(draws))
        rows.append(row)
    keys = sorted({k for r in rows for k in r["eval"]}, key=int)
    table = ["| model | trained at keep | " + " | ".join(f"eval keep {k}" for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    table += [f"| {r['strategy'] or '?'}{'' if r['policy'] == 'random' else ' (' + r['policy'] + ')'} | "
              f"{r['trained_keep']} | "
              + " | ".join(f"{r['eval'][k]:.3f} ± {r['std'][k]:.3f}" if k in r["eval"] else "" for k in keys) + " |"
              for r in rows]
    with staged_folder(out) as tmp:
        heatmap_plot(rows, tmp / "heatmap.png")
        atomic_write_text(tmp / "heatmap.md", "![perplexity of models trained at one keep, evaluated at every keep]"
                          f"(heatmap.png)\n\nRandom subnets, mean ± std over {args.draws} draws, {args.split} "
                          "split.\n\n" + "\n".join(table) + "\n")
        write_json(tmp / "heatmap.json", rows)
    print("\n".join(table))
    return {"rows": rows}


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from ..evaluation.compare import ReportOptions, write_report

    claim_output(args.out, inputs=(*args.twist, *args.dense), force=args.force)
    for flag, paths in (("--twist", args.twist), ("--dense", args.dense)):
        seen: dict[Path, str] = {}
        for path in paths:
            key = _model_dir(path).resolve()
            if key in seen:
                raise UsageError(f"{flag} names the same model twice ({seen[key]!r} and {path!r}); each seed is its "
                                 "own run: pass one run folder per seed")
            seen[key] = path
    if args.keeps:
        first, _ = load_model(args.twist[0])
        parse_keeps(args.keeps, first.cfg)  # checked before any evaluation
    res = write_report(ReportOptions(
        twist=args.twist, dense=args.dense, keeps=args.keeps, draws=args.draws, k=args.k, seed=args.seed,
        split=args.split, eval_tokens=args.eval_tokens, calib_tokens=args.calib_tokens, out=args.out,
        data={"dataset": args.dataset, "tokenizer": args.tokenizer, "data_path": args.data_path,
              "seq_len": args.seq_len}, argv=list(args.argv)))
    print((Path(args.out) / "REPORT.md").read_text())
    return res


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what}={text!r} must be a comma list of numbers") from None


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from ..deploy.local import deploy_local, parse_run_config

    return deploy_local(Path(args.dir), Path(args.app), args.nodes,
                        [m.strip() for m in args.modes.split(",") if m.strip()] or None,
                        _floats(args.capacities, "--capacities") or None, parse_run_config(args.run_config),
                        secure=not args.insecure, serve=args.serve, timeout=args.timeout)


def cmd_deploy_certs(args: argparse.Namespace) -> None:
    from ..deploy.certs import make_certificates

    paths = make_certificates(Path(args.out), args.host, args.days, force=args.force)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


def cmd_deploy_node_key(args: argparse.Namespace) -> None:
    from ..deploy.certs import make_node_key

    key, pub = make_node_key(Path(args.out), force=args.force)
    print(json.dumps({"private": str(key), "public": str(pub)}, indent=2))


# --- parser ----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2 (argparse prints its usage first)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    """An integer >= 1 (draws, tokens, steps, days)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: 1 or more")
    return value


def _upto(limit: int, what: str):
    """An argparse type: an integer in 1..limit (a size that bounds the work a command does)."""
    def parse(text: str) -> int:
        value = _count(text)
        if value > limit:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: 1..{limit:,} {what}")
        return value
    return parse


MAX_DRAWS = 100  # random subnets per size: beyond this the mean moves by far less than its own spread
MAX_NEW_TOKENS = 100_000


def _top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: 0 (no limit) or more")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a finite number >= 0 (0 = greedy)")
    return value


def _host(text: str) -> str:
    from ..deploy.certs import check_host

    try:
        return check_host(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"overwrite {what} if it exists (never the input)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="forward passes: fp32, or bf16 under autocast; auto: bf16 where the CPU has fast bf16")
    g = p.add_argument_group("data (default: what the model was trained with)")
    g.add_argument("--dataset", choices=DATASETS, help="the corpus to read (default: the model's)")
    g.add_argument("--tokenizer", choices=TOKENIZERS, help="how text becomes ids (default: the model's)")
    g.add_argument("--data-path", help="a folder for wikitext-* (wiki.*.raw) or text (train/valid/test.txt)")
    g.add_argument("--seq-len", type=_count, help="tokens per window, up to the model's block size")


# Verbs whose arguments go, unparsed here, to a module of their own: (module, one-line help).
DELEGATED = {
    "sweep": ("sweep", "Hydra sweeps of the federated run: `twist-fl sweep --multirun run.keep=2,4` "
              "(Hydra's own options and overrides)"),
    "sweep-summary": ("sweep_summary", "a table and a plot of a finished sweep folder"),
    "tune": ("tune", "learning-rate grids over seeds (run, table) and the fine-tune comparison (finetune, "
             "finetune-table)"),
    "bench": ("bench", "benchmarks: bytes, step, memory, overhead, nodes, ddp, export, inference, all"),
}


def delegate(verb: str, argv: list[str]) -> int:
    """Run a delegated verb's module with `argv` (everything after the verb)."""
    import importlib

    module = importlib.import_module(f"{__package__}.{DELEGATED[verb][0]}")
    if verb == "sweep":  # Hydra reads sys.argv itself, and sets up logging for its job
        argv = module.normalize_overrides(argv)
        try:
            module.precheck(argv)  # where it writes, before Hydra makes anything
        except (ValueError, OSError) as e:
            print(f"twist-fl sweep: error: {e}", file=sys.stderr)
            return 2
        saved, root = sys.argv, logging.getLogger()
        handlers, level = root.handlers[:], root.level
        sys.argv = ["twist-fl sweep", *argv]
        try:
            module.main()
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        finally:
            sys.argv = saved
            for h in root.handlers[:]:  # Hydra's handlers write to the streams of the job that ended
                if h not in handlers:
                    root.removeHandler(h)
            for h in handlers:  # and it replaced the caller's
                if h not in root.handlers:
                    root.addHandler(h)
            root.setLevel(level)
        return 0
    return module.main(argv)


def build_parser() -> argparse.ArgumentParser:
    ap = H.parser("twist-fl", __doc__, "twist-fl", cls=_Parser)
    H.add_version(ap)
    sub = ap.add_subparsers(dest="verb", required=True, metavar="<verb>")
    for verb, (_, text) in DELEGATED.items():  # listed in --help; main() hands them over before parsing
        sub.add_parser(verb, help=text, add_help=False)

    p = H.sub(sub, "check", "check", "a tiny TwIST run on the embedded corpus, in under a minute: what an install "
              "should print (the README's first minute)")
    p.add_argument("--rounds", type=_upto(50, "rounds"), default=15, help="federated rounds of 5 local steps")
    p.add_argument("--out", help="keep the run folder here (a new folder); default: a temporary one, removed")
    p.set_defaults(fn=cmd_check)

    p = H.sub(sub, "ddp", "ddp", "train the dense model data-parallel on torch.distributed (the DDP baseline)")
    p.add_argument("--nproc", type=_count, default=4, help="worker processes; worker i trains on partition i of nproc")
    p.add_argument("--run-config", default="", help="'key=value ...' as for flwr run --run-config")
    p.add_argument("--app", default=".", help="read defaults from this app's [tool.flwr.app.config], if it has one")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker; 0 = cores / nproc")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl on GPUs, else gloo")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds a collective may wait for a worker")
    p.set_defaults(fn=cmd_ddp)

    p = H.sub(sub, "prune", "prune", "cut a smaller dense model out of a trained one")
    p.add_argument("model", help="a model folder or a run folder")
    p.add_argument("--keep", type=int, required=True, help="heads and FFN blocks kept per non-shared layer")
    p.add_argument("--method", choices=STRUCTURED, default="random", help="which blocks to keep: random (TwIST's "
                   "zero-cost cut), prefix (an ordered or core-blocks run's nested subnet), or a pruning baseline")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draw (random, best-of-k)")
    p.add_argument("--k", type=_count, default=8, help="draws for best-of-k")
    p.add_argument("--calib-tokens", type=_count, default=16384, help="calibration tokens (calibrated methods)")
    p.add_argument("--out", required=True, help="a new folder for the pruned model (outside the input)")
    _force(p, "--out")
    _data_args(p)
    p.set_defaults(fn=cmd_prune)

    p = H.sub(sub, "evaluate", "evaluate", "perplexity of a model, and of random subnets at several sizes")
    p.add_argument("model", help="a model folder or a run folder (full or pruned), or an exported ONNX folder")
    p.add_argument("--split", choices=("valid", "test"), default="valid", help="the split to evaluate on")
    p.add_argument("--keeps", default="", help="comma list of subnet sizes to draw (full models)")
    p.add_argument("--draws", type=_upto(MAX_DRAWS, "draws"), default=5, help="random subnets per size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subnets")
    p.add_argument("--eval-tokens", type=_count, help="tokens to evaluate (default: the whole split)")
    p.add_argument("--json", help="write the results here (a new file)")
    _force(p, "--json")
    _data_args(p)
    p.set_defaults(fn=cmd_evaluate)

    p = H.sub(sub, "generate", "generate", "text from a full or pruned model, printed as it comes")
    p.add_argument("model", help="a model folder or a run folder (full or pruned), or an exported ONNX folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=_upto(MAX_NEW_TOKENS, "tokens"), default=200, help="tokens to add")
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_top_k, help="sample among the k likeliest tokens (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    _data_args(p)
    p.set_defaults(fn=cmd_generate)

    p = H.sub(sub, "export", "export", "a model as a Hugging Face transformers folder (with a model card), or as "
              "ONNX (fp32 or int8)")
    p.add_argument("model", help="a model folder or a run folder (full or pruned)")
    p.add_argument("--format", choices=("hf", "onnx"), required=True, help="hf: transformers' from_pretrained; "
                   "onnx: onnxruntime")
    p.add_argument("--int8", action="store_true", help="onnx: int8 weights (onnxruntime's dynamic quantization)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, help="default: the one the model was trained with")
    p.add_argument("--out", required=True, help="a new folder for the exported model")
    _force(p, "--out")
    p.set_defaults(fn=cmd_export)

    p = H.sub(sub, "heatmap", "heatmap", "models trained at keep X evaluated at keep Y")
    p.add_argument("models", nargs="+", help="run folders (or models) of full models, e.g. one per trained keep")
    p.add_argument("--keeps", required=True, help="comma list of the sizes to evaluate each model at")
    p.add_argument("--draws", type=_upto(MAX_DRAWS, "draws"), default=3, help="random subnets per size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subnets")
    p.add_argument("--split", choices=("valid", "test"), default="valid", help="the split to evaluate on")
    p.add_argument("--eval-tokens", type=_count, default=16384, help="tokens to evaluate")
    p.add_argument("--out", required=True, help="a new folder for heatmap.png/.md/.json")
    _force(p, "--out")
    _data_args(p)
    p.set_defaults(fn=cmd_heatmap)

    p = H.sub(sub, "report", "report", "TwIST vs post-training pruning baselines, as markdown and plots")
    p.add_argument("--twist", required=True, nargs="+", help="run folders (or models) trained with strategy twist, "
                   "one per seed")
    p.add_argument("--dense", required=True, nargs="+", help="run folders trained dense (strategy ddp or fedavg), "
                   "paired with --twist")
    p.add_argument("--keeps", default="", help="default: every size from 1 to N-1")
    p.add_argument("--draws", type=_upto(MAX_DRAWS, "draws"), default=5, help="random subnets per size")
    p.add_argument("--k", type=_count, default=8, help="draws for best-of-k")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subnets and draws")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="the split to evaluate on")
    p.add_argument("--eval-tokens", type=_count, default=32768, help="tokens to evaluate")
    p.add_argument("--calib-tokens", type=_count, default=16384, help="calibration tokens (calibrated methods)")
    p.add_argument("--out", required=True, help="a new folder for REPORT.md, results.json, comparison.png")
    _force(p, "--out")
    _data_args(p)
    p.set_defaults(fn=cmd_report)

    p = H.sub(sub, "replot", "replot", "draw a results folder's figures again from the JSON beside them (no training)")
    p.add_argument("root", help="a results folder (e.g. docs/results): every results.json, heatmap.json and "
                   "sweep summary.json under it")
    p.set_defaults(fn=cmd_replot)

    p = H.sub(sub, "deploy", "deploy", "run on real SuperLink/SuperNode processes; certificates and node keys")
    dsub = p.add_subparsers(dest="deploy_verb", required=True, metavar="<what>")
    q = H.sub(dsub, "local", "deploy local", "a SuperLink and N SuperNodes on localhost, one flwr run, then stop")
    q.add_argument("--dir", default="deploy", help="certificates, keys, FLWR_HOME, logs and outputs go here")
    q.add_argument("--nodes", type=int, default=2, help="SuperNodes to start")
    q.add_argument("--modes", default="", help="comma list of twist-mode per node (true|masked), cycled")
    q.add_argument("--capacities", default="", help="comma list of twist-capacity per node in (0, 1], cycled")
    q.add_argument("--app", default=".", help="the twist-fl app folder (holds pyproject.toml)")
    q.add_argument("--run-config", default="", help="'key=value ...' as for flwr run --run-config")
    q.add_argument("--insecure", action="store_true", help="no TLS and no node authentication (debugging only)")
    q.add_argument("--serve", action="store_true", help="start, print how to run, wait for Ctrl-C")
    q.add_argument("--timeout", type=float, default=86400.0, help="seconds before the run is stopped")
    q.set_defaults(fn=cmd_deploy_local)
    q = H.sub(dsub, "certs", "deploy certs", "a CA and a SuperLink server certificate for the given hosts")
    q.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    q.add_argument("--host", action="append", default=[], type=_host, help="IP or DNS name nodes use (repeat)")
    q.add_argument("--days", type=_count, default=365, help="days the certificates are valid")
    _force(q, "the four files")
    q.set_defaults(fn=cmd_deploy_certs)
    q = H.sub(dsub, "node-key", "deploy node-key", "an EC key pair for SuperNode authentication")
    q.add_argument("--out", required=True, help="private key path (not .pub); the public key goes to <out>.pub")
    _force(q, "both key files")
    q.set_defaults(fn=cmd_deploy_node_key)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    enable_progress()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        try:
            return delegate(argv[0], argv[1:])
        except SystemExit as e:  # argparse in the module: a usage error (2) or --help (0)
            return e.code if isinstance(e.code, int) else 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (2, its line already printed) or --help (0)
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    try:
        precision = resolve_precision(args.precision, torch.device("cpu"), "--precision") \
            if hasattr(args, "precision") else "fp32"
        with precision_scope(precision):
            code = args.fn(args)  # the deploy verbs return an exit code; the others return their results
        return code if isinstance(code, int) else 0
    except (UsageError, ValueError, WriteError) as e:
        print(f"twist-fl {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except (DeploymentError, DDPError) as e:
        print(f"twist-fl {args.verb}: {e}", file=sys.stderr)
        return 1
    finally:
        release_claims()


if __name__ == "__main__":
    sys.exit(main())

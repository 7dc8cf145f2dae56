"""Hydra CLI for sweeps and ablations over the same keys as `[tool.flwr.app.config]`.

    twist-fl sweep run.keep=2 num_supernodes=4
    twist-fl sweep --multirun run.local_steps=1,5,15,50 total_local_steps=900
    twist-fl sweep --multirun run.alpha=0,0.5,1
    twist-fl sweep --multirun run.strategy=twist,fedavg,ddp run.lr=1e-3,1.5e-3,2e-3,3e-3,6e-3

Each job runs the app's own ServerApp and ClientApp code (`twist_fl.federated.server`, `twist_fl.federated.client`)
on an in-process Grid (`engine: local`, the default: no Ray, deterministic) or on Flower's Ray
simulation engine (`engine: ray`); a job with `run.strategy=ddp` runs `twist-fl ddp`'s code
instead, with `num_supernodes` workers. Outputs go to the job's Hydra folder (`run/` inside it).
`total_local_steps` keeps the total number of local batches fixed across a sweep of
`run.local_steps` (rounds = total_local_steps / local_steps, evaluated at the end).
Summarize a sweep with `twist-fl sweep-summary <multirun folder>`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..core.config import RunConfig

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def resolve(cfg: DictConfig, job_dir: Path) -> dict[str, Any]:
    flat = {k.replace("_", "-"): v for k, v in OmegaConf.to_container(cfg.run, resolve=True).items()}
    if cfg.get("total_local_steps"):
        total, steps = int(cfg.total_local_steps), int(flat["local-steps"])
        if total % steps:
            raise ValueError(f"total_local_steps={total} is not a multiple of run.local_steps={steps}")
        flat["num-server-rounds"] = total // steps
        flat["eval-every"] = total // steps
    flat["out-dir"] = str(job_dir)
    flat["run-name"] = flat.get("run-name") or "run"
    run = RunConfig.from_flat(flat)  # fail before anything starts
    if isinstance(cfg.num_supernodes, bool) or not isinstance(cfg.num_supernodes, int) or cfg.num_supernodes < 1:
        raise ValueError(f"num_supernodes={cfg.num_supernodes!r} must be a whole number >= 1 (the simulated nodes)")
    run.check_nodes(int(cfg.num_supernodes))
    return flat


HYDRA_FLAGS_WITHOUT_RUN = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")
INPUT_KEYS = ("run.init_from", "run.data_path", "run.distill_from", "run.resume_from")


def normalize_overrides(argv: list[str]) -> list[str]:
    """The sweep's overrides with dashed keys (`run.local-steps=1`, `num-supernodes=4`, as every
    other command spells them) rewritten to the config's snake_case; Hydra's own flags and
    `hydra.*` overrides are left as they are."""
    out = []
    for a in argv:
        key, eq, value = a.partition("=")
        bare = key.lstrip("+~")
        if eq and not a.startswith("-") and not bare.startswith("hydra."):
            a = key[:len(key) - len(bare)] + bare.replace("-", "_") + eq + value
        out.append(a)
    return out


def precheck(argv: list[str]) -> None:
    """Check where a sweep will write, before Hydra makes or writes anything: its job folder
    (`hydra.run.dir`, or `hydra.sweep.dir` with --multirun) may not be, be inside or contain an
    input (init-from, data-path, a teacher's folder), nor lie inside a model or run folder; an
    existing one must be empty (or hold the run that run.resume_from continues); its nearest
    existing folder must be writable. ValueError naming what is wrong."""
    import os

    from ..core.io import check_not_input, is_result_folder

    if any(a in HYDRA_FLAGS_WITHOUT_RUN for a in argv):
        return
    values: dict[str, list[str]] = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if eq:
            values.setdefault(key.lstrip("+~"), []).extend(v for v in value.split(",") if v)
    multi = "--multirun" in argv or "-m" in argv
    key = "hydra.sweep.dir" if multi else "hydra.run.dir"
    if key not in values:
        return  # the default: a new folder named by the time
    out = Path(values[key][0]).expanduser()
    resumes = [Path(r).expanduser().resolve() for r in values.get("run.resume_from", [])]
    inputs = [v for k in INPUT_KEYS if k != "run.resume_from" for v in values.get(k, [])
              if k != "run.distill_from" or v not in ("init", "global")]
    check_not_input(out, tuple(inputs), key)
    existing = next(d for d in (out, *out.parents) if d.exists())  # "." or "/" at the latest
    for d in (out, *out.parents):
        if d.exists() and is_result_folder(d.resolve()):
            raise ValueError(f"{key}={str(out)!r} is inside the model or run folder {str(d)!r}; a trained result is "
                             "never a place for new runs: choose another folder")
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{key}={str(out)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{key}={str(out)!r}: {str(existing)!r} is not writable (a read-only file system, or no "
                         "permission)")
    if out.is_dir() and any(out.iterdir()) and not any(r.parent == out.resolve() for r in resumes):
        raise ValueError(f"{key}={str(out)!r} already exists and is not empty; choose a new folder (or continue its "
                         f"run with run.resume_from={str(out / 'run')!r})")
    try:
        out.mkdir(parents=True, exist_ok=True)  # as Hydra would: a folder that cannot be made is refused here
    except OSError as e:
        raise ValueError(f"{key}={str(out)!r} cannot be made: {e.strerror or e}") from None


def clear_interrupted(run_dir: Path, who: str) -> None:
    """Remove the folder an interrupted job left (no summary.json), so that it trains again;
    ValueError, naming it, when another process holds its lock (it is training it now)."""
    if run_dir.exists():
        import shutil

        from ..core.runs import RunFolder

        RunFolder(run_dir).lock().release()
        log.warning("%s: %s was interrupted; training it again", who, run_dir)
        shutil.rmtree(run_dir)


def run_job(flat: dict[str, Any], num_supernodes: int, engine: str,
            capacities: list[float] | None = None, state_dir: Path | None = None) -> dict[str, Any]:
    """Run one job; `capacities` (local engine only) gives node i the capacity
    `capacities[i % len(capacities)]` (node config `twist-capacity`; DDP workers have none);
    `state_dir` (local engine only) gives node i the folder `state_dir/i` for its optimizer
    moments (node config `twist-state-dir`), so that a resumed job continues them as the
    uninterrupted one would (without it, a resumed job's nodes start fresh moments)."""
    if (capacities or state_dir) and engine != "local":
        raise ValueError(f"node capacities and state folders need engine 'local', not {engine!r}")
    if flat["strategy"] == "ddp":
        from ..baselines.ddp import ddp_from_flat, run_ddp

        return run_ddp(ddp_from_flat(flat), num_supernodes)
    from ..federated.client import make_client_app
    from ..federated.server import make_server_app, route_logs_to_flower, run_server

    if engine == "local":
        from ..federated.localgrid import LocalGrid

        node_configs = [{**({"twist-capacity": float(capacities[i % len(capacities)])} if capacities else {}),
                         **({"twist-state-dir": str(Path(state_dir) / str(i))} if state_dir else {})}
                        for i in range(num_supernodes)] if capacities or state_dir else None
        return run_server(LocalGrid(make_client_app(flat), num_supernodes, node_configs=node_configs),
                          RunConfig.from_flat(flat))
    if engine == "ray":
        import json

        from flwr.simulation import run_simulation

        route_logs_to_flower()
        run_simulation(server_app=make_server_app(flat), client_app=make_client_app(flat),
                       num_supernodes=num_supernodes,
                       backend_config={"client_resources": {"num_cpus": 2, "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR"}})
        summary = Path(flat["out-dir"]) / flat["run-name"] / "summary.json"
        if not summary.is_file():
            raise RuntimeError(f"the simulation ended without writing {summary}; see the log above")
        return json.loads(summary.read_text())
    raise ValueError(f"engine={engine!r} is not allowed; allowed: ['local', 'ray']")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    from ..federated.server import flower_logs_once

    flower_logs_once()  # Hydra's root handler would print each of Flower's lines a second time
    try:
        flat = resolve(cfg, job_dir)
        summary = run_job(flat, int(cfg.num_supernodes), str(cfg.engine))
    except (ValueError, OSError) as e:  # a refused value, resume or write: one line, not Hydra's traceback
        import sys

        print(f"twist-fl sweep: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    ppl = summary["final"]["full"]["ppl"] if summary.get("final") else float("nan")
    log.info("job %s: final full-model perplexity %.3f", job_dir, ppl)
    return ppl


if __name__ == "__main__":
    main()

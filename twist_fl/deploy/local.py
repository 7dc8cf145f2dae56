"""Deployment on real Flower processes: a SuperLink, N SuperNodes and `flwr run`, secure by default.

* `LocalDeployment` runs everything on localhost: free loopback ports, its own FLWR_HOME, one
  folder of logs, a SQLite SuperLink state, every process in its own process group, and `stop()`
  that ends them all (SIGTERM, then SIGKILL after a grace period).
* `SimulationSuperLink` is the local simulation SuperLink that `flwr run` would otherwise start
  detached and leave running: started here, owned by PID, stopped when done.
* `deploy_local` is one command over `LocalDeployment`; `twist-fl deploy local|certs|node-key`
  (in `tools/cli.py`) wraps it and `certs.py`.

Insecure mode (no TLS, no node authentication) exists for debugging only and must be asked for;
it logs a warning. The SuperLink never installs dependencies at run time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.io import atomic_write_text
from .certs import make_certificates, make_node_key
from .procs import Proc, executable, flwr_env, free_port, killpg, port_open, tree_pids

log = logging.getLogger(__name__)

CONNECTION = "twist-local"  # the name of the SuperLink connection written to FLWR_HOME/config.toml


def config_string(values: dict[str, Any]) -> str:
    """`k=v` pairs the way `--node-config` and `--run-config` parse them (TOML values)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            s = "true" if v else "false"
        elif isinstance(v, (int, float)):
            s = repr(v)
        elif isinstance(v, str):
            if '"' in v or any(c.isspace() for c in v):
                if "'" in v or any(c.isspace() for c in v if c != " "):
                    raise ValueError(f"config value {k}={v!r} cannot be passed on a command line")
                s = f"'{v}'"
            else:
                s = json.dumps(v)
        else:
            raise ValueError(f"config value {k}={v!r} must be a bool, int, float or str")
        parts.append(f"{k}={s}")
    return " ".join(parts)




class DeploymentError(RuntimeError):
    pass


@dataclass
class RunResult:
    """What `flwr run --stream` printed and how the run ended on the SuperLink."""

    exit_code: int  # of the `flwr run` command (0 even when the ServerApp failed)
    output: str
    log_path: Path
    run_id: str = ""
    status: str = "unknown"  # e.g. finished:completed, finished:failed, running
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.status == "finished:completed"


class LocalDeployment:
    """A SuperLink and SuperNodes on localhost, as real processes, under `root`:

    root/certs/ (ca.crt, server.pem, server.key), root/keys/ (node-<i>, node-<i>.pub),
    root/flwr-home/ (FLWR_HOME, with the connection `twist-local` in config.toml),
    root/logs/ (superlink.log, supernode-<name>.log, run-<n>.log), root/superlink.db.

    `secure=True` (the default) means TLS and SuperNode authentication with registered keys;
    `secure=False` runs without either and warns. Use as a context manager, or call `stop()`.
    """

    def __init__(self, root: Path, secure: bool = True, env: dict[str, str] | None = None) -> None:
        self.root = Path(root).resolve()
        self.secure = secure
        self.logs = self.root / "logs"
        self.home = self.root / "flwr-home"
        for d in (self.logs, self.home):
            d.mkdir(parents=True, exist_ok=True)
        self.env = flwr_env(self.home, env)
        self.port = 0
        self.superlink: Proc | None = None
        self.nodes: dict[str, Proc] = {}
        self.certs: dict[str, Path] = {}
        self._runs = 0
        if not secure:
            log.warning("INSECURE deployment: no TLS and no SuperNode authentication. Anyone who can reach the "
                        "SuperLink port can join as a node or read the model. Use it only for debugging.")

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- SuperLink ----------------------------------------------------------------------------

    def start_superlink(self, timeout: float = 60.0) -> Proc:
        self.port = free_port()
        cmd = [executable("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--database", str(self.root / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.secure:
            if not self.certs:
                self.certs = make_certificates(self.root / "certs")
            cmd += ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                    "--ssl-keyfile", str(self.certs["key"]), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        self.superlink = self._spawn("superlink", cmd)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if not self.superlink.alive():
                raise DeploymentError(f"the SuperLink exited with code {self.superlink.popen.returncode}; log "
                                      f"{self.superlink.log_path}:\n{self.superlink.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not open port {self.port} within {timeout:.0f} s; "
                                      f"log {self.superlink.log_path}")
            time.sleep(0.2)
        self._write_connection()
        log.info("SuperLink on 127.0.0.1:%d (%s), pid %d", self.port, "TLS, node auth" if self.secure else "insecure",
                 self.superlink.pid)
        return self.superlink

    def _write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.port}"']
        lines += [f'root-certificates = "{self.certs["ca"]}"'] if self.secure else ["insecure = true"]
        atomic_write_text(self.home / "config.toml", "\n".join(lines) + "\n")

    # -- SuperNodes ---------------------------------------------------------------------------

    def node_key(self, name: str, register: bool = True) -> Path:
        """A key pair for node `name` under root/keys; registered with the SuperLink if asked."""
        (self.root / "keys").mkdir(parents=True, exist_ok=True)
        key, pub = make_node_key(self.root / "keys" / name)
        if register:
            self.flwr(["supernode", "register", str(pub), CONNECTION], check=True)
        return key

    def start_node(self, name: str, node_config: dict[str, Any], *, key: Path | None | str = "register",
                   root_certificates: Path | None = None, env: dict[str, str] | None = None) -> Proc:
        """Start SuperNode `name` with `node_config` (partition-id, num-partitions, twist-mode, ...).
        `key="register"` makes and registers a key; a Path uses that key as is (registered or
        not); None starts without one. `root_certificates` replaces the deployment's CA."""
        if self.superlink is None:
            raise DeploymentError("start the SuperLink first")
        cmd = [executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
               "--node-config", config_string(node_config), "--max-retries", "20", "--max-wait-time", "120"]
        if self.secure:
            cmd += ["--root-certificates", str(root_certificates or self.certs["ca"])]
            if key == "register":
                key = self.node_key(name)
            if key is not None:
                cmd += ["--auth-supernode-private-key", str(key)]
        else:
            cmd += ["--insecure"]
        proc = self._spawn(f"supernode-{name}", cmd, env)
        self.nodes[name] = proc
        return proc

    def start_nodes(self, n: int, modes: list[str] | None = None,
                    capacities: list[float] | None = None) -> list[Proc]:
        """N SuperNodes with partitions 0..n-1, an optional twist-mode and twist-capacity each,
        the machine's cores shared out between them (num-threads), and each a folder for its
        optimizer moments (twist-state-dir, node-state/<i>), so a resumed run finds them."""
        threads = max(1, (os.cpu_count() or 1) // n)
        procs = []
        for i in range(n):
            nc: dict[str, Any] = {"partition-id": i, "num-partitions": n, "num-threads": threads,
                                  "twist-state-dir": str(self.root / "node-state" / str(i))}
            if modes:
                nc["twist-mode"] = modes[i % len(modes)]
            if capacities:
                nc["twist-capacity"] = float(capacities[i % len(capacities)])
            procs.append(self.start_node(str(i), nc))
        return procs

    def wait_online(self, n: int, timeout: float = 90.0) -> None:
        """Wait until `flwr supernode ls` shows at least `n` online nodes."""
        deadline = time.monotonic() + timeout
        while True:
            online = self.online_nodes()
            if len(online) >= n:
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"{len(online)} of {n} SuperNodes online after {timeout:.0f} s; logs in "
                                      f"{self.logs}")
            time.sleep(1.0)

    def online_nodes(self) -> list[dict[str, Any]]:
        res = self.flwr(["supernode", "ls", CONNECTION, "--format", "json"], check=False)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError:
            return []
        nodes = data.get("nodes", []) if isinstance(data, dict) else []
        return [n for n in nodes if str(n.get("status", "")).lower() == "online"]

    # -- runs ---------------------------------------------------------------------------------

    def flwr(self, args: list[str], check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        res = subprocess.run([executable("flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise DeploymentError(f"flwr {' '.join(args)} failed ({res.returncode}): {res.stdout[-2000:]}"
                                  f"{res.stderr[-2000:]}")
        return res

    def run(self, app: Path, run_config: dict[str, Any] | None = None, timeout: float = 3600.0,
            echo: bool = False, on_line: Callable[[str], bool] | None = None) -> RunResult:
        """`flwr run <app> twist-local --stream`, its output also in logs/run-<n>.log (the
        ServerApp's log lines are streamed into it), and the run's final status from the
        SuperLink. `on_line(line)` sees each line; when it returns True, streaming stops (the run
        itself goes on)."""
        self._runs += 1
        path = self.logs / f"run-{self._runs}.log"
        cmd = [executable("flwr"), "run", str(Path(app).resolve()), CONNECTION, "--stream"]
        if run_config:
            cmd += ["--run-config", config_string(run_config)]
        lines: list[str] = []
        expired = threading.Event()
        with path.open("w") as f:
            p = subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)

            def expire() -> None:
                expired.set()
                killpg(p.pid, signal.SIGKILL)

            watchdog = threading.Timer(timeout, expire)
            watchdog.start()
            try:
                assert p.stdout is not None
                for line in p.stdout:
                    f.write(line)
                    f.flush()
                    lines.append(line)
                    if echo:
                        sys.stderr.write(line)
                    if on_line is not None and on_line(line):
                        killpg(p.pid, signal.SIGTERM)  # stop streaming only
                        break
                code = p.wait(timeout=30)
            finally:
                watchdog.cancel()
                if p.poll() is None:
                    killpg(p.pid, signal.SIGKILL)
                    p.wait()
        if expired.is_set():
            raise DeploymentError(f"flwr run did not finish within {timeout:.0f} s; log {path}")
        out = "".join(lines)
        res = RunResult(code, out, path)
        if "Successfully started run " in out:
            res.run_id = out.split("Successfully started run ", 1)[1].split()[0]
            res.status, res.details = self.run_status(res.run_id)
        return res

    def run_status(self, run_id: str) -> tuple[str, str]:
        """(status, details) of a run, e.g. ("finished:failed", "ServerApp failed with exception: ...")."""
        r = self.flwr(["ls", CONNECTION, "--run-id", run_id, "--format", "json"], check=False)
        try:
            run = json.loads(r.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError):
            return "unknown", (r.stdout + r.stderr)[-500:]
        return str(run.get("status", "unknown")), str(run.get("status-details", ""))

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes (one per active run), started by the SuperLink's SuperExec."""
        return self.superlink.children("flwr-serverapp") if self.superlink else []

    def pids(self) -> list[int]:
        """Every live process this deployment started, with their children."""
        procs = [p for p in [self.superlink, *self.nodes.values()] if p is not None]
        return sorted({pid for p in procs for pid in tree_pids(p.pid)})

    # -- stop ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every node, then the SuperLink; nothing this deployment started is left."""
        for proc in list(self.nodes.values()):
            proc.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        return Proc.spawn(name, cmd, {**self.env, **(env or {})}, self.logs / f"{name}.log", cwd=self.root)


class SimulationSuperLink:
    """The local simulation SuperLink of `flwr run` (`:local:` connection), started by us.

    `flwr run` starts one itself when none answers on FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, detached
    and never stopped. Starting it here first, with the same command line (flwr 1.41's
    `flwr.cli.local_superlink`), makes it ours: `flwr run` with the same `env` uses it, and
    `stop()` ends it and its children by PID. `env` must come from `procs.flwr_env` (its own
    FLWR_HOME and ports)."""

    def __init__(self, env: dict[str, str], cwd: Path | None = None) -> None:
        self.env, self.cwd = env, cwd
        self.home = Path(env["FLWR_HOME"])
        self.port = int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
        self.proc: Proc | None = None

    def start(self, timeout: float = 60.0) -> Proc:
        state = self.home / "local-superlink"
        state.mkdir(parents=True, exist_ok=True)
        cmd = [executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--control-api-address", f"127.0.0.1:{self.env['FLWR_LOCAL_CONTROL_API_PORT']}",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-file", str(state / "superlink.log"),
               "--database", str(state / "state.db")]
        self.proc = Proc.spawn("simulation-superlink", cmd, self.env, state / "process.log", cwd=self.cwd)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.proc.alive():
                raise DeploymentError(f"the simulation SuperLink exited with code {self.proc.popen.returncode}; "
                                      f"log {self.proc.log_path}:\n{self.proc.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise DeploymentError(f"the simulation SuperLink did not open port {self.port} within {timeout:.0f} s")
            time.sleep(0.2)
        return self.proc

    def healthy(self) -> bool:
        """What `flwr run` asks before it would start its own: does /health answer?"""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=0.5) as r:
                return 200 <= r.status < 300
        except OSError:
            return False

    def pids(self) -> list[int]:
        return tree_pids(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> SimulationSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --- one command -------------------------------------------------------------------------------

def parse_run_config(text: str) -> dict[str, Any]:
    """`k=v` pairs as `flwr run --run-config` takes them (`core.config.parse_run_config`)."""
    from ..core.config import parse_run_config as parse

    return parse(text)


def check_app(app: Path) -> Path:
    app = Path(app).expanduser().resolve()
    pyproject = app / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise ValueError(f"--app {str(app)!r} is not a Flower app folder (no pyproject.toml with [tool.flwr.app]); "
                         f"run from the twist-fl checkout or pass --app <checkout>")
    return app


def deploy_local(root: Path, app: Path, nodes: int = 2, modes: list[str] | None = None,
                 capacities: list[float] | None = None, run_config: dict[str, Any] | None = None,
                 secure: bool = True, serve: bool = False, timeout: float = 86400.0) -> int:
    """Start a SuperLink and `nodes` SuperNodes on localhost under `root`, run the app once with
    `flwr run` (or, with `serve`, wait for Ctrl-C so that runs can be started by hand), then stop
    everything. Returns 0 when the run completed, else non-zero."""
    if nodes < 1:
        raise ValueError(f"--nodes={nodes}; allowed: 1 or more")
    for m in modes or []:
        if m not in ("true", "masked"):
            raise ValueError(f"--modes entry {m!r} is not allowed; allowed: ['true', 'masked']")
    for c in capacities or []:
        if not 0 < c <= 1:
            raise ValueError(f"--capacities entry {c} is not allowed; allowed: numbers in (0, 1]")
    app = check_app(app)
    from ..core.io import claim_output, is_result_folder

    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f"--dir {str(root)!r} is a file; it takes a folder for the deployment (a new one)")
    if any(d.exists() and is_result_folder(d) for d in (root, *root.parents)):
        raise ValueError(f"--dir {str(root)!r} is inside a model or run folder; choose another folder")
    claim_output(root, inputs=(app,), force=True, what="--dir")  # one deployment per folder, for this command
    if (root / "superlink.db").exists():
        raise ValueError(f"--dir {str(root)!r} already holds a deployment (superlink.db); choose another --dir or "
                         f"remove it")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"--timeout={timeout!r} is not allowed; allowed: a positive number of seconds")
    rc = {"out-dir": str(root / "outputs"), "min-nodes": nodes, **(run_config or {})}
    from ..core.config import RunConfig, app_defaults

    RunConfig.from_flat({**app_defaults(app), **rc})  # the run config, checked before any process starts

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with LocalDeployment(root, secure=secure) as d:
            d.start_superlink()
            d.start_nodes(nodes, modes, capacities)
            d.wait_online(nodes)
            log.info("deployment up: SuperLink 127.0.0.1:%d, %d SuperNodes; logs in %s", d.port, nodes, d.logs)
            if serve:
                log.info("start runs with:\n  FLWR_HOME=%s flwr run %s %s --stream\nCtrl-C stops the deployment",
                         d.home, app, CONNECTION)
                while d.superlink is not None and d.superlink.alive():
                    time.sleep(1.0)
                log.error("the SuperLink exited; see %s", d.superlink.log_path if d.superlink else d.logs)
                return 1
            res = d.run(app, rc, timeout=timeout, echo=True)
            log.info("run %s: %s%s; outputs in %s, logs in %s", res.run_id or "?", res.status,
                     f" ({res.details})" if res.details else "", rc["out-dir"], d.logs)
            return 0 if res.ok else (res.exit_code or 1)
    except KeyboardInterrupt:
        log.info("stopped; logs in %s", root / "logs")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)

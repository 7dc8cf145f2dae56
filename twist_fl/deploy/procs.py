"""Processes this package starts, and only those: the one home of process ownership.

Every process is started by us (`Proc`, the leader of its own process group) and found again
only through its PID: its descendants and group members come from one reading of /proc
(`proc_table`), never from matching command lines across the machine. `flwr_env` is the one
environment Flower child processes get (their own FLWR_HOME, no telemetry, no update check, no
runtime dependency installation, free local ports).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    """A Flower console script: next to this Python first (the venv), else on PATH."""
    near = Path(sys.executable).with_name(name)
    if near.is_file():
        return str(near)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name!r} not found next to {sys.executable} or on PATH; install flwr")
    return found


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


# --- /proc: the one reader ---------------------------------------------------------------------

def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, or None if it is gone. The command name
    in /proc/<pid>/stat may hold spaces and parentheses, so the fields are read after the last ')'."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live, non-zombie process."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(d.name)
            if st is not None and st[0] != "Z":
                out[int(d.name)] = (st[1], st[2])
    return out


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def cmdline(pid: int) -> str:
    """The command line of a process, arguments joined by spaces ("" if it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (0 if it is gone), from /proc/<pid>/statm."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_pids(pid: int) -> list[int]:
    """A process, its descendants and the members of its process group, alive now. Flower's
    SuperLink starts its SuperExec in a new session, so the group alone is not enough."""
    table = proc_table()
    found = {p for p, (_, g) in table.items() if g == pid}
    if pid in table:
        found.add(pid)
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for p, (pp, _) in table.items():
            if pp == parent and p not in found:
                found.add(p)
                frontier.append(p)
    return sorted(found)


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM these processes (ours, found by PID), then SIGKILL whatever is left after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if alive(p)]
        for p in live:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in live):
            time.sleep(0.1)


# --- the environment of Flower child processes -------------------------------------------------

def flwr_env(home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) for a Flower process with its own FLWR_HOME:
    no telemetry, no update check, no runtime dependency installation, this environment's
    console scripts first on PATH (`flwr` starts `flower-superlink` from PATH), unbuffered
    output, and free ports for the local simulation SuperLink (instead of the machine-wide
    39091/39093)."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
                "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())})
    return env


@dataclass
class Proc:
    """A started process, the leader of its own process group (so its children go with it)."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self, fragment: str) -> list[int]:
        """PIDs among this process's tree whose command line contains `fragment`."""
        return [pid for pid in tree_pids(self.pid) if fragment in cmdline(pid)]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the leader (a clean shutdown), then everything it started; SIGKILL what is left."""
        pids = set(tree_pids(self.pid))  # before the leader goes: orphans lose their parent link
        for sig, leader_only in ((signal.SIGTERM, True), (signal.SIGTERM, False), (signal.SIGKILL, False)):
            pids |= set(tree_pids(self.pid))
            live = [p for p in pids if alive(p)]
            if not live and not self.alive():
                break
            for pid in ([self.pid] if leader_only else live):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (self.alive() or any(alive(p) for p in pids)):
                self.popen.poll()
                time.sleep(0.1)
        self.popen.poll()

    @classmethod
    def spawn(cls, name: str, cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> Proc:
        """Start `cmd` as the leader of a new session, its output appended to `log_path`."""
        with log_path.open("ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return cls(name, popen, log_path)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""



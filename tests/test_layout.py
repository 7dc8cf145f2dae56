"""The architecture as the folders show it: the core is Flower-free, imports run one way, the
stable names are importable from the package root."""

import ast
import subprocess
import sys
from pathlib import Path

import twist_fl

PKG = Path(twist_fl.__file__).parent
CORE_FORBIDDEN = {"flwr", "ray", "subprocess", "socket", "urllib", "http", "requests", "httpx"}
# Which subpackages each one may import (besides itself): core <- federated <- apps;
# baselines, deploy, export, evaluation and tools on top (DDP borrows deploy's free_port; the
# verbs run exported ONNX models).
ALLOWED = {"core": set(), "federated": {"core"}, "deploy": {"core"}, "export": {"core"},
           "evaluation": {"core", "export"}, "baselines": {"core", "deploy"},
           "tools": {"core", "federated", "baselines", "deploy", "evaluation", "export"}}


def modules(sub: str) -> list[Path]:
    return sorted((PKG / sub).glob("*.py"))


def imports(path: Path) -> set[str]:
    """Absolute names of what a module imports (relative imports resolved)."""
    parts = ["twist_fl", *path.relative_to(PKG).with_suffix("").parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_core_imports_no_flower_ray_or_network_in_a_fresh_interpreter():
    names = [f"twist_fl.core.{p.stem}" for p in modules("core") if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import {n}\n" for n in names) +
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)

    assert len(names) >= 10 and out.stdout.strip() == "[]"


def test_core_source_imports_nothing_forbidden():
    bad = {p.name: sorted(m for m in imports(p) if m.split(".")[0] in CORE_FORBIDDEN) for p in modules("core")}

    assert {k: v for k, v in bad.items() if v} == {}


def test_imports_run_one_way_between_subpackages():
    wrong = []
    for sub, allowed in ALLOWED.items():
        for p in modules(sub):
            for m in imports(p):
                other = m.split(".")[1] if m.startswith("twist_fl.") else None
                if other in ALLOWED and other != sub and other not in allowed:
                    wrong.append(f"{sub}/{p.name} imports {m}")

    assert wrong == []


def test_no_import_cycle_between_modules_and_the_client_does_not_import_the_strategy():
    mods = {f"twist_fl.{p.relative_to(PKG).with_suffix('').as_posix().replace('/', '.')}": p
            for p in PKG.rglob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {m: {n for n in imports(p) if n in mods and n != m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, n]))
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert "twist_fl.federated.strategy" not in graph["twist_fl.federated.client"]


def test_the_stable_names_come_from_the_package_root():
    from twist_fl import GPT, Blueprint, GPTConfig, coverage_average, sample_blueprints, slice_state

    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=8, head_dim=4, n_ffn_blocks=2,
                    ffn_block_size=4)
    bp = sample_blueprints(cfg, 2, 1, seed=0, round=1)[0]
    full = GPT(cfg)
    sub = GPT.from_state(cfg, slice_state(full.state_dict(), cfg, bp), blueprint=bp)
    new = coverage_average({k: v.detach().numpy() for k, v in full.state_dict().items()}, cfg,
                           [(bp, {k: v.detach().numpy() for k, v in sub.state_dict().items()}, 1.0)])
    assert isinstance(bp, Blueprint) and set(new) == set(full.state_dict())


def test_the_ddp_baseline_runs_without_flower():
    code = ("import sys, twist_fl.baselines.ddp\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)

    assert out.stdout.strip() == "[]"

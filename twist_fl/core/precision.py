"""Numeric precision of training and inference: fp32, or bf16/fp16 autocast over fp32 masters.

`precision` (run-config key, and `--precision` of the verbs) is one of:

- `fp32`: everything in float32 (the default).
- `bf16`: matrix multiplications and the other autocast-eligible ops in bfloat16 under
  `torch.autocast`; weights, gradients, AdamW moments, the loss and every average stay float32.
- `fp16`: the same in float16, CUDA only, with a gradient scaler against underflow.
- `auto`: bf16 where the device has fast bf16 matrix units, else fp32. A CUDA device counts when
  its compute capability is 8.0 or more (Ampere and later); a CPU when it reports AMX-bf16 or
  AVX-512-bf16 (`/proc/cpuinfo` flags `amx_bf16`, `avx512_bf16`). The decision is logged.

bf16 is not always faster: on a small model per-op overhead dominates and autocast's casts cost
more than the matmuls save (see docs/benchmarks.md). Measure before choosing.

The precision in force is a context (`precision_scope`), read by `GPT.forward`, which runs its
body under autocast and returns float32 logits and loss. So only the model's forward pass (and
its backward) is affected: optimizer steps, averaging, and the pruning baselines' own linear
algebra (SparseGPT's Hessian, importance scores) stay float32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import torch

from .config import PRECISIONS

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def machine() -> dict[str, str]:
    """The machine a figure came from: the CPU model, its vector class (the float kernels differ
    between them, so figures do) and the torch version."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    vector = ", ".join(n for f, n in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if f in flags) or \
        ("AVX2" if "avx2" in flags else "no AVX2")
    return {"cpu": model, "vector": vector, "torch": torch.__version__}


def vector_text(m: dict[str, str]) -> str:
    """machine()'s vector class as a reader needs it to reproduce a figure: 'AVX-512, no AMX' where
    an AVX-512 machine has no AMX (the bf16 and int8 kernels differ, and so do figures)."""
    v = m["vector"]
    return f"{v}, no AMX" if "AVX-512" in v and "AMX" not in v else v


def machine_line() -> str:
    m = machine()
    return f"{m['cpu']} ({vector_text(m)}), torch {m['torch']}"


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` has fast bf16 matrix units, and why (for the log)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"CUDA compute capability {major}.{minor}"
    found = [f for f in FAST_BF16_CPU_FLAGS if f in cpu_flags()]
    return bool(found), f"CPU flags {found}" if found else f"no CPU flag of {list(FAST_BF16_CPU_FLAGS)}"


def resolve_precision(name: str, device: torch.device, key: str = "run-config precision") -> str:
    """`fp32`, `bf16` or `fp16` for `device`; ValueError naming `key` for a choice the device
    cannot run (fp16 off CUDA, bf16 on a CUDA device without it)."""
    if name not in PRECISIONS:
        raise ValueError(f"{key}={name!r} is not allowed; allowed: {list(PRECISIONS)}")
    if name == "auto":
        fast, why = fast_bf16(device)
        name = "bf16" if fast else "fp32"
        log.info("precision auto -> %s on %s (%s)", name, device, why)
    elif name == "fp16" and device.type != "cuda":
        raise ValueError(f"{key}='fp16' needs a CUDA device; this one is {device}: use 'bf16' or 'fp32'")
    elif name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{key}='bf16' is not supported by {torch.cuda.get_device_name(device)}: use 'fp16' or 'fp32'")
    return name


_current: ContextVar[str] = ContextVar("twist_fl_precision", default="fp32")


def current_precision() -> str:
    """The resolved precision of forward passes here: fp32, bf16 or fp16."""
    return _current.get()


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[None]:
    """Forward passes inside run at `precision` (resolved: fp32, bf16 or fp16)."""
    if precision not in ("fp32", *DTYPES):
        raise ValueError(f"precision {precision!r} is not resolved; allowed: ['fp32', 'bf16', 'fp16']")
    token = _current.set(precision)
    try:
        yield
    finally:
        _current.reset(token)


def grad_scaler(device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler when forward passes run in fp16 (bf16 has float32's exponent range and
    needs none)."""
    return torch.amp.GradScaler(device.type) if current_precision() == "fp16" else None

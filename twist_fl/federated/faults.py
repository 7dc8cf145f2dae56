"""Fault injection for tests of reply validation: off unless the node's process has
TWIST_FL_ENABLE_FAULTS=1 *and* its node config names a fault (`twist-fault=<spec>`).

A spec is a comma list of `kind` (every round) or `R:kind` (round R only, which wins), e.g.
`nan`, `1:shape,2:stale-round`, or `hang,3:ok`. `ok` means an honest reply. `hang` sleeps
`twist-hang-s` seconds (node config; default 3600) before replying."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

FAULTS = ("nan", "inf", "shape", "dtype", "missing-key", "extra-key", "stale-round", "nonce", "norm",
          "num-examples", "raise", "hang")


def fault_for_round(spec: str, rnd: int) -> str:
    """The fault kind a spec names for round `rnd` ("ok" when none)."""
    every, by_round = "ok", {}
    for entry in (e.strip() for e in str(spec).split(",") if e.strip()):
        r, sep, kind = entry.rpartition(":")
        if kind not in FAULTS and kind != "ok":
            raise ValueError(f"unknown fault {kind!r} in twist-fault={spec!r}; allowed: {['ok', *FAULTS]}")
        if sep:
            try:
                by_round[int(r)] = kind
            except ValueError:
                raise ValueError(f"twist-fault entry {entry!r}: the round before ':' must be an integer") from None
        else:
            every = kind
    return by_round.get(rnd, every)


def inject(kind: str, arrays: dict[str, np.ndarray], metrics: dict[str, Any],
           rnd: int, hang_s: float = 3600.0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Corrupt a reply the way `kind` says; returns new (arrays, metrics)."""
    arrays, metrics = dict(arrays), dict(metrics)
    if kind == "ok":
        return arrays, metrics
    name = sorted(arrays)[0]
    if kind in ("nan", "inf"):
        a = arrays[name].copy()
        a.flat[0] = np.nan if kind == "nan" else np.inf
        arrays[name] = a
    elif kind == "shape":
        arrays[name] = np.concatenate([arrays[name], arrays[name][:1]], axis=0)
    elif kind == "dtype":
        arrays[name] = arrays[name].astype(np.float64)
    elif kind == "missing-key":
        del arrays[name]
    elif kind == "extra-key":
        arrays["h.0.attn.extra.weight"] = np.zeros((2, 2), dtype=np.float32)
    elif kind == "stale-round":
        metrics["server-round"] = rnd - 1
    elif kind == "nonce":
        metrics["nonce"] = 12345
    elif kind == "norm":
        arrays = {k: v * np.float32(1e6) for k, v in arrays.items()}
    elif kind == "num-examples":
        metrics["num-examples"] = 10**12
    elif kind == "raise":
        raise RuntimeError("injected ClientApp failure")
    elif kind == "hang":
        time.sleep(hang_s)
    else:
        raise ValueError(f"unknown fault {kind!r}; allowed: {list(FAULTS)}")
    return arrays, metrics

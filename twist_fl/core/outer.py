"""The server's outer step: how the coverage average moves the global model.

One seam of the round loop (DESIGN.md, "Policies and levers"). After coverage averaging, the
round's update is `delta = averaged - old` (zero for every block no valid reply held). The
outer step applies it:

    avg        new = averaged                                  (TwIST, FedAvg: no state)
    momentum   m = mu * m + delta;  new = old + lr * m         (FedAvgM; DiLoCo without Nesterov)
    nesterov   m = mu * m + delta;  new = old + lr * (mu * m + delta)   (DiLoCo's outer step)
    adam       m = b1 * m + (1 - b1) * delta;  v = b2 * v + (1 - b2) * delta^2;
               new = old + lr * m_hat / (sqrt(v_hat) + eps)    (FedAdam; bias-corrected per entry)

State is kept per entry of every tensor (full size, float32) and touched only where some valid
reply held the block this round: a block nobody held keeps its weights, its momentum and its
Adam step count, as if the round had not happened for it. The state is checkpointed with the
round (`state_arrays` / `load_state_arrays`), so a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .config import SERVER_OPTIMIZERS

ADAM_BETA2 = 0.99  # FedAdam (Reddi et al. 2021) defaults; beta1 is server-momentum
ADAM_EPS = 1e-8


class OuterOptimizer:
    def __init__(self, kind: str = "avg", lr: float = 1.0, momentum: float = 0.9):
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"server-optimizer={kind!r} is not allowed; allowed: {list(SERVER_OPTIMIZERS)}")
        self.kind, self.lr, self.mu = kind, float(lr), float(momentum)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t: dict[str, np.ndarray] = {}  # adam: per-entry step counts (blocks are held in different rounds)

    def step(self, old: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray],
             held: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global state from the old one and the coverage average; `held` as `blocks.held_masks`."""
        if self.kind == "avg":
            return dict(averaged)
        out = {}
        for name, x in old.items():
            x = np.asarray(x, dtype=np.float32)
            delta = np.asarray(averaged[name], dtype=np.float32) - x
            mask = np.broadcast_to(held[name], x.shape)
            m = self.m.setdefault(name, np.zeros_like(x))
            if self.kind in ("momentum", "nesterov"):
                m_new = self.mu * m + delta
                upd = self.mu * m_new + delta if self.kind == "nesterov" else m_new
            else:
                v = self.v.setdefault(name, np.zeros_like(x))
                t = self.t.setdefault(name, np.zeros(x.shape, dtype=np.float32))
                t_new = t + 1
                m_new = self.mu * m + (1 - self.mu) * delta
                v_new = ADAM_BETA2 * v + (1 - ADAM_BETA2) * delta * delta
                m_hat = m_new / (1 - self.mu ** np.maximum(t_new, 1))
                v_hat = v_new / (1 - ADAM_BETA2 ** np.maximum(t_new, 1))
                upd = m_hat / (np.sqrt(v_hat) + ADAM_EPS)
                self.v[name] = np.where(mask, v_new, v).astype(np.float32)
                self.t[name] = np.where(mask, t_new, t).astype(np.float32)
            self.m[name] = np.where(mask, m_new, m).astype(np.float32)
            out[name] = np.where(mask, x + self.lr * upd, x).astype(np.float32)
        return out

    # --- checkpointing ---------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The state as flat named arrays (`m/<tensor>`, `v/<tensor>`, `t/<tensor>`) for a checkpoint."""
        return {f"{slot}/{k}": a for slot, d in (("m", self.m), ("v", self.v), ("t", self.t)) for k, a in d.items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.m, self.v, self.t = {}, {}, {}
        slots = {"m": self.m, "v": self.v, "t": self.t}
        for key, a in arrays.items():
            slot, _, name = key.partition("/")
            if slot not in slots or not name:
                raise ValueError(f"outer optimizer state has an unknown entry {key!r}")
            slots[slot][name] = np.array(a, dtype=np.float32)

"""Subnet blueprints: which attention heads and FFN blocks each layer keeps, and how
TwIST samples them every round.

A `Blueprint` is small, frozen and crosses the wire as int lists only (`to_config`), so it
fits a Flower ConfigRecord and nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import KINDS, GPTConfig
from .rng import Stream, generator


@dataclass(frozen=True)
class Blueprint:
    """Per layer, the sorted ids of the heads and FFN blocks a subnet keeps.

    Small and frozen; it crosses the wire as int lists (`to_config` / `from_config`), never pickled.

    Attributes:
        heads: per layer, the kept attention heads (sorted ids).
        ffn: per layer, the kept FFN blocks (sorted ids).

    Example:
        >>> from twist_fl import Blueprint, GPTConfig
        >>> cfg = GPTConfig(n_layer=2, n_head=4, n_ffn_blocks=4)
        >>> bp = Blueprint(heads=((0, 1, 2, 3), (1, 3)), ffn=((0, 1, 2, 3), (0, 2))).validate(cfg)
        >>> bp.ids("heads", 1), bp.is_full(cfg), Blueprint.from_config(bp.to_config()) == bp
        ((1, 3), False, True)
    """

    heads: tuple[tuple[int, ...], ...]
    ffn: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(tuple(int(i) for i in ids) for ids in self.heads))
        object.__setattr__(self, "ffn", tuple(tuple(int(i) for i in ids) for ids in self.ffn))

    @classmethod
    def full(cls, cfg: GPTConfig) -> Blueprint:
        return cls(heads=tuple(tuple(range(cfg.n_head)) for _ in range(cfg.n_layer)),
                   ffn=tuple(tuple(range(cfg.n_ffn_blocks)) for _ in range(cfg.n_layer)))

    def ids(self, kind: str, layer: int) -> tuple[int, ...]:
        return (self.heads if kind == "heads" else self.ffn)[layer]

    def validate(self, cfg: GPTConfig) -> Blueprint:
        """Raise ValueError unless this blueprint fits `cfg`; return self."""
        if len(self.heads) != cfg.n_layer or len(self.ffn) != cfg.n_layer:
            raise ValueError(
                f"blueprint has {len(self.heads)} head layers and {len(self.ffn)} FFN layers; "
                f"the model has n_layer={cfg.n_layer}"
            )
        for kind in KINDS:
            n = cfg.blocks_of(kind)
            for layer in range(cfg.n_layer):
                ids = self.ids(kind, layer)
                if not ids:
                    raise ValueError(f"blueprint keeps no {kind} in layer {layer}; at least 1 is required")
                if list(ids) != sorted(set(ids)):
                    raise ValueError(f"blueprint {kind} ids of layer {layer} must be sorted and unique, "
                                     f"got {list(ids)}")
                if ids[0] < 0 or ids[-1] >= n:
                    raise ValueError(
                        f"blueprint {kind} ids of layer {layer} are {list(ids)}; allowed ids are 0..{n - 1}"
                    )
        return self

    def within(self, other: Blueprint) -> bool:
        """Whether every block this blueprint keeps, `other` keeps too (layer by layer)."""
        return len(self.heads) == len(other.heads) and all(
            set(a) <= set(b) for mine, theirs in ((self.heads, other.heads), (self.ffn, other.ffn))
            for a, b in zip(mine, theirs, strict=True))

    def is_full(self, cfg: GPTConfig) -> bool:
        return self == Blueprint.full(cfg)

    def to_config(self, prefix: str = "bp") -> dict[str, list[int]]:
        """Flat int lists for a Flower ConfigRecord: ids concatenated, plus per-layer counts."""
        out: dict[str, list[int]] = {}
        for kind in KINDS:
            per_layer = self.heads if kind == "heads" else self.ffn
            out[f"{prefix}-{kind}"] = [i for ids in per_layer for i in ids]
            out[f"{prefix}-{kind}-count"] = [len(ids) for ids in per_layer]
        return out

    @classmethod
    def from_config(cls, record: Any, prefix: str = "bp") -> Blueprint:
        """Inverse of `to_config`; `record` is any mapping (dict, ConfigRecord)."""
        parts = {}
        for kind in KINDS:
            try:
                flat = [int(i) for i in record[f"{prefix}-{kind}"]]
                counts = [int(c) for c in record[f"{prefix}-{kind}-count"]]
            except KeyError as e:
                raise ValueError(f"blueprint record lacks key {e.args[0]!r}") from None
            if sum(counts) != len(flat) or any(c < 0 for c in counts):
                raise ValueError(
                    f"blueprint record {prefix}-{kind}: counts {counts} do not add up to {len(flat)} ids"
                )
            layers, start = [], 0
            for c in counts:
                layers.append(tuple(flat[start:start + c]))
                start += c
            parts[kind] = tuple(layers)
        return cls(heads=parts["heads"], ffn=parts["ffn"])

    def to_dict(self) -> dict[str, list[list[int]]]:
        return {"heads": [list(h) for h in self.heads], "ffn": [list(f) for f in self.ffn]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blueprint:
        return cls(heads=tuple(tuple(h) for h in d["heads"]), ffn=tuple(tuple(f) for f in d["ffn"]))


def sample_blueprints(
    cfg: GPTConfig,
    n_subnets: int,
    keep: int | Sequence[int],
    seed: int,
    round: int,  # noqa: A002 - the name in the stable API
    shared_layers: Sequence[int] | None = None,
    allow_partial: bool = False,
    stream: Stream = Stream.BLUEPRINTS,
    core: int = 0,
) -> list[Blueprint]:
    """Sample one blueprint per subnet for a round, deterministically from (seed, round).

    Args:
        cfg: the architecture.
        n_subnets: how many blueprints (one per node of the round).
        keep: blocks of each kind per non-shared layer, one int for all or one per subnet.
        seed: the run's seed.
        round: the round (draws differ per round, and repeat for the same seed and round).
        shared_layers: layers kept whole (default: `cfg.shared_layers`).
        allow_partial: accept subnets that together cannot cover every block.
        stream: the named random stream (training rounds, evaluation or deployment draws).
        core: blocks 0..core-1 of every non-shared layer held by every subnet.

    Returns:
        One `Blueprint` per subnet.

    Raises:
        ValueError: a keep outside 1..N, or coverage impossible without `allow_partial`.

    Example:
        >>> from twist_fl import GPTConfig, sample_blueprints
        >>> cfg = GPTConfig(n_layer=4, n_head=8, n_ffn_blocks=8)
        >>> bps = sample_blueprints(cfg, n_subnets=2, keep=4, seed=0, round=1)
        >>> sorted(set(bps[0].heads[1]) | set(bps[1].heads[1])) == list(range(8))  # every block covered
        True

    Rules: (i) every subnet holds the shared layers whole; (ii) in every other layer,
    every block of each kind is held by at least one subnet when the subnets' keeps add up to
    at least N (a random permutation is dealt round-robin to subnets with room left, then each
    subnet is filled to its `keep` with random blocks it lacks); (iii) each subnet has exactly
    its `keep` blocks of each kind. `keep` is one int for all subnets or one per subnet (nodes
    of different capacity). Fewer than N in total raises, unless `allow_partial` (as when
    deployment draws a single subnet). `stream` names the random stream (`twist_fl.core.rng`):
    training rounds use BLUEPRINTS; evaluation and deployment draws their own, keyed by draw.

    `core` > 0 (run-config `core-blocks`) makes the first `core` blocks of every non-shared layer
    common to all subnets (a subnet smaller than the core keeps its first `keep` blocks); the rules
    above then apply to the blocks beyond the core. `core = 0` is exactly the draw above.
    """
    if isinstance(n_subnets, bool) or not isinstance(n_subnets, (int, np.integer)) or n_subnets < 1:
        raise ValueError(f"n_subnets must be a positive integer, got {n_subnets!r}")
    keeps = list(keep) if isinstance(keep, (list, tuple, np.ndarray)) else [keep] * n_subnets
    if len(keeps) != n_subnets:
        raise ValueError(f"got {len(keeps)} keep values for {n_subnets} subnets")
    for k in keeps:
        cfg.check_keep(k)
    shared = _shared(cfg, shared_layers)
    if shared_layers is not None:
        for i in shared_layers:
            if not -cfg.n_layer <= int(i) < cfg.n_layer:
                raise ValueError(f"shared layer {i} is outside 0..{cfg.n_layer - 1}")
    if isinstance(core, bool) or not isinstance(core, (int, np.integer)) or not 0 <= core < cfg.n_blocks:
        raise ValueError(f"core={core!r} is not allowed; allowed: 0..{cfg.n_blocks - 1} blocks common to every subnet")
    for kind in KINDS:
        n = cfg.blocks_of(kind)
        beyond = sum(max(0, k - core) for k in keeps)
        if beyond < n - core and not allow_partial and len(shared) < cfg.n_layer:
            raise ValueError(
                f"coverage impossible: {n_subnets} subnets keeping {keeps} {kind} cannot cover all "
                f"{n} {kind} of a layer (need a total keep >= {n}"
                + (f", {n - core} of them beyond the core of {core}" if core else "")
                + "); pass allow_partial=True to accept partial coverage"
            )
    rng = generator(int(seed), stream, int(round))
    per_subnet: dict[str, list[list[tuple[int, ...]]]] = {k: [[] for _ in range(n_subnets)] for k in KINDS}
    for layer in range(cfg.n_layer):
        for kind in KINDS:
            n = cfg.blocks_of(kind)
            if layer in shared:
                for s in range(n_subnets):
                    per_subnet[kind][s].append(tuple(range(n)))
                continue
            held: list[set[int]] = [set(range(min(core, keeps[s]))) for s in range(n_subnets)]
            # Deal a random permutation (of the blocks beyond the core) round-robin to the subnets
            # that still have room.
            s = 0
            for block in (rng.permutation(n) if not core else core + rng.permutation(n - core)):
                for _ in range(n_subnets):
                    if len(held[s]) < keeps[s]:
                        break
                    s = (s + 1) % n_subnets
                else:
                    break  # every subnet is full: partial coverage (allowed above)
                held[s].add(int(block))
                s = (s + 1) % n_subnets
            # Fill each subnet to its keep with random blocks it lacks.
            for s in range(n_subnets):
                lacking = np.array(sorted(set(range(n)) - held[s]), dtype=np.int64)
                need = keeps[s] - len(held[s])
                if need > 0:
                    held[s].update(int(b) for b in rng.choice(lacking, size=need, replace=False))
                per_subnet[kind][s].append(tuple(sorted(held[s])))
    return [Blueprint(heads=tuple(per_subnet["heads"][s]), ffn=tuple(per_subnet["ffn"][s]))
            for s in range(n_subnets)]


def _shared(cfg: GPTConfig, shared_layers: Sequence[int] | None) -> tuple[int, ...]:
    return cfg.shared_layer_ids if shared_layers is None else tuple(sorted({int(i) % cfg.n_layer
                                                                           for i in shared_layers}))


def prefix_blueprint(cfg: GPTConfig, keep: int, shared_layers: Sequence[int] | None = None) -> Blueprint:
    """The nested subnet of HeteroFL and FjORD (ordered dropout): the first `keep` heads and FFN
    blocks of every non-shared layer; shared layers whole. Deterministic: one subnet per size."""
    cfg.check_keep(keep)
    return window_blueprint(cfg, keep, 0, shared_layers)


def window_blueprint(cfg: GPTConfig, keep: int, start: int, shared_layers: Sequence[int] | None = None) -> Blueprint:
    """FedRolex's rolling window: `keep` consecutive blocks from `start` (cyclic, modulo each
    kind's block count) in every non-shared layer; shared layers whole."""
    cfg.check_keep(keep)
    shared = _shared(cfg, shared_layers)
    parts = {}
    for kind in KINDS:
        n = cfg.blocks_of(kind)
        window = tuple(sorted((int(start) + j) % n for j in range(min(keep, n))))
        parts[kind] = tuple(tuple(range(n)) if layer in shared else window for layer in range(cfg.n_layer))
    return Blueprint(heads=parts["heads"], ffn=parts["ffn"])

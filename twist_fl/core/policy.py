"""The blueprint policy: which blocks each node holds in a round, from (seed, round, capacities).

One seam of the round loop (DESIGN.md, "Policies and levers"): the strategy asks `round_plan`
for one blueprint per selected node and never draws blocks itself. The policy here is TwIST's
(`random`: coverage-guaranteed random subsets, `sample_blueprints`), with two levers:

- `full-nodes = k`: each round k nodes train the full model (the "sandwich" of US-Nets,
  MatFormer, FjORD). Nodes take turns in a seeded order, `k` per round, so over any
  `ceil(n / k)` consecutive rounds every eligible node has had its turn (a node whose capacity
  is below the full model is never eligible). The others train random subnets.
- `keep-choices`: each node draws its keep per round (seeded) from the choices its capacity
  allows (the smallest choice when none fits).

- `core-blocks = c`: every subnet keeps the first c blocks of each non-shared layer (after
  `init-order`, the most important ones) and draws the rest at random: a nested core under
  TwIST's random subnets. A subnet whose keep is no larger than c is the nested prefix of its keep.

With none of these levers the blueprints are exactly today's `sample_blueprints` draw.

`subnet-policy` chooses the kind of subnet instead of TwIST's random one (the same round loop,
coverage averaging and levers; only the blueprints differ):

- `ordered`: the nested prefix, the first k heads and FFN blocks of each non-shared layer
  (`prefix_blueprint`). With each node's keep fixed by its capacity this is HeteroFL; with
  `keep-choices` (a keep drawn per node and round within its capacity) it is FjORD's ordered
  dropout, and `self-distill-weight` adds its self-distillation on the node (core/objective.py).
- `rolling`: FedRolex's window of k consecutive blocks (cyclic), starting at block
  `(round - 1) mod N` in every non-shared layer, so that every block has its turn within N rounds.

Deployment cuts the kind of subnet the policy trained (`deploy_blueprints`): the prefix for
`ordered`, random draws for `random` and `rolling` (a rolling window has no preferred position).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .blueprint import Blueprint, prefix_blueprint, sample_blueprints, window_blueprint
from .config import GPTConfig, RunConfig
from .rng import Stream, generator


def capacity_keep(cfg: GPTConfig, capacity: float) -> int:
    """The most blocks of each kind per layer a node of `capacity` (a share in (0, 1]) can hold."""
    return max(1, int(math.floor(capacity * cfg.n_blocks + 1e-9)))


@dataclass(frozen=True)
class RoundPlan:
    blueprints: list[Blueprint]  # one per node, in the order given
    keeps: list[int]  # each node's keep (n_blocks for a full node)
    full: list[bool]  # whether each node trains the full model
    partial: bool  # the random subnets together do not cover every block (and no full node does)


def full_node_turns(seed: int, n_nodes: int, eligible: Sequence[int], k: int, round_: int) -> list[int]:
    """The positions (into the round's node list) of the `k` eligible nodes that train the full
    model in round `round_` (1-based): a seeded order of the eligible positions, dealt `k` per round."""
    if k <= 0 or not eligible:
        return []
    order = [eligible[i] for i in generator(seed, Stream.FULL_NODES).permutation(len(eligible))]
    k = min(k, len(order))
    start = ((round_ - 1) * k) % len(order)
    return sorted(order[(start + j) % len(order)] for j in range(k))


def round_plan(cfg: GPTConfig, run: RunConfig, round_: int, capacities: Sequence[float]) -> RoundPlan:
    """Blueprints of one round for nodes of the given capacities (sorted by partition id)."""
    n = len(capacities)
    caps = [capacity_keep(cfg, c) for c in capacities]
    if run.strategy != "twist":  # dense baselines: every node trains the full model
        return RoundPlan([Blueprint.full(cfg)] * n, [cfg.n_blocks] * n, [True] * n, False)
    choices = run.choices_for(cfg)
    if choices:
        rng = generator(run.seed, Stream.NODE_KEEPS, round_)
        keeps = []
        for cap in caps:
            fits = [c for c in choices if c <= cap] or [min(choices)]
            keeps.append(min(cap, int(rng.choice(fits))))
    else:
        keeps = [min(run.keep_for(cfg), cap) for cap in caps]
    eligible = [i for i, cap in enumerate(caps) if cap >= cfg.n_blocks]
    full = set(full_node_turns(run.seed, n, eligible, run.full_nodes, round_))
    rest = [i for i in range(n) if i not in full]
    core = run.core_blocks
    partial = bool(rest) and sum(max(0, keeps[i] - core) for i in rest) < max(cfg.n_head, cfg.n_ffn_blocks) - core
    bps: list[Blueprint] = [Blueprint.full(cfg)] * n
    if run.subnet_policy != "random":  # nested or rolling subnets leave blocks out by design: no warning
        for i in rest:
            bps[i] = prefix_blueprint(cfg, keeps[i]) if run.subnet_policy == "ordered" \
                else window_blueprint(cfg, keeps[i], round_ - 1)
        return RoundPlan(bps, [cfg.n_blocks if i in full else keeps[i] for i in range(n)],
                         [i in full for i in range(n)], False)
    if rest:
        drawn = sample_blueprints(cfg, len(rest), [keeps[i] for i in rest], run.seed, round_,
                                  allow_partial=partial or bool(full), core=run.core_blocks)
        for i, bp in zip(rest, drawn, strict=True):
            bps[i] = bp
    return RoundPlan(bps, [cfg.n_blocks if i in full else keeps[i] for i in range(n)],
                     [i in full for i in range(n)], partial and not full)


def deploy_blueprints(cfg: GPTConfig, policy: str, keep: int, seed: int, draws: int,
                      stream: Stream = Stream.DEPLOY_DRAWS, core: int = 0) -> list[Blueprint]:
    """The subnets of size `keep` a model trained with `policy` is deployed as: the one nested
    prefix for `ordered`; `draws` random subnets (seeded, draw d from `stream` at `d`) otherwise,
    each holding the first `core` blocks of every layer (run-config core-blocks)."""
    if policy == "ordered":
        return [prefix_blueprint(cfg, keep)]
    return [sample_blueprints(cfg, 1, keep, seed=seed, round=d, allow_partial=True, stream=stream,
                              core=min(core, cfg.n_blocks - 1))[0] for d in range(draws)]

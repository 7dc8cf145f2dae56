"""Named random streams: every seeded draw of the project comes from one of them.

A stream is `numpy.random.default_rng([seed, stream id, *key])` with a key of fixed length per
stream. Two different streams differ in the second word, and one stream's keys all have the
same length, so no two draws share a generator (numpy's SeedSequence pads short entropy with
zeros, which is why `[seed, 7]` and `[seed, 7, 0]` would be the same stream).

    stream        key                 what it draws
    BLUEPRINTS    (round,)            the subnets of a training round (`sample_blueprints`)
    NODE_SAMPLE   (round,)            which nodes train in a round (`num-nodes` > 0)
    NODE_BATCHES  (partition, round)  the batches a node trains on in a round
    SHARDS        ()                  the order in which IID windows are dealt to nodes
    EVAL_DRAWS    (draw,)             random subnets of the server-side validation
    DEPLOY_DRAWS  (draw,)             random subnets drawn at deployment (prune, evaluate, heatmap, report)
    FED_EVAL      (round,)            which nodes evaluate in a round (`fraction-evaluate`), and their subnets
    FULL_NODES    ()                  the order in which nodes take turns training the full model (`full-nodes`)
    NODE_KEEPS    (round,)            each node's keep in a round (`keep-choices`)
    SELF_DISTILL  (partition, round)  the smaller prefix each local step trains (`self-distill-weight`)
"""

from __future__ import annotations

import enum

import numpy as np


class Stream(enum.IntEnum):
    BLUEPRINTS = 1
    NODE_SAMPLE = 2
    NODE_BATCHES = 3
    SHARDS = 4
    EVAL_DRAWS = 5
    DEPLOY_DRAWS = 6
    FED_EVAL = 7
    FULL_NODES = 8
    NODE_KEEPS = 9
    SELF_DISTILL = 10


KEY_LENGTH = {Stream.BLUEPRINTS: 1, Stream.NODE_SAMPLE: 1, Stream.NODE_BATCHES: 2, Stream.SHARDS: 0,
              Stream.EVAL_DRAWS: 1, Stream.DEPLOY_DRAWS: 1, Stream.FED_EVAL: 1,
              Stream.FULL_NODES: 0, Stream.NODE_KEEPS: 1, Stream.SELF_DISTILL: 2}


def generator(seed: int, stream: Stream, *key: int) -> np.random.Generator:
    """The generator of `stream` for `seed` and `key` (non-negative integers)."""
    stream = Stream(stream)
    if len(key) != KEY_LENGTH[stream]:
        raise ValueError(f"random stream {stream.name} takes a key of {KEY_LENGTH[stream]} integers, got {key!r}")
    words = [seed, int(stream), *key]
    for w in words:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
            raise ValueError(f"random stream {stream.name}: seed and key must be integers >= 0, got {words!r}")
    return np.random.default_rng([int(w) for w in words])

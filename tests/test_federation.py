"""A federation of many nodes on non-IID data: LEAF-style Shakespeare by speaking role through
flwr-datasets, Dirichlet over plays, nodes sampled per round, and federated evaluation."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from twist_fl.core.config import RunConfig
from twist_fl.core.data import _grouping, shakespeare_speeches, speech_partition
from twist_fl.core.node import node_split, node_tokens, partition_stats

from .helpers import run_local

ROOT = Path(__file__).resolve().parents[1]


def test_speeches_are_parsed_with_their_speakers():
    speeches = shakespeare_speeches()

    train = speeches["train"]
    first = train[0]
    assert (first.play, first.character) == ("a-midsummer-night-s-dream", "THESEUS")
    assert first.text.startswith("Now, fair Hippolyta, our nuptial hour") and "_" not in first.text
    assert not any(s.play in ("the-tempest", "julius-caesar", "macbeth", "twelfth-night") for s in train)
    assert {s.play for s in speeches["valid"]} == {"the-tempest", "julius-caesar"}
    assert all(s.text and "**" not in s.text for s in train)  # no speaker tags inside a speech
    assert len({s.character_id for s in train}) > 1000  # LEAF's clients: one per role in each play


@pytest.mark.parametrize("scheme", ["character", "dirichlet"])
def test_speech_partitions_are_disjoint_and_complete(scheme):
    train = shakespeare_speeches()["train"]
    parts = [speech_partition(scheme, 7, p, seed=3, alpha=0.3) for p in range(7)]

    def key(s):
        return (s.character_id, s.text)

    assert Counter(key(s) for p in parts for s in p) == Counter(key(s) for s in train)
    if scheme == "character":  # every speaking role on exactly one node
        owners = {}
        for i, p in enumerate(parts):
            for s in p:
                assert owners.setdefault(s.character_id, i) == i
        assert max(len({s.character_id for s in p}) for p in parts) - \
            min(len({s.character_id for s in p}) for p in parts) <= 1  # roles spread evenly


def test_character_partitioning_makes_exactly_the_node_count_asked_for():
    for parts in range(1, 400):  # GroupedNaturalIdPartitioner's group count, for every count it can make
        try:
            size, mode = _grouping(1293, parts)
        except ValueError:
            continue
        assert (1293 // size if mode == "allow-bigger" else -(-1293 // size)) == parts, parts
    assert _grouping(1293, 50) == (26, "allow-smaller")  # 1293 // 50 = 25 would make 51 groups
    train = shakespeare_speeches()["train"]
    parts = [speech_partition("character", 50, p) for p in range(50)]
    assert sum(len(p) for p in parts) == len(train) and all(parts)
    roles = [{s.character_id for s in p} for p in parts]
    assert sum(len(r) for r in roles) == len({s.character_id for s in train})  # each role on one node
    with pytest.raises(ValueError, match="cannot make 1294 nodes out of 1293 speaking roles"):
        _grouping(1293, 1294)


def test_dirichlet_follows_its_seed_and_alpha():
    a = [len(speech_partition("dirichlet", 5, p, seed=1, alpha=0.5)) for p in range(5)]
    b = [len(speech_partition("dirichlet", 5, p, seed=1, alpha=0.5)) for p in range(5)]
    c = [len(speech_partition("dirichlet", 5, p, seed=2, alpha=0.5)) for p in range(5)]
    plays_low = np.mean([len({s.play for s in speech_partition("dirichlet", 5, p, seed=1, alpha=0.05)})
                         for p in range(5)])
    plays_high = np.mean([len({s.play for s in speech_partition("dirichlet", 5, p, seed=1, alpha=100.0)})
                          for p in range(5)])

    assert a == b and a != c
    assert plays_low < plays_high  # a small alpha puts each play on few nodes


_SHARE_CHILD = """
import hashlib, sys
from twist_fl.core.config import RunConfig
from twist_fl.core.node import node_tokens
run = RunConfig.from_flat({"partitioning": sys.argv[1], "seed": 5})
print(hashlib.sha256(node_tokens(run, 9, 4).tobytes()).hexdigest())
"""


@pytest.mark.parametrize("scheme", ["character", "dirichlet", "iid"])
def test_a_node_gets_the_same_share_in_every_process(tmp_path, scheme):
    run = RunConfig.from_flat({"partitioning": scheme, "seed": 5})
    here = hashlib.sha256(node_tokens(run, 9, 4).tobytes()).hexdigest()

    child = subprocess.run([sys.executable, "-c", _SHARE_CHILD, scheme], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "TWIST_FL_CACHE": str(tmp_path / "fresh-cache")})

    assert child.stdout.strip() == here  # a fresh process, with no token cache, cuts the same share


def test_per_node_statistics_and_the_held_out_share():
    run = RunConfig.from_flat({"partitioning": "character", "fraction-evaluate": 0.5})
    stats = partition_stats(run, 4)

    assert [s["partition"] for s in stats] == [0, 1, 2, 3]
    assert sum(s["characters"] for s in stats) == len({s.character_id for s in shakespeare_speeches()["train"]})
    train, held = node_split(run, 4, 2)
    assert len(train) + len(held) == stats[2]["tokens"]
    assert len(held) == stats[2]["tokens"] - int(0.9 * stats[2]["tokens"])


def test_a_node_too_small_for_seq_len_is_refused_before_round_1(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("To be, or not to be, that is the question. " * 200 + "\n\nAy.\n")
    (data / "valid.txt").write_text("Whether 'tis nobler in the mind to suffer " * 40 + "\n")
    (data / "test.txt").write_text("The slings and arrows of outrageous fortune " * 40 + "\n")

    with pytest.raises(ValueError, match=r"node of partition 1 \(of 2, partitioning 'document'\) holds 5 training "
                                         r"tokens, too few for seq-len=32"):
        run_local(tmp_path, "small", num_nodes=2, dataset="text", data_path=str(data), partitioning="document")
    assert not (tmp_path / "small" / "metrics.jsonl").exists()


def test_many_nodes_sampled_per_round_with_federated_evaluation(tmp_path):
    summary, grid, run_dir = run_local(tmp_path, "many", num_nodes=20,
                                       **{"num-nodes": 4, "partitioning": "character", "fraction-evaluate": 0.2,
                                          "num-server-rounds": 3, "eval-every": 1})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())

    assert all(len(r["nodes"]) == 4 for r in rows)  # 4 of the 20 train each round
    trained = [{n["partition_id"] for n in r["nodes"]} for r in rows]
    assert len(set.union(*trained)) > 4  # different nodes in different rounds
    for r in rows:
        fe = r["fed_eval"]
        assert fe["nodes"] == 4 and not fe["rejected"]  # 20% of the 20 evaluate
        assert fe["full"]["min"] <= fe["full"]["ppl"] <= fe["full"]["max"]
        assert "keep-2" in fe and np.isfinite(fe["keep-2"]["ppl"])
    assert len(config["partitions"]["20"]) == 20 and all(p["characters"] > 0 for p in config["partitions"]["20"])
    # a node not sampled in the last round keeps its optimizer state for when it is
    idle = min(trained[0] - trained[1] - trained[2])
    state = grid.contexts[grid.node_id(idle)].state
    assert int(state["twist-opt-meta"]["round"]) == 1 and "twist-opt-exp_avg" in state

# The same federation through `flwr run` (Ray, 20 SuperNodes): tests/test_e2e_simulation.py.

import pytest

from twist_fl.core.blueprint import Blueprint, sample_blueprints
from twist_fl.core.config import GPTConfig

CFG = GPTConfig(vocab_size=11, block_size=8, n_layer=4, n_head=6, n_embd=12, head_dim=2,
                n_ffn_blocks=6, ffn_block_size=3)


@pytest.mark.parametrize("n_subnets,keep", [(2, 3), (4, 3), (3, 2), (5, 4), (6, 1), (2, 6)])
def test_sampling_meets_the_rules(n_subnets, keep):
    bps = sample_blueprints(CFG, n_subnets, keep, seed=3, round=5)

    assert len(bps) == n_subnets
    for bp in bps:
        bp.validate(CFG)
        for layer in (0, 3):  # shared layers are whole
            assert bp.heads[layer] == tuple(range(6)) and bp.ffn[layer] == tuple(range(6))
        for layer in (1, 2):  # exactly keep of each kind
            assert len(bp.heads[layer]) == keep and len(bp.ffn[layer]) == keep
    for layer in (1, 2):  # full coverage since n_subnets * keep >= 6
        assert set().union(*(bp.heads[layer] for bp in bps)) == set(range(6))
        assert set().union(*(bp.ffn[layer] for bp in bps)) == set(range(6))


def test_sampling_is_deterministic_and_varies_by_round():
    a = sample_blueprints(CFG, 4, 3, seed=1, round=2)
    b = sample_blueprints(CFG, 4, 3, seed=1, round=2)
    c = sample_blueprints(CFG, 4, 3, seed=1, round=3)
    d = sample_blueprints(CFG, 4, 3, seed=2, round=2)

    assert a == b
    assert a != c and a != d


def test_per_subnet_keep_and_coverage():
    bps = sample_blueprints(CFG, 3, [1, 2, 3], seed=0, round=1)

    for bp, k in zip(bps, [1, 2, 3], strict=True):
        assert all(len(bp.heads[layer]) == k for layer in (1, 2))
    assert set().union(*(bp.ffn[1] for bp in bps)) == set(range(6))


def test_shared_layers_override():
    bps = sample_blueprints(CFG, 2, 3, seed=0, round=1, shared_layers=[])

    assert all(len(bp.heads[0]) == 3 for bp in bps)


@pytest.mark.parametrize("keep", [0, 7, -1, 2.5, True])
def test_keep_out_of_range_is_refused(keep):
    with pytest.raises(ValueError, match=r"keep=.* allowed 1\.\.6"):
        sample_blueprints(CFG, 4, keep, seed=0, round=1)


def test_impossible_coverage_needs_explicit_permission():
    with pytest.raises(ValueError, match="coverage impossible"):
        sample_blueprints(CFG, 2, 2, seed=0, round=1)

    (bp,) = sample_blueprints(CFG, 1, 2, seed=0, round=1, allow_partial=True)
    assert len(bp.heads[1]) == 2


def test_config_round_trip_uses_int_lists_only():
    bp = sample_blueprints(CFG, 3, 2, seed=0, round=1)[1]

    rec = bp.to_config()

    assert all(isinstance(v, list) and all(type(i) is int for i in v) for v in rec.values())
    assert Blueprint.from_config(rec) == bp
    assert Blueprint.from_dict(bp.to_dict()) == bp


@pytest.mark.parametrize("bp,match", [
    (Blueprint(heads=((0,),) * 3, ffn=((0,),) * 3), "n_layer=4"),
    (Blueprint(heads=((0, 6),) * 4, ffn=((0,),) * 4), r"allowed ids are 0\.\.5"),
    (Blueprint(heads=((1, 0),) * 4, ffn=((0,),) * 4), "sorted and unique"),
    (Blueprint(heads=((),) * 4, ffn=((0,),) * 4), "at least 1"),
])
def test_blueprint_that_does_not_fit_is_refused(bp, match):
    with pytest.raises(ValueError, match=match):
        bp.validate(CFG)


def test_from_config_with_inconsistent_counts_is_refused():
    rec = Blueprint.full(CFG).to_config()
    rec["bp-heads-count"] = [1, 1, 1, 1]

    with pytest.raises(ValueError, match="do not add up"):
        Blueprint.from_config(rec)

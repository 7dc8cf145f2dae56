"""Named random streams: distinct streams never share a generator; keys have a fixed length."""

import numpy as np
import pytest

from twist_fl.core.rng import KEY_LENGTH, Stream, generator


def _first_draws(seed, stream, *key):
    return tuple(generator(seed, stream, *key).integers(0, 2**62, size=4))


def test_streams_that_used_to_collide_are_now_apart():
    # Before named streams, node batches [seed, partition, round] equalled node sampling
    # [seed, round, 1] for partition == round and round 1, and the IID shard order [seed, 7]
    # equalled the round-7 blueprints [seed, 7].
    assert _first_draws(0, Stream.NODE_BATCHES, 1, 1) != _first_draws(0, Stream.NODE_SAMPLE, 1)
    assert _first_draws(0, Stream.SHARDS) != _first_draws(0, Stream.BLUEPRINTS, 7)


def test_no_two_keys_of_any_streams_share_a_generator():
    seen = {}
    for stream, n in KEY_LENGTH.items():
        keys = [()] if n == 0 else [tuple(k) for k in np.ndindex(*([4] * n))]
        for seed in range(3):
            for key in keys:
                draws = _first_draws(seed, stream, *key)
                assert draws not in seen, (stream, seed, key, seen.get(draws))
                seen[draws] = (stream, seed, key)


def test_same_inputs_give_the_same_draws():
    assert _first_draws(5, Stream.BLUEPRINTS, 3) == _first_draws(5, Stream.BLUEPRINTS, 3)


@pytest.mark.parametrize("key", [(), (1, 2), (-1,)])
def test_a_key_of_the_wrong_length_or_sign_is_refused(key):
    with pytest.raises(ValueError, match="BLUEPRINTS"):
        generator(0, Stream.BLUEPRINTS, *key)

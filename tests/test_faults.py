"""Counter-based fault sampling: a pure function of (seed, kind, site, counter)."""
import numpy as np
import pytest

from trainables.inject.faults import parse_bit_spec, sample_faults, uniform_below


def test_fault_list_does_not_depend_on_how_the_range_is_cut():
    whole = sample_faults(11, "neuron", 3, "random", 32, 4096, 0, 1000)
    parts = [sample_faults(11, "neuron", 3, "random", 32, 4096, a, b) for a, b in [(0, 1), (1, 8), (8, 263), (263, 1000)]]
    assert np.array_equal(whole.positions, np.concatenate([p.positions for p in parts]))
    assert np.array_equal(whole.bits, np.concatenate([p.bits for p in parts]))
    assert [p.first for p in parts] == [0, 1, 8, 263]


def test_streams_are_distinct_per_seed_site_and_kind():
    base = sample_faults(1, "neuron", 3, "random", 32, 10_000, 0, 500)
    for other in (sample_faults(2, "neuron", 3, "random", 32, 10_000, 0, 500),
                  sample_faults(1, "neuron", 4, "random", 32, 10_000, 0, 500),
                  sample_faults(1, "weight", 3, "random", 32, 10_000, 0, 500)):
        assert (base.positions == other.positions).mean() < 0.01
        assert (base.bits == other.bits).mean() < 0.1


def test_fixed_bit_trials_share_positions_so_bits_are_paired():
    a = sample_faults(5, "neuron", 2, 30, 32, 777, 0, 300)
    b = sample_faults(5, "neuron", 2, 0, 32, 777, 0, 300)
    r = sample_faults(5, "neuron", 2, "random", 32, 777, 0, 300)
    assert np.array_equal(a.positions, b.positions) and np.array_equal(a.positions, r.positions)
    assert set(a.bits) == {30} and set(b.bits) == {0}


def test_draws_cover_the_range_uniformly():
    f = sample_faults(123, "neuron", 1, "random", 32, 10, 0, 64_000)
    assert f.positions.min() == 0 and f.positions.max() == 9
    assert f.bits.min() == 0 and f.bits.max() == 31
    counts = np.bincount(f.bits, minlength=32)
    # 2000 expected per bit; a fair draw stays within 5 sigma (sigma ~ 44)
    assert np.all(np.abs(counts - 2000) < 220), counts
    assert np.all(np.abs(np.bincount(f.positions) - 6400) < 400)


def test_first_faults_are_pinned():
    """Golden values: the sampler must never change silently (it would change every result)."""
    f = sample_faults(0, "neuron", 1, "random", 32, 1000, 0, 5)
    assert f.positions.tolist() == [567, 895, 786, 322, 234]
    assert f.bits.tolist() == [9, 9, 8, 18, 29]


def test_uniform_below_edges():
    words = np.array([0, 2**64 - 1], dtype=np.uint64)
    assert uniform_below(words, 7).tolist() == [0, 6]
    with pytest.raises(ValueError):
        uniform_below(words, 0)


@pytest.mark.parametrize("value,expected", [("random", "random"), (-1, "random"), ("-1", "random"), (None, "random"), (7, 7), ("23", 23)])
def test_parse_bit_spec(value, expected):
    assert parse_bit_spec(value) == expected


@pytest.mark.parametrize("value", ["x", 1.5, True, "3,4"])
def test_parse_bit_spec_refuses_garbage(value):
    with pytest.raises(ValueError, match="bad bit spec"):
        parse_bit_spec(value)


def test_fixed_bit_outside_width_is_refused():
    with pytest.raises(ValueError, match=r"allowed 0\.\.15"):
        sample_faults(1, "neuron", 1, 16, 16, 10, 0, 5)

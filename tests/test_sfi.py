"""Statistical fault injection: sample sizes, allocations, stratified rates and the anytime-valid
interval, against hand-computed values and the martingale that defines it."""
import math

import pytest

from trainables import sfi
from trainables.stats import wilson_interval


def test_leveugle_sample_sizes_match_hand_computed_cases():
    # t(99%) = 2.5758293; t^2 / 4 / 0.01^2 = 16587.24 -> 16,588 (the figure, N -> infinity)
    assert sfi.leveugle_sample_size(math.inf, 0.01, 0.99) == 16588
    assert sfi.leveugle_sample_size(1e12, 0.01, 0.99) == 16588
    # N = 1e9: 1e9 / (1 + (1e9 - 1) / 16587.24) = 16586.97 -> 16,587 (the correction still shows)
    assert sfi.leveugle_sample_size(1e9, 0.01, 0.99) == 16587
    # the textbook cases: 1.96^2 / 4 / 0.05^2 = 384.15 -> 385; N = 1000: 1000 / (1 + 999 / 384.146) = 277.7 -> 278
    assert sfi.leveugle_sample_size(math.inf, 0.05, 0.95) == 385
    assert sfi.leveugle_sample_size(1000, 0.05, 0.95) == 278
    # N = 10,000, e = 1%, 99%: 10000 / (1 + 9999 / 16587.24) = 6239.03 -> 6,240
    assert sfi.leveugle_sample_size(10_000, 0.01, 0.99) == 6240
    # p = 0.1: 2.5758293^2 * 0.09 / 1e-4 = 5971.41 -> 5,972; a rate of 0 needs nothing
    assert sfi.leveugle_sample_size(math.inf, 0.01, 0.99, p=0.1) == 5972
    assert sfi.leveugle_sample_size(math.inf, 0.01, 0.99, p=0.0) == 0
    assert sfi.leveugle_sample_size(50, 0.001, 0.99) == 50  # never more than the population


def test_leveugle_margin_inverts_the_sample_size():
    assert sfi.leveugle_margin(16588, math.inf, 0.99) == pytest.approx(0.01 * math.sqrt(16587.2415 / 16588), rel=1e-6)
    assert sfi.leveugle_margin(278, 1000, 0.95) <= 0.05 < sfi.leveugle_margin(277, 1000, 0.95)
    assert sfi.leveugle_margin(1000, 1000, 0.95) == 0.0  # the whole population: no sampling error


@pytest.mark.parametrize("bad", [dict(margin=0), dict(margin=1.5), dict(p=1.2), dict(confidence=1.0), dict(population=0)])
def test_leveugle_refuses_bad_input_in_one_line(bad):
    args = dict(population=1000, margin=0.01, confidence=0.95, p=0.5) | bad
    with pytest.raises(ValueError, match=r"^(margin|rate|confidence|population): "):
        sfi.leveugle_sample_size(**args)


def test_neyman_and_equal_width_allocations_match_hand_computed_cases():
    # N_h sqrt(p q): 1000 * 0.5 = 500, 2000 * 0.3 = 600, 0 -> 1100 split 500 / 600 / 0
    assert sfi.neyman_allocation(1100, [1000, 2000, 1000], [0.5, 0.1, 0.0]) == [500, 600, 0]
    # 100 split 500 : 600 -> 45.45 / 54.55 -> 45 / 55
    assert sfi.neyman_allocation(100, [1000, 2000], [0.5, 0.1]) == [45, 55]
    # p q: 0.25 and 0.09 -> 340 split 250 / 90
    assert sfi.equal_width_allocation(340, [0.5, 0.1]) == [250, 90]
    assert sfi.round_to_total([1, 1, 1], 10) == [4, 3, 3]  # largest remainder, ties to the first
    assert sum(sfi.neyman_allocation(12345, [3, 5, 7, 11], [0.01, 0.2, 0.33, 0.5])) == 12345


def test_equal_width_allocation_equalizes_the_margins():
    n = sfi.equal_width_allocation(100_000, [0.5, 0.1, 0.01])
    margins = [sfi.leveugle_margin(k, math.inf, 0.99, p) for k, p in zip(n, [0.5, 0.1, 0.01])]
    assert max(margins) - min(margins) < 1e-5


def test_stratified_rate_weights_strata_by_population():
    est = sfi.stratified_rate([10, 0], [100, 100], [1e6, 3e6])
    assert est.rate == pytest.approx(0.025) and est.injections == 200
    # Var = (1/4)^2 0.1 0.9 / 100 (1 - 100/1e6) + (3/4)^2 q (1 - q) / 100 (1 - 100/3e6), q = 0.5/101 (no failure seen)
    q = 0.5 / 101
    var = (1 / 4) ** 2 * 0.1 * 0.9 / 100 * (1 - 1e-4) + (3 / 4) ** 2 * q * (1 - q) / 100 * (1 - 100 / 3e6)
    assert est.effective_n == pytest.approx(0.025 * 0.975 / var)
    low, high = wilson_interval(0.025 * est.effective_n, est.effective_n)
    assert (est.low, est.high) == pytest.approx((low, high))


def test_stratified_rate_reduces_to_wilson():
    one = sfi.stratified_rate([37], [1000], [1e9])
    assert (one.low, one.high) == pytest.approx(wilson_interval(37, 1000), rel=1e-6)
    # proportional allocation with equal rates: the pooled Wilson interval
    two = sfi.stratified_rate([20, 60], [100, 300], [1e9, 3e9])
    assert (two.rate, two.low, two.high) == pytest.approx((0.2, *wilson_interval(80, 400)), rel=1e-6)


def _log_mixture(k, n, p, a=0.5, b=0.5):
    lb = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    return lb(a + k, b + n - k) - lb(a, b) - k * math.log(p) - (n - k) * math.log1p(-p)


@pytest.mark.parametrize("k,n", [(1, 10), (30, 2048), (500, 1000), (7, 16588)])
def test_confidence_sequence_endpoints_are_where_the_mixture_martingale_reaches_one_over_alpha(k, n):
    low, high = sfi.confidence_sequence(k, n, 0.95)
    assert _log_mixture(k, n, low) == pytest.approx(math.log(20), abs=1e-6)
    assert _log_mixture(k, n, high) == pytest.approx(math.log(20), abs=1e-6)
    assert low < k / n < high
    w_low, w_high = wilson_interval(k, n)
    assert low < w_low and high > w_high  # the price of validity at every look


def test_confidence_sequence_edges_and_arrays():
    assert sfi.confidence_sequence(0, 0) == (0.0, 1.0)
    low, high = sfi.confidence_sequence([0, 10], [10, 10], 0.95)
    assert low[0] == 0.0 and high[1] == 1.0
    assert _log_mixture(0, 10, high[0]) == pytest.approx(math.log(20), abs=1e-6)
    assert high[0] == pytest.approx(1 - low[1])  # symmetric prior: mirror images
    with pytest.raises(ValueError, match="successes <= trials"):
        sfi.confidence_sequence(3, 2)


def test_cs_sample_size_is_the_first_n_with_the_margin():
    n = sfi.cs_sample_size(0.01, 0.99, 0.5)
    half = lambda m: (lambda lo, hi: (hi - lo) / 2)(*sfi.confidence_sequence(round(m / 2), m, 0.99))  # noqa: E731
    assert half(n) <= 0.01 < half(n - 1)
    assert n > sfi.leveugle_sample_size(math.inf, 0.01, 0.99)


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.1, 0.5])
def test_simulated_early_stopping_keeps_the_confidence_sequence_above_nominal(rate):
    # the trial schedule (--report-every 2048 over 10,000 images), a margin the CS reaches at half
    low, high = sfi.confidence_sequence(round(rate * 5000), 5000, 0.95)
    out = sfi.simulate_stopping(rate, 2000, 2048, 10_000, (high - low) / 2, 0.95, seed=7)
    assert out["cs"].covered >= 0.95 * 2000 and out["cs"].runs == 2000
    assert out["cs"].stopped_early > 0  # the rule did stop runs early
    again = sfi.simulate_stopping(rate, 2000, 2048, 10_000, (high - low) / 2, 0.95, seed=7)
    assert again == out  # deterministic by seed


def test_simulated_repeated_wilson_checks_cover_less_than_the_confidence_sequence():
    out = sfi.simulate_stopping(0.1, 2000, 2048, 10_000, 0.01641, 0.95, seed=3)
    assert out["wilson"].stopped_early == 2000 and out["wilson"].covered < out["cs"].covered

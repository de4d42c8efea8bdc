"""Statistical fault injection: sample sizes, allocation across strata, stratified (whole-model)
estimates and an interval that stays valid when a campaign stops early. Pure numpy and math
(no torch, no ray): the trials, the driver and ``analysis`` all use it.

- Sample size: Leveugle et al., DATE 2009, n = N / (1 + e^2 (N - 1) / (t^2 p (1 - p))), rounded
  up, with t the exact normal quantile (e = 1%, 99%, p = 0.5, N -> infinity: 16,588).
- Anytime-valid interval: Robbins' beta-binomial mixture confidence sequence (Robbins 1970;
  Howard et al. 2021). Its mixture of likelihood ratios is a nonnegative martingale under the
  true rate, so by Ville's inequality it covers at every look at once: a campaign may look after
  every window and stop whenever it likes.
"""
from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

CS_PRIOR = (0.5, 0.5)  # the mixture's Beta(a, b) prior (Jeffreys): tight for rare and common rates alike


def z_quantile(confidence: float) -> float:
    """The two-sided normal quantile t of a confidence level (0.99 -> 2.5758...)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: a level in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def _check(margin: float | None = None, p: float | None = None, population: float | None = None) -> None:
    if margin is not None and not 0 < margin < 1:
        raise ValueError(f"margin: a half-width in (0, 1), got {margin}")
    if p is not None and not 0 <= p <= 1:
        raise ValueError(f"rate: in [0, 1], got {p}")
    if population is not None and not population >= 1:
        raise ValueError(f"population: at least 1 fault, got {population}")


def leveugle_sample_size(population: float, margin: float, confidence: float = 0.95, p: float = 0.5) -> int:
    """Injections needed for a half-width ``margin`` at ``confidence`` in a population of
    ``population`` faults with expected rate ``p`` (Leveugle 2009), rounded up; math.inf: no
    finite-population correction."""
    _check(margin, p, population)
    t = z_quantile(confidence)
    if p in (0.0, 1.0):
        return 0
    n0 = t * t * p * (1 - p) / (margin * margin)
    n = n0 if math.isinf(population) else population / (1 + (population - 1) / n0)
    n = math.ceil(n - 1e-9)
    return n if math.isinf(population) else min(n, int(population))


def leveugle_margin(n: float, population: float, confidence: float = 0.95, p: float = 0.5) -> float:
    """The half-width that ``n`` injections buy (the Leveugle formula solved for e)."""
    _check(p=p, population=population)
    if n <= 0:
        return math.inf
    t = z_quantile(confidence)
    fpc = 1.0 if math.isinf(population) else max(0.0, (population - n) / max(population - 1, 1))
    return t * math.sqrt(p * (1 - p) / n * fpc)


def round_to_total(shares: Sequence[float], total: int) -> list[int]:
    """Integers summing to ``total`` in proportion to ``shares`` (largest remainder; ties to the
    first stratum)."""
    w = np.asarray(shares, dtype=np.float64)
    if total < 0 or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("allocation: need a total >= 0 and finite shares >= 0")
    if w.sum() == 0:
        w = np.ones_like(w)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    left = total - int(out.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:left]:
        out[i] += 1
    return out.tolist()


def neyman_allocation(total: int, sizes: Sequence[float], rates: Sequence[float]) -> list[int]:
    """Neyman allocation of ``total`` injections: n_h proportional to N_h sqrt(p_h (1 - p_h)),
    the split that minimizes the variance of the population-weighted rate."""
    n, p = np.asarray(sizes, dtype=np.float64), np.asarray(rates, dtype=np.float64)
    return round_to_total(n * np.sqrt(p * (1 - p)), total)


def equal_width_allocation(total: int, rates: Sequence[float]) -> list[int]:
    """``total`` injections split so that every stratum's interval has about the same width
    (n_h proportional to p_h (1 - p_h): per-stratum tables)."""
    p = np.asarray(rates, dtype=np.float64)
    return round_to_total(p * (1 - p), total)


def shrunk_rate(k, n):
    """A rate estimate that is never 0 or 1 ((k + 1/2) / (n + 1)), so an allocation gives a
    stratum whose pilot saw no failure a share that shrinks with its evidence, not nothing."""
    return (np.asarray(k, dtype=np.float64) + 0.5) / (np.asarray(n, dtype=np.float64) + 1.0)


def _log_beta(a, b):
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    return lg(a) + lg(b) - lg(np.asarray(a) + np.asarray(b))


def confidence_sequence(successes, trials, confidence: float = 0.95, prior: tuple[float, float] = CS_PRIOR):
    """Anytime-valid interval for a binomial rate: {p : M_n(p) < 1 / alpha}, with M_n(p) =
    B(a + k, b + n - k) / (B(a, b) p^k (1 - p)^(n - k)) Robbins' beta-binomial mixture martingale.
    Covers the true rate at all looks simultaneously with probability >= ``confidence``.
    Scalars or arrays; (nan, nan) where ``trials`` is 0 -> (0, 1)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: a level in (0, 1), got {confidence}")
    a, b = prior
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    k, n = np.broadcast_arrays(k, n)
    if (k < 0).any() or (k > n).any():
        raise ValueError("confidence_sequence: need 0 <= successes <= trials")
    # distinct (k, n) pairs only: a simulation asks for the same ones many times
    pairs, inverse = np.unique(np.stack([k.ravel(), n.ravel()]), axis=1, return_inverse=True)
    uk, un = pairs
    level = math.log(1 / (1 - confidence)) - (_log_beta(a + uk, b + un - uk) - _log_beta(a, b))
    # inside the set iff g(p) = -k log p - (n - k) log(1 - p) < level; g is convex with its
    # minimum at k / n, where it is below level (a mixture never beats the maximum likelihood)
    phat = np.where(un > 0, uk / np.maximum(un, 1), 0.5)

    def g(p):
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(uk > 0, uk * np.log(p), 0.0) - np.where(un - uk > 0, (un - uk) * np.log1p(-p), 0.0)

    def edge(lo, hi, inside_at_lo):
        for _ in range(60):
            mid = (lo + hi) / 2
            ok = g(mid) < level
            move_lo = ok == inside_at_lo
            lo, hi = np.where(move_lo, mid, lo), np.where(move_lo, hi, mid)
        return lo, hi

    low = edge(np.zeros_like(phat), phat, False)[1]  # the smallest p inside
    high = edge(phat, np.ones_like(phat), True)[0]  # the largest p inside
    low = np.where(uk == 0, 0.0, low)
    high = np.where(uk == un, 1.0, high)
    low, high = np.where(un > 0, low, 0.0), np.where(un > 0, high, 1.0)
    low, high = low[inverse.ravel()].reshape(k.shape), high[inverse.ravel()].reshape(k.shape)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


@lru_cache(maxsize=4096)
def cs_sample_size(margin: float, confidence: float = 0.95, p: float = 0.5, prior=CS_PRIOR) -> int:
    """The smallest n at which the confidence sequence at k = p n has half-width <= ``margin``:
    what a campaign that stops at that margin spends, when the rate is ``p``."""
    _check(margin, p)

    def half(n: int) -> float:
        lo, hi = confidence_sequence(round(p * n), n, confidence, prior)
        return (hi - lo) / 2

    hi = 1
    while half(hi) > margin:
        hi *= 2
        if hi > 2**40:
            raise ValueError(f"margin {margin} is out of reach")
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if half(mid) <= margin:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class StratifiedEstimate:
    """A population-weighted rate over strata with its interval."""

    rate: float
    low: float
    high: float
    effective_n: float  # Kish's effective sample size: the interval is Wilson's at this n
    injections: int


def stratified_rate(successes: Sequence[float], trials: Sequence[float], sizes: Sequence[float],
                    confidence: float = 0.95) -> StratifiedEstimate:
    """Population-weighted rate sum_h W_h k_h / n_h (W_h = N_h / N) and its interval: the Wilson
    interval at Kish's effective sample size n_eff = p (1 - p) / Var, Var = sum_h W_h^2 p_h
    (1 - p_h) / n_h (1 - n_h / N_h), where a stratum with 0 or n_h failures uses (k + 1/2)/(n + 1)
    for p_h. One stratum, or equal rates under proportional allocation, give the plain Wilson interval."""
    from trainables.stats import wilson_interval

    k, n, N = (np.asarray(x, dtype=np.float64) for x in (successes, trials, sizes))
    if not (k.shape == n.shape == N.shape) or k.ndim != 1 or len(k) == 0:
        raise ValueError("stratified_rate: need one count, trial count and size per stratum")
    if (n <= 0).any() or (k < 0).any() or (k > n).any() or (N <= 0).any():
        raise ValueError("stratified_rate: every stratum needs trials > 0, 0 <= successes <= trials and a size > 0")
    w = N / N.sum()
    ph = k / n
    rate = float((w * ph).sum())
    fpc = np.clip(1 - n / N, 0.0, 1.0)
    # a stratum that saw 0 (or all) failures would add no variance: it gets its shrunk rate's
    pv = np.where((k == 0) | (k == n), shrunk_rate(k, n), ph)
    var = float((w * w * pv * (1 - pv) / n * fpc).sum())
    if var > 0 and 0 < rate < 1:
        n_eff = rate * (1 - rate) / var
    else:  # no variation seen: the design effect of the weights alone
        n_eff = 1.0 / float((w * w / n).sum())
    low, high = wilson_interval(rate * n_eff, n_eff, z_quantile(confidence))
    return StratifiedEstimate(rate, float(low), float(high), float(n_eff), int(n.sum()))


@dataclass(frozen=True)
class StoppingResult:
    """How one interval fared in a simulated campaign that stops at a margin."""

    interval: str  # "cs" (the confidence sequence) or "wilson" (today's repeated Wilson check)
    runs: int
    covered: int  # runs whose interval at the stop contains the true rate
    stopped_early: int  # runs that stopped before the last look
    mean_injections: float


def simulate_stopping(rate: float, runs: int, look_every: int, max_n: int, margin: float, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, StoppingResult]:
    """Simulate ``runs`` campaigns of Bernoulli(``rate``) faults that look after every ``look_every``
    injections (up to ``max_n``) and stop at the first look whose interval has half-width <
    ``margin``; the same draws judged by the confidence sequence and by the Wilson interval."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(np.arange(look_every, max_n + look_every, look_every), max_n)
    steps = np.diff(sizes, prepend=0)
    k = np.cumsum(rng.binomial(steps, rate, size=(runs, len(sizes))), axis=1)
    n = np.broadcast_to(sizes, k.shape)
    out = {}
    for name in ("cs", "wilson"):
        if name == "cs":
            low, high = confidence_sequence(k, n, confidence)
        else:
            from trainables.stats import wilson_interval

            low, high = wilson_interval(k, n, z_quantile(confidence))
        narrow = (high - low) / 2 < margin
        narrow[:, -1] = True  # the last look ends the campaign anyway
        stop = narrow.argmax(axis=1)
        rows = np.arange(runs)
        covered = (low[rows, stop] <= rate) & (rate <= high[rows, stop])
        out[name] = StoppingResult(name, runs, int(covered.sum()), int((stop < len(sizes) - 1).sum()),
                                   float(sizes[stop].mean()))
    return out

"""Binomial confidence intervals (torch-free: the analysis side uses it too)."""
from __future__ import annotations

from math import comb, lgamma, log, log10

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(successes, trials, z: float = Z95):
    """Wilson score interval for ``successes`` out of ``trials`` (scalars or arrays).

    Returns (low, high); both are NaN where ``trials`` is 0.
    """
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        low = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
        high = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    # exact endpoints at k = 0 and k = n (the formula gives them up to rounding)
    low = np.where((n > 0) & (k == 0), 0.0, low)
    high = np.where((n > 0) & (k == n), 1.0, high)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of a paired 2x2 table with discordant counts ``b`` and
    ``c``: the two-sided binomial test of min(b, c) among b + c with p = 1/2, capped at 1.
    Below the smallest double (about 1e-308) it is 0.0: see mcnemar_log10."""
    n, tail = _binomial_tail(b, c)
    if tail is None:
        return 10.0 ** mcnemar_log10(b, c)
    return min(1.0, 2 * tail / 2**n)


def mcnemar_log10(b: int, c: int) -> float:
    """log10 of mcnemar_exact(b, c), finite where the p-value itself underflows to 0.0."""
    n, tail = _binomial_tail(b, c)
    if tail is not None:  # math.log10 takes big integers exactly
        return min(0.0, log10(2 * tail) - n * log10(2))
    k = min(int(b), int(c))
    i = np.arange(k + 1, dtype=np.float64)
    logs = lgamma(n + 1) - np.array([lgamma(x + 1) + lgamma(n - x + 1) for x in i]) - n * log(2.0)
    top = logs.max()
    return float(min(0.0, (log(2.0) + top + np.log(np.exp(logs - top).sum())) / log(10.0)))


def _binomial_tail(b: int, c: int) -> tuple[int, int | None]:
    """(n = b + c, the integer sum C(n, i) for i <= min(b, c)), computed exactly up to n = 1000
    (None beyond: log space); a balanced or empty table's tail is 2**(n-1), so p = 1."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    n, k = b + c, min(b, c)
    if n == 0 or 2 * k == n:
        return n, 2 ** max(n - 1, 0) if n else 1
    if n > 1000:
        return n, None
    return n, sum(comb(n, i) for i in range(k + 1))

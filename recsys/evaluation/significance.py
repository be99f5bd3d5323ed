"""Statistics that let a table rank methods: intervals over seeds, and paired tests over users.

Pure functions of numpy arrays (no run folders, no pandas):

- ``mean_ci``: mean and the half-width of a two-sided t confidence interval over seeds;
- ``standard_error``: of a mean over users (one run);
- ``paired_bootstrap``: mean of the paired differences a - b, its percentile bootstrap interval and
  a two-sided p-value (resampling users);
- ``wilcoxon``: the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``: zero differences dropped,
  average ranks for ties), exact for up to 50 pairs without ties, else the normal approximation with
  the tie correction and no continuity correction; effect size the matched-pairs rank-biserial
  correlation r = (W+ - W-) / (W+ + W-);
- ``compare_paired``: the one record of a paired comparison; it refuses fewer than ``MIN_PAIRED_USERS``
  users (with 2 users every difference of one sign reads as r = +1).

The quantiles, ranks and the signed-rank test are scipy's; the tests keep the numbers the earlier
hand-written versions gave (``tests/test_stats.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats

def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(scipy.stats.t.ppf(0.5 + level / 2, df))


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t interval (NaN half-width for fewer than 2 values; NaNs dropped)."""
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    if a.size < 2:
        return float(a.mean()), math.nan
    return float(a.mean()), t_quantile(a.size - 1, level) * float(a.std(ddof=1)) / math.sqrt(a.size)


def standard_error(values) -> float:
    """Standard error of the mean of per-user values (sample std / sqrt(n))."""
    a = np.asarray(values, dtype=float)
    return float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan


@dataclass
class Bootstrap:
    mean: float  # mean of a - b
    lo: float  # percentile interval of the mean
    hi: float
    p: float  # two-sided: twice the smaller share of resampled means on either side of 0


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0, level: float = 0.95,
                     chunk: int = 500) -> Bootstrap:
    """Paired bootstrap over users of mean(a - b): resample the n pairs with replacement."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = d.size
    if n == 0:
        return Bootstrap(math.nan, math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for s in range(0, resamples, chunk):
        m = min(chunk, resamples - s)
        means[s : s + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return Bootstrap(float(d.mean()), float(lo), float(hi), p)


# the fewest users a paired test is run on: below 6 pairs no two-sided signed-rank p can reach 0.05
# (the smallest is 2 / 2^n: 0.0625 for 5), and with 2 users one sign of difference reads as r = +1
MIN_PAIRED_USERS = 6


def compare_paired(a, b, resamples: int = 10_000) -> dict:
    """Two rows' per-user values on the same users (a[i], b[i]: user i): their means and standard errors,
    the mean difference a - b with its paired-bootstrap interval and p, the Wilcoxon signed-rank p and
    the rank-biserial effect size; the one record ``recsys.evaluation.tables`` and ``recsys.evaluation.ranks --paired`` print.
    ValueError for fewer than ``MIN_PAIRED_USERS`` users."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < MIN_PAIRED_USERS:
        raise ValueError(f"{len(a)} paired users: too few for a paired test (at least {MIN_PAIRED_USERS}: below that "
                         f"no Wilcoxon p reaches 0.05)")
    boot, w = paired_bootstrap(a, b, resamples=resamples), wilcoxon(a, b)
    return {"users": len(a), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "delta": boot.mean,
            "ci_lo": boot.lo, "ci_hi": boot.hi, "p_bootstrap": boot.p, "p_wilcoxon": w.p,
            "wilcoxon_method": w.method, "rank_biserial": w.r, "se_a": standard_error(a), "se_b": standard_error(b)}


def format_p_bootstrap(p: float, resamples: int = 10_000) -> str:
    """A bootstrap p-value as text; 0 (no resample crossed zero) reads as ``< 2/resamples``, its resolution."""
    return f"< {2 / resamples:.0e}" if p == 0 else f"{p:.3g}"


def format_p_wilcoxon(p: float, digits: int = 3) -> str:
    """A Wilcoxon p-value as text; 0 (the normal approximation's tail below the smallest double, |z| > 38 or
    so, as on tens of thousands of users) reads as ``< 1e-300``: a p-value is never 0."""
    return "< 1e-300" if p == 0 else f"{p:.{digits}g}"


@dataclass
class Wilcoxon:
    n: int  # pairs with a non-zero difference
    w_plus: float  # sum of the ranks of |d| where a > b
    w_minus: float
    statistic: float  # min(W+, W-), as scipy reports it
    p: float  # two-sided
    r: float  # matched-pairs rank-biserial correlation, in [-1, 1]; > 0: a tends to be larger
    method: str  # exact | normal


def wilcoxon(a, b, exact_max_n: int = 50) -> Wilcoxon:
    """Two-sided Wilcoxon signed-rank test of a vs b (paired); see the module docstring. All pairs equal
    (no non-zero difference): p 1, r 0."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[d != 0]
    n = d.size
    if n == 0:
        return Wilcoxon(0, 0.0, 0.0, 0.0, 1.0, 0.0, "exact")
    r = scipy.stats.rankdata(np.abs(d))
    w_plus, w_minus = float(r[d > 0].sum()), float(r[d < 0].sum())
    exact = n <= exact_max_n and np.unique(np.abs(d)).size == n
    test = scipy.stats.wilcoxon(d, zero_method="wilcox", correction=False, method="exact" if exact else "approx")
    return Wilcoxon(n, w_plus, w_minus, min(w_plus, w_minus), min(1.0, float(test.pvalue)),
                    (w_plus - w_minus) / (w_plus + w_minus), "exact" if exact else "normal")

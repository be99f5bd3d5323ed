"""Statistics that let a table rank methods: intervals over seeds, and paired tests over users.

Pure functions of numpy arrays (no run folders, no pandas):

- ``mean_ci``: mean and the half-width of a two-sided t confidence interval over seeds;
- ``standard_error``: of a mean over users (one run);
- ``paired_bootstrap``: mean of the paired differences a - b, its percentile bootstrap interval and
  a two-sided p-value (resampling users);
- ``wilcoxon``: the Wilcoxon signed-rank test (zero differences dropped, average ranks for ties),
  exact for small samples without ties, else the normal approximation with the tie correction;
  effect size the matched-pairs rank-biserial correlation r = (W+ - W-) / (W+ + W-).

``scipy`` is used for the t quantile when installed (a table of the usual values otherwise); the
tests check the hand-written Wilcoxon against ``scipy.stats.wilcoxon``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# two-sided 95% t quantiles t_{0.975, df} for df = 1..30 (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int, level: float = 0.95) -> float:
    """Two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.5 + level / 2, df))
    except ImportError:  # pragma: no cover - scipy is optional
        if level != 0.95:
            raise
        return _T975[df - 1] if df <= len(_T975) else 1.96


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


def compare_paired(a, b, resamples: int = 10_000) -> dict:
    """Two rows' per-user values on the same users (a[i], b[i]: user i): their means and standard errors,
    the mean difference a - b with its paired-bootstrap interval and p, the Wilcoxon signed-rank p and
    the rank-biserial effect size; the one record ``recsys.evaluation.tables`` and ``recsys.evaluation.ranks --paired`` print."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    boot, w = paired_bootstrap(a, b, resamples=resamples), wilcoxon(a, b)
    return {"users": len(a), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "delta": boot.mean,
            "ci_lo": boot.lo, "ci_hi": boot.hi, "p_bootstrap": boot.p, "p_wilcoxon": w.p,
            "wilcoxon_method": w.method, "rank_biserial": w.r, "se_a": standard_error(a), "se_b": standard_error(b)}


def format_p_bootstrap(p: float, resamples: int = 10_000) -> str:
    """A bootstrap p-value as text; 0 (no resample crossed zero) reads as ``< 2/resamples``, its resolution."""
    return f"< {2 / resamples:.0e}" if p == 0 else f"{p:.3g}"


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _exact_signed_rank_cdf(n: int, w: float) -> float:
    """P(W+ <= w) under H0 for n untied, non-zero differences (all 2^n sign patterns equally likely)."""
    top = n * (n + 1) // 2
    counts = np.zeros(top + 1)
    counts[0] = 1.0
    for r in range(1, n + 1):  # counts of subsets of {1..n} with each sum
        counts[r:] = counts[r:] + counts[:-r].copy()
    return float(counts[: int(math.floor(w)) + 1].sum() / 2.0 ** n)


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
    """Two-sided Wilcoxon signed-rank test of a vs b (paired); see the module docstring."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[d != 0]
    n = d.size
    if n == 0:
        return Wilcoxon(0, 0.0, 0.0, 0.0, 1.0, 0.0, "exact")
    r = rankdata(np.abs(d))
    w_plus, w_minus = float(r[d > 0].sum()), float(r[d < 0].sum())
    stat = min(w_plus, w_minus)
    ties = np.unique(np.abs(d), return_counts=True)[1]
    if n <= exact_max_n and (ties == 1).all():
        p, method = min(1.0, 2 * _exact_signed_rank_cdf(n, stat)), "exact"
    else:
        mean = n * (n + 1) / 4
        var = n * (n + 1) * (2 * n + 1) / 24 - float(((ties ** 3) - ties).sum()) / 48
        z = (w_plus - mean) / math.sqrt(var) if var > 0 else 0.0
        p, method = math.erfc(abs(z) / math.sqrt(2)), "normal"
    return Wilcoxon(n, w_plus, w_minus, stat, p, (w_plus - w_minus) / (w_plus + w_minus), method)

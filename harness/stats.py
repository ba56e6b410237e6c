"""Statistics for the leaderboard (issue 19 item 2): mean ± 95% confidence interval over seeds (Student's t), a
paired test between two runs over the same evaluation windows (per-window NLL differences, paired t-test), and
Welch's test between two methods' seed results (does a gap exceed the seed spread?) — scipy's implementations,
wrapped so the report reads them in one place."""

from __future__ import annotations

import math
from collections.abc import Sequence

SIGNIFICANCE = 0.05


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the `level` confidence interval of the mean), t distribution with n − 1 degrees of
    freedom; the half-width is nan for a single value."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)


def paired_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test on a − b (the same windows scored by two runs); nan when the
    series do not pair (different lengths) or are identical."""
    from scipy import stats

    if len(a) != len(b) or len(a) < 2 or all(x == y for x, y in zip(a, b, strict=True)):
        return math.nan
    return float(stats.ttest_rel(a, b).pvalue)


def mcnemar_p_value(a: Sequence[int], b: Sequence[int]) -> float:
    """Two-sided p-value of McNemar's exact test: two runs scored right (1) or wrong (0) on the same documents,
    in the same order; under "equally accurate" the documents only one of them got right split 50/50 (a binomial
    test on those). 1.0 when no document separates them; nan when the lists do not pair."""
    from scipy import stats

    if len(a) != len(b) or not len(a):
        return math.nan
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) between two independent samples, e.g. one method's
    PPL over seeds against another's; nan with fewer than two values on either side."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)

"""How sure a number is: bootstrap confidence intervals and paired comparisons (scipy.stats).

Every headline score is a mean of per-sample scores, so its uncertainty is the sampling
uncertainty of that mean over the evaluated samples: a 95% percentile bootstrap interval (2,000
resamples from a fixed seed, so a board renders the same every time). Two defenses evaluated on
the same samples are compared *paired*: the bootstrap interval of the mean per-sample difference,
and, when every score is 0 or 1, McNemar's exact test on the discordant pairs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

from harness.board import CONFIDENCE, MIN_SAMPLES, Interval, PairedComparison  # noqa: F401 - the types the board carries

RESAMPLES = 2_000
SEED = 0


def bootstrap_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Percentile bootstrap interval of the mean (a point interval for fewer than 2 values or
    constant values)."""
    # sorted: the interval is a function of the values, not of the order the store returns them in
    data = np.sort(np.asarray(values, dtype=float))
    if data.size < 2 or np.all(data == data[0]):
        value = float(data.mean()) if data.size else float("nan")
        return Interval(value, value)
    result = stats.bootstrap(
        (data,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES, method="percentile",
        random_state=np.random.default_rng(SEED), vectorized=True,
    )
    return Interval(float(result.confidence_interval.low), float(result.confidence_interval.high))


def paired_comparison(a: dict[str, float], b: dict[str, float]) -> PairedComparison | None:
    """Compare per-sample scores (sample id -> score) on their common samples; None if none."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    x = np.asarray([a[s] for s in common], dtype=float)
    y = np.asarray([b[s] for s in common], dtype=float)
    diff = x - y
    interval = bootstrap_ci(diff)
    binary = np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()
    if binary:
        a_only = int(((x == 1) & (y == 0)).sum())
        b_only = int(((x == 0) & (y == 1)).sum())
        discordant = a_only + b_only
        p = 1.0 if discordant == 0 else float(stats.binomtest(a_only, discordant, 0.5).pvalue)
        return PairedComparison(len(common), float(diff.mean()), interval, p, "mcnemar-exact")
    if np.all(diff == 0):
        return PairedComparison(len(common), 0.0, interval, 1.0, "paired-bootstrap")
    rng = np.random.default_rng(SEED)
    means = diff[rng.integers(0, diff.size, size=(RESAMPLES, diff.size))].mean(axis=1)
    # (k + 1) / (R + 1) (Davison & Hinkley 1997, eq. 4.11): R resamples cannot tell a p below
    # 2 / (R + 1); a raw k / R of 0 printed "p<1e-4" for a difference whose 95% interval came
    # within 0.02 of zero
    tail = min(int((means <= 0).sum()), int((means >= 0).sum()))
    p = float(min(1.0, 2 * (tail + 1) / (RESAMPLES + 1)))
    # the interval from the same resamples as p: two independent draws could disagree at the
    # boundary (an interval excluding 0 beside p = 0.051)
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return PairedComparison(len(common), float(diff.mean()), Interval(float(low), float(high)), p, "paired-bootstrap")

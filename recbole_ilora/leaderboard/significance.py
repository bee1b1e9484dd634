"""Paired significance tests over test users (scipy), and pooling per-user vectors across seeds.

Two models evaluated on the same dataset and seed score the same test users in the same order
(:func:`recbole_ilora.quick_start.run_recbole_ilora` guarantees a deterministic user order), so their
per-user metric vectors are paired. Across seeds the leave-one-out split -- and therefore the set and
order of test users -- does not change (only the sampled negatives and the training do), so when all
vectors have the same length each user's values are averaged over seeds and the test runs on one
value per user (``"mean over seeds"``). If the lengths differ (a protocol where the test users depend on
the seed), the per-seed pairs are concatenated instead (``"concatenated over seeds"``).

Conventions, stated in the table caption:

* Wilcoxon signed-rank (default): ``scipy.stats.wilcoxon(x, y, zero_method="wilcox")``, two-sided;
  users with a zero difference are dropped (the usual Wilcoxon treatment). If *every* difference is
  zero the two models are indistinguishable on these users: scipy has no statistic to compute, and
  the result is defined as ``p = 1``.
* Paired t-test: ``scipy.stats.ttest_rel(x, y)``, two-sided; all-zero differences give ``p = 1`` too.
  Constant non-zero differences (zero variance) have no t statistic: ``p`` is reported as NaN and no
  marker is given.
* No correction for multiple comparisons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

MARKERS = ((0.01, "‡"), (0.05, "†"))  # tightest threshold first
POOL_MEAN = "mean over seeds"
POOL_CONCAT = "concatenated over seeds"


@dataclass(frozen=True)
class PairedTestResult:
    """Outcome of a paired two-sided test of ``x`` against ``y``."""

    method: str
    statistic: float
    p_value: float
    n_pairs: int
    n_nonzero: int
    note: str = ""

    @property
    def marker(self) -> str:
        return significance_marker(self.p_value)


def significance_marker(p_value: float) -> str:
    """``"‡"`` for p < 0.01, ``"†"`` for p < 0.05, else ``""`` (NaN included)."""
    if p_value is None or math.isnan(p_value):
        return ""
    for threshold, marker in MARKERS:
        if p_value < threshold:
            return marker
    return ""


def paired_test(x, y, method: str = "wilcoxon") -> PairedTestResult:
    """Two-sided paired test of per-user values ``x`` against ``y`` (``"wilcoxon"`` or ``"ttest"``)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"Paired vectors must be 1-D of equal length, got shapes {x.shape} and {y.shape}.")
    if x.size == 0:
        raise ValueError("Paired test over zero users.")
    differences = x - y
    n_nonzero = int(np.count_nonzero(differences))
    if n_nonzero == 0:
        return PairedTestResult(method, math.nan, 1.0, x.size, 0, note="all differences are zero: p = 1 by definition")
    if method == "wilcoxon":
        result = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
        return PairedTestResult(method, float(result.statistic), float(result.pvalue), x.size, n_nonzero)
    if method == "ttest":
        if np.ptp(differences) == 0:
            return PairedTestResult(
                method, math.nan, math.nan, x.size, n_nonzero, note="constant non-zero differences: no t statistic"
            )
        result = stats.ttest_rel(x, y, alternative="two-sided")
        return PairedTestResult(method, float(result.statistic), float(result.pvalue), x.size, n_nonzero)
    raise ValueError(f"Unknown paired test {method!r}; use 'wilcoxon' or 'ttest'.")


def pool_pairs(x_by_seed: dict, y_by_seed: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Pair two models' per-user vectors over the seeds both have, as described in the module docstring.

    Returns ``(x, y, pooling)`` where ``pooling`` is :data:`POOL_MEAN` or :data:`POOL_CONCAT`.
    """
    seeds = sorted(set(x_by_seed) & set(y_by_seed))
    if not seeds:
        raise ValueError("The two models share no seed: nothing to pair.")
    xs = [np.asarray(x_by_seed[seed], dtype=float) for seed in seeds]
    ys = [np.asarray(y_by_seed[seed], dtype=float) for seed in seeds]
    for seed, x, y in zip(seeds, xs, ys):
        if x.shape != y.shape:
            raise ValueError(f"Seed {seed}: the models scored different numbers of test users ({x.size} vs {y.size}).")
    if len({x.size for x in xs}) == 1:
        return np.mean(xs, axis=0), np.mean(ys, axis=0), POOL_MEAN
    return np.concatenate(xs), np.concatenate(ys), POOL_CONCAT

"""Small statistics helpers built on statsmodels/scipy (no hand-rolled formulas)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from statsmodels.stats.proportion import proportion_confint


@dataclass(frozen=True)
class Proportion:
    """A rate with its Wilson 95% confidence interval."""

    successes: int
    trials: int
    rate: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.trials})"


def proportion_ci(successes: int, trials: int, alpha: float = 0.05) -> Proportion:
    """Wilson score interval: well-behaved near 0 and 1 and for small n, unlike the normal interval."""
    if trials <= 0:
        return Proportion(successes, trials, float("nan"), float("nan"), float("nan"))
    low, high = proportion_confint(successes, trials, alpha=alpha, method="wilson")
    return Proportion(int(successes), int(trials), successes / trials, float(low), float(high))


def paired_bootstrap(q_new: np.ndarray, q_old: np.ndarray, resamples: int, seed: int,
                     groups: Any = None) -> dict[str, Any]:
    """Mean of ``q_new - q_old`` over states with a 95% bootstrap CI, resampling states (pairs kept together).

    With ``groups`` (e.g. the conversation of each state) whole groups are resampled: the states of one
    conversation share its customer and history, so resampling them one by one would count them as
    independent evidence and give too narrow a CI. The statistic is then sum(diff) / count over the drawn
    groups, which is the mean over states on the original sample.
    """
    from scipy.stats import bootstrap

    q_new, q_old = np.asarray(q_new, float), np.asarray(q_old, float)
    diff = q_new - q_old
    result: dict[str, Any] = {"mean": float(diff.mean()), "n_states": int(len(diff))}
    if groups is not None:
        if len(groups) != len(diff):
            raise ValueError(f"groups has {len(groups)} labels for {len(diff)} states")
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        data = (np.bincount(inverse, weights=diff), np.bincount(inverse).astype(float))
        result.update(n_groups=int(len(data[1])), resampled="groups")

        def stat(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.sum(sums, axis=axis) / np.sum(counts, axis=axis)
    else:
        data = (q_new, q_old)
        result["resampled"] = "states"

        def stat(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.mean(a - b, axis=axis)

    if len(data[0]) < 2 or np.allclose(diff, diff[0]):
        result.update(ci_low=float(diff.mean()), ci_high=float(diff.mean()), method="degenerate")
        return result

    for method in ("BCa", "percentile"):  # BCa can be undefined on tiny samples; percentile always is
        res = bootstrap(data, stat, paired=True, vectorized=True, n_resamples=resamples,
                        confidence_level=0.95, method=method, rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            result.update(ci_low=lo, ci_high=hi, method=method)
            return result
    result.update(ci_low=float("nan"), ci_high=float("nan"), method="failed")
    return result

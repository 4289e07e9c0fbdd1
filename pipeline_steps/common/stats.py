"""Small statistics helpers built on statsmodels/scipy (no hand-rolled formulas)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

"""A/B statistics for two conversion rates, from statsmodels (no hand-rolled formulas)."""

from __future__ import annotations

from typing import Any

from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_effectsize,
    proportions_ztest,
)

from pipeline_steps.common.stats import proportion_ci


def ab_test(control_conversions: int, control_n: int, treatment_conversions: int, treatment_n: int,
            alpha: float = 0.05, power: float = 0.8) -> dict[str, Any]:
    """Conversion per arm with Wilson CIs; absolute and relative lift with a 95% CI (Newcombe, score-based);
    two-sided and one-sided p-values (pooled z-test); the per-arm sample size needed to detect the observed
    lift at ``alpha`` with ``power``. Undefined quantities are ``None`` (JSON null), never inf: the relative
    lift when the control arm has no conversion, the sample size when the observed lift is 0."""
    c = proportion_ci(control_conversions, control_n, alpha)
    t = proportion_ci(treatment_conversions, treatment_n, alpha)
    lift = t.rate - c.rate
    low, high = confint_proportions_2indep(treatment_conversions, treatment_n, control_conversions, control_n,
                                           method="newcomb", compare="diff", alpha=alpha)

    counts, nobs = [treatment_conversions, control_conversions], [treatment_n, control_n]

    def p(alternative: str) -> float:
        """Pooled two-proportion z-test (the textbook test, checkable by hand)."""
        if c.rate == t.rate and c.rate in (0.0, 1.0):
            return 1.0 if alternative == "two-sided" else 0.5
        return float(proportions_ztest(counts, nobs, alternative=alternative)[1])

    if lift != 0:
        effect = proportion_effectsize(t.rate, c.rate)  # Cohen's h
        needed = float(NormalIndPower().solve_power(effect_size=abs(effect), alpha=alpha, power=power, ratio=1.0))
    else:
        needed = None
    return {
        "control": c.as_dict(),
        "treatment": t.as_dict(),
        "lift_abs": lift,
        "lift_rel": lift / c.rate if c.rate > 0 else None,
        "lift_ci_low": float(low),
        "lift_ci_high": float(high),
        "p_value": p("two-sided"),
        "p_value_better": p("larger"),
        "p_value_worse": p("smaller"),
        "sample_size_per_arm_needed": needed,
        "alpha": alpha,
        "power": power,
    }

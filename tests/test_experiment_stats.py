"""The experiment's seed-level statistics (analysis/stats.py) against scipy and a simulation."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lavis_xformer.analysis.stats import minimal_detectable_effect, paired_t_interval, paired_t_power


def test_paired_t_interval_is_scipys_ttest_rel_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(60, 5, size=7), rng.normal(63, 5, size=7)
    mean, low, high = paired_t_interval(a, b)
    reference = scipy_stats.ttest_rel(b, a).confidence_interval(0.95)
    assert mean == pytest.approx(float(np.mean(b - a)))
    assert (low, high) == pytest.approx((reference.low, reference.high), rel=1e-12)


def test_paired_t_power_is_the_rejection_rate_of_scipys_test_in_simulation():
    rng = np.random.default_rng(1)
    effect, sd, n = 2.0, 2.5, 6
    differences = rng.normal(effect, sd, size=(40_000, n))
    rejected = scipy_stats.ttest_1samp(differences, 0.0, axis=1).pvalue < 0.05
    assert paired_t_power(effect, sd, n) == pytest.approx(rejected.mean(), abs=0.01)
    assert paired_t_power(0.0, sd, n) == pytest.approx(0.05, abs=1e-9)  # no effect: the test's level


def test_minimal_detectable_effect_has_the_asked_power_and_shrinks_with_seeds():
    mde6 = minimal_detectable_effect(3.0, 6)
    assert paired_t_power(mde6, 3.0, 6) == pytest.approx(0.8, abs=1e-8)
    # the normal approximation (z_{0.975} + z_{0.8}) sd / sqrt(n) is a lower bound at small n
    assert mde6 > (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * 3.0 / math.sqrt(6)
    assert minimal_detectable_effect(3.0, 12) < mde6
    assert minimal_detectable_effect(6.0, 6) == pytest.approx(2 * mde6, rel=1e-6)  # linear in sd
    assert minimal_detectable_effect(0.0, 6) == 0.0
    with pytest.raises(ValueError, match="at least 2 runs"):
        minimal_detectable_effect(1.0, 1)

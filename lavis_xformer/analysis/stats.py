"""Paired statistics for comparing two models on the same questions.

Both models answered the same questions, so the comparison is paired: the uncertainty that matters is that of the
*difference*, question by question, not of each accuracy on its own.

* ``paired_bootstrap_ci`` -- the percentile bootstrap interval of the accuracy difference, by
  ``scipy.stats.bootstrap(method="percentile")``: questions are resampled with replacement (the same resample for
  both models: the per-question differences are resampled), the mean difference of each resample is recorded, and
  the interval is read off their percentiles. Resample ``r`` draws its ``n`` question indices as
  ``numpy.random.default_rng(seed).integers(0, n, size=n)`` would on its ``r``-th call (scipy draws them in batches,
  bounded here to a few million indices each, which gives the same indices), so the interval is a function of
  ``(scores, num_resamples, seed)`` alone.
* ``mcnemar_exact`` -- McNemar's test on per-question correctness: under the null hypothesis that both models are
  equally accurate, each question that exactly one of them gets right (a discordant pair) is equally likely to
  favour either, so the count favouring one model is Binomial(b + c, 1/2); the two-sided exact p-value is
  ``scipy.stats.binomtest(b, b + c, 0.5)``'s (``min(1, 2 * P(X <= min(b, c)))``).

Scores are per-question accuracies in [0, 1] (VQA's official accuracy gives 0, 0.3, 0.6, 0.9 or 1); differences
are reported in percentage points. McNemar needs a yes/no per question: ``is_correct`` calls a question correct
when its score is at least ``CORRECT_AT`` (0.5: for VQAv2, at least two of the ten annotators gave that answer;
for exact-match scores, the answer matched).
"""

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy.stats import binomtest, bootstrap

CORRECT_AT = 0.5
DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
# Index draws per scipy batch: bounds the memory of one batch (8 bytes each) whatever the number of questions.
_DRAWS_PER_CHUNK = 4_000_000


def _paired_arrays(scores_a: Sequence[float], scores_b: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired scores must be two 1-d sequences of equal length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired scores are empty: no question to compare on")
    return a, b


def is_correct(scores: Sequence[float]) -> np.ndarray:
    """Per-question correctness for McNemar's test: score >= ``CORRECT_AT``."""
    return np.asarray(scores, dtype=np.float64) >= CORRECT_AT


def bootstrap_differences(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    num_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """``mean(b) - mean(a)`` (percentage points) on each of ``num_resamples`` paired resamples of the questions."""
    return _bootstrap(scores_a, scores_b, num_resamples, DEFAULT_CONFIDENCE, seed).bootstrap_distribution


def _bootstrap(scores_a, scores_b, num_resamples, confidence, seed):
    a, b = _paired_arrays(scores_a, scores_b)
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    per_question = 100.0 * (b - a)
    return bootstrap(
        (per_question,), np.mean, n_resamples=num_resamples, batch=max(1, _DRAWS_PER_CHUNK // per_question.size),
        vectorized=True, confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
    )


def paired_bootstrap_ci(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Tuple[float, float]:
    """The percentile bootstrap interval of ``mean(b) - mean(a)`` in percentage points."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    interval = _bootstrap(scores_a, scores_b, num_resamples, confidence, seed).confidence_interval
    return float(interval.low), float(interval.high)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Two-sided exact p-value of ``k`` successes in ``n`` fair coin flips: ``min(1, 2 P(X <= min(k, n-k)))``."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0  # no discordant question: nothing tells the models apart
    return float(binomtest(k, n, 0.5, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class McNemarResult:
    only_a_correct: int  #: b: questions model A gets right and model B gets wrong
    only_b_correct: int  #: c: questions model B gets right and model A gets wrong
    p_value: float  #: two-sided exact binomial test on the b + c discordant questions


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemarResult:
    """McNemar's exact test on paired per-question correctness (booleans)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired correctness must be two 1-d sequences of equal length, got {a.shape} and {b.shape}")
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    return McNemarResult(only_a, only_b, binomial_two_sided_p(only_a, only_a + only_b))


@dataclass(frozen=True)
class PairedComparison:
    """Model B against model A on the same questions; differences are B - A in percentage points."""

    num_questions: int
    accuracy_a: float
    accuracy_b: float
    mean_difference: float
    ci_low: float
    ci_high: float
    confidence: float
    num_resamples: int
    seed: int
    mcnemar: McNemarResult

    def to_dict(self) -> Dict:
        return asdict(self)


def compare_paired(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> PairedComparison:
    """Everything the comparison table reports for one pair of models on one benchmark."""
    a, b = _paired_arrays(scores_a, scores_b)
    low, high = paired_bootstrap_ci(a, b, num_resamples, confidence, seed)
    return PairedComparison(
        num_questions=int(a.size),
        accuracy_a=float(100.0 * a.mean()),
        accuracy_b=float(100.0 * b.mean()),
        mean_difference=float(100.0 * (b - a).mean()),
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        num_resamples=num_resamples,
        seed=seed,
        mcnemar=mcnemar_exact(is_correct(a), is_correct(b)),
    )


# ================================================================================================================
# Over repeated runs (seeds)
# ================================================================================================================
def mean_t_interval(
    values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE
) -> Tuple[float, Optional[float], Optional[float]]:
    """(mean, low, high): Student's t interval of the mean of independent runs (e.g. one value per seed);
    ``low = high = None`` with fewer than two runs (no spread to estimate)."""
    from scipy import stats as scipy_stats

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty 1-d sequence of per-run values, got shape {x.shape}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, None, None
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_t_p_value(values_a: Sequence[float], values_b: Sequence[float]) -> Optional[float]:
    """Two-sided p-value of the paired t-test of ``b - a`` over runs (None with fewer than two runs; 1.0 when every
    difference is the same zero, NaN-free)."""
    from scipy import stats as scipy_stats

    a, b = _paired_arrays(values_a, values_b)
    if a.size < 2:
        return None
    differences = b - a
    if np.all(differences == differences[0]):
        return 1.0 if differences[0] == 0 else 0.0
    return float(scipy_stats.ttest_rel(b, a).pvalue)


def paired_t_interval(
    values_a: Sequence[float], values_b: Sequence[float], confidence: float = DEFAULT_CONFIDENCE
) -> Tuple[float, Optional[float], Optional[float]]:
    """(mean, low, high) of the paired differences ``b - a`` over runs (the seed is the unit): Student's t interval
    with n - 1 degrees of freedom, as ``scipy.stats.ttest_rel(b, a).confidence_interval``; no interval under 2 runs."""
    a, b = _paired_arrays(values_a, values_b)
    return mean_t_interval(b - a, confidence)


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 1 - DEFAULT_CONFIDENCE) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` over ``n`` runs to detect a true mean difference
    ``effect`` when the differences have standard deviation ``sd``: P(|T| > t_crit) under the noncentral t with
    n - 1 degrees of freedom and noncentrality ``effect * sqrt(n) / sd``."""
    from scipy import stats as scipy_stats

    if n < 2:
        raise ValueError(f"the paired t-test needs at least 2 runs, got {n}")
    if sd <= 0:
        return 1.0 if effect != 0 else alpha
    df, noncentrality = n - 1, effect * math.sqrt(n) / sd
    critical = scipy_stats.t.ppf(1 - alpha / 2, df)
    power = float(scipy_stats.nct.sf(critical, df, noncentrality) + scipy_stats.nct.cdf(-critical, df, noncentrality))
    if math.isnan(power):  # scipy's noncentral t fails far in the tail at 1-2 degrees of freedom: power is ~1 there
        power = float(scipy_stats.norm.sf(critical - abs(noncentrality)))
    return power


def minimal_detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = 1 - DEFAULT_CONFIDENCE) -> float:
    """The smallest true mean difference the two-sided paired t-test over ``n`` runs detects with probability
    ``power`` (``paired_t_power`` solved for the effect), given the differences' standard deviation ``sd``; in the
    units of ``sd``. 0 when the differences do not vary."""
    from scipy.optimize import brentq

    if n < 2:
        raise ValueError(f"the paired t-test needs at least 2 runs, got {n}")
    if not alpha < power < 1:
        raise ValueError(f"power must lie in (alpha, 1), got {power}")
    if sd <= 0:
        return 0.0
    high = sd
    while paired_t_power(high, sd, n, alpha) < power:
        high *= 2
    return float(brentq(lambda effect: paired_t_power(effect, sd, n, alpha) - power, 0.0, high, xtol=1e-10 * sd))

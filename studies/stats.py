"""Is a difference larger than the noise? Small statistics for the results table.

A result from one seed mixes the effect under study (the backend, or one recipe step) with
seed-to-seed noise: the starting weights, the batch order and the augmentation draws. The
functions here put an interval around a mean or a difference, so that a report can say
"tensorflow higher by 1.3 points" only when the interval excludes 0.

- Over seeds: `mean_interval` (one configuration), `paired_difference` (two configurations
  run with the same seeds: the same seed gives the same starting weights and batches, so the
  per-seed difference cancels the noise the two runs share) and `unpaired_difference` (Welch,
  when the seeds do not match).
- Over test images, for one seed: `mcnemar` (exact test on the images the two runs disagree
  on) and `paired_bootstrap` (interval of the accuracy difference).
- Wording: `verdict` (a sentence) and `cell` (a Markdown table cell).

Pure Python and NumPy: no Keras, and no SciPy (it is not a dependency of this project, only
something jax brings), so the Student-t quantile is computed here (`t_critical`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Interval",
    "cell",
    "mcnemar",
    "mean_interval",
    "paired_bootstrap",
    "paired_difference",
    "t_critical",
    "unpaired_difference",
    "verdict",
]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean (or a difference) and its two-sided interval at `confidence`.

    `n` is the number of values behind it: seeds for the t intervals, test images for the
    bootstrap. `low` and `high` are None when there is no interval (one seed)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float = 0.95

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (False with no interval)."""
        return self.has_interval and (self.low > 0 or self.high < 0)


# ---------------------------------------------------------------------------------------------
# Student t quantile (no SciPy)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's continued fraction for the incomplete beta function (Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0 and Student's T with `df` degrees of freedom."""
    return 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_critical(confidence: float, df: float) -> float:
    """The two-sided Student-t critical value: P(|T| <= value) = confidence.

    Used instead of the normal 1.96 because the seeds are few (3 to 5): with 3 seeds the
    95% value is 4.30, and 1.96 would give an interval less than half as wide as it should be.
    `df` may be fractional (Welch)."""
    _check_confidence(confidence)
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = (1.0 - confidence) / 2.0
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > tail:
        low, high = high, high * 2.0
    for _ in range(200):  # bisection down to the float spacing
        middle = (low + high) / 2.0
        if middle in (low, high):
            break
        if _t_upper_tail(middle, df) > tail:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


# ---------------------------------------------------------------------------------------------
# Intervals over seeds


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """The mean over seeds and its Student-t interval (mean ± t · s / sqrt(n)).

    This is the uncertainty of the mean of the configuration, as far as the seeds sample
    it; one seed gives the mean with no interval (low and high None)."""
    _check_confidence(confidence)
    x = _finite_1d(values, "values")
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, None, None, n, confidence)
    half = t_critical(confidence, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> Interval:
    """The mean of the per-seed differences a[i] - b[i] with its t interval.

    a[i] and b[i] must come from the same seed: the same starting weights and batches, so
    whatever the seed does to both runs cancels in the difference, and the interval only
    holds the noise that is not shared. Fewer than 2 seeds: no interval."""
    x, y = _finite_1d(a, "a"), _finite_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired values need one value per seed on both sides, got {len(x)} and {len(y)}")
    return mean_interval(x - y, confidence)


def unpaired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> Interval:
    """mean(a) - mean(b) with a Welch t interval: for runs whose seeds do not correspond.

    Wider than `paired_difference` when the seeds share noise, since nothing cancels.
    `n` is the smaller group size; no interval when either group has fewer than 2 values."""
    _check_confidence(confidence)
    x, y = _finite_1d(a, "a"), _finite_1d(b, "b")
    difference = float(x.mean() - y.mean())
    n = min(len(x), len(y))
    if n < 2:
        return Interval(difference, None, None, n, confidence)
    vx, vy = float(x.var(ddof=1)) / len(x), float(y.var(ddof=1)) / len(y)
    if vx + vy == 0.0:
        return Interval(difference, difference, difference, n, confidence)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = t_critical(confidence, df) * math.sqrt(vx + vy)
    return Interval(difference, difference - half, difference + half, n, confidence)


# ---------------------------------------------------------------------------------------------
# One seed, two runs, the same test images


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> dict:
    """Exact McNemar test of two runs scored on the same test images (one seed).

    Only the images on which the runs disagree carry information about which is better:
    b10 (a right, b wrong) and b01 (a wrong, b right). Under "no difference" each
    disagreement goes either way with probability 1/2, so the two-sided p-value is
    2 · P(X <= min(b01, b10)) for X ~ Binomial(b01 + b10, 1/2), capped at 1; it is 1 when
    the runs never disagree. Returns n, b01, b10, accuracy_a, accuracy_b, difference
    (accuracy_a - accuracy_b, a fraction) and p_value."""
    x, y = _correctness_pair(correct_a, correct_b)
    b10 = int(np.count_nonzero(x & ~y))
    b01 = int(np.count_nonzero(~x & y))
    discordant = b01 + b10
    # Integer sums and one correctly rounded division: exact for any test-set size.
    tail = sum(math.comb(discordant, k) for k in range(min(b01, b10) + 1))
    p_value = min(1.0, 2 * tail / 2**discordant)
    n = len(x)
    accuracy_a, accuracy_b = float(x.mean()), float(y.mean())
    return {
        "n": n,
        "b01": b01,
        "b10": b10,
        "accuracy_a": accuracy_a,
        "accuracy_b": accuracy_b,
        "difference": (b10 - b01) / n,
        "p_value": p_value,
    }


def paired_bootstrap(
    correct_a: Sequence[bool] | np.ndarray,
    correct_b: Sequence[bool] | np.ndarray,
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Percentile bootstrap interval of accuracy_a - accuracy_b over the test images.

    Each resample draws the test images with replacement and scores both runs on the same
    draw, so the interval reflects how much the difference depends on which images happened
    to be in the test set (not seed noise). Deterministic for a given `seed`. `mean` is the
    observed difference and `n` the number of test images.

    Only the image kinds matter (a right and b wrong, the reverse, or concordant), so drawing
    the counts of each kind from a multinomial is the same distribution as drawing image
    indices, in O(resamples) memory instead of O(resamples x images)."""
    _check_confidence(confidence)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    x, y = _correctness_pair(correct_a, correct_b)
    n = len(x)
    b10 = int(np.count_nonzero(x & ~y))
    b01 = int(np.count_nonzero(~x & y))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [b10 / n, b01 / n, (n - b10 - b01) / n], size=resamples)
    differences = (counts[:, 0] - counts[:, 1]) / n
    alpha = 1.0 - confidence
    low, high = np.quantile(differences, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Interval((b10 - b01) / n, float(low), float(high), n, confidence)


# ---------------------------------------------------------------------------------------------
# Wording


def verdict(
    interval: Interval,
    first: str = "a",
    second: str = "b",
    *,
    scale: float = 100.0,
    unit: str = "points",
    decimals: int = 1,
    noise: str = "seed-to-seed noise",
) -> str:
    """One sentence on a difference `first - second`, for a report.

    The defaults read an accuracy difference stored as a fraction in percentage points
    (scale 100); pass scale=1 and unit="s" for seconds, and noise="test-set sampling noise"
    for a bootstrap interval. Examples:
    "not distinguishable from seed-to-seed noise (tensorflow minus torch +0.2 points, 95%
    interval -0.8 to +1.2 includes 0)"; "tensorflow higher by 1.3 points (95% interval +0.4
    to +2.2)"; with one seed, the difference and "no interval"."""
    level = f"{interval.confidence * 100:g}%"

    def signed(value: float) -> str:
        return f"{round(value * scale, decimals) + 0.0:+.{decimals}f}"

    if not interval.has_interval:
        return (
            f"{first} minus {second} {signed(interval.mean)} {unit} from {interval.n} "
            f"{'seed' if interval.n == 1 else 'seeds'}: no {level} interval (it needs at least 2 seeds)"
        )
    if not interval.excludes_zero:
        return (
            f"not distinguishable from {noise} ({first} minus {second} {signed(interval.mean)} {unit}, "
            f"{level} interval {signed(interval.low)} to {signed(interval.high)} includes 0)"
        )
    if interval.low > 0:
        winner, size, low, high = first, interval.mean, interval.low, interval.high
    else:  # The second is higher: state the difference the other way round, positive.
        winner, size, low, high = second, -interval.mean, -interval.high, -interval.low
    return (
        f"{winner} higher by {abs(round(size * scale, decimals)):.{decimals}f} {unit} "
        f"({level} interval {signed(low)} to {signed(high)})"
    )


def cell(interval: Interval, scale: float = 100.0, decimals: int = 1) -> str:
    """A Markdown table cell: "94.1 [93.2, 95.0]" (mean [low, high]), or "94.1" with no interval.

    The bracket form, not "94.1 ± 0.9": "±" is read as a standard deviation, a standard error
    or an interval half-width depending on the reader, and it cannot show an asymmetric
    (bootstrap) interval. The confidence level belongs in the table's caption. The default
    scale shows a fraction in percent."""

    def number(value: float) -> str:
        return f"{round(value * scale, decimals) + 0.0:.{decimals}f}"

    if not interval.has_interval:
        return number(interval.mean)
    return f"{number(interval.mean)} [{number(interval.low)}, {number(interval.high)}]"


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")


def _finite_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds a non-finite value (a failed run?): {x.tolist()}")
    return x


def _correctness_pair(
    correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean arrays of per-image correctness, one entry per test image, same order."""
    arrays = []
    for name, values in (("correct_a", correct_a), ("correct_b", correct_b)):
        x = np.asarray(values)
        if x.ndim != 1 or len(x) == 0:
            raise ValueError(
                f"{name} must be a non-empty 1-D array (one entry per test image), got shape {x.shape}"
            )
        if x.dtype != bool:
            if not np.isin(x, (0, 1)).all():
                raise ValueError(
                    f"{name} must be boolean (or 0/1): whether each test image was classified right"
                )
            x = x.astype(bool)
        arrays.append(x)
    if arrays[0].shape != arrays[1].shape:
        raise ValueError(
            f"both runs must be scored on the same test images, got {len(arrays[0])} and {len(arrays[1])}"
        )
    return arrays[0], arrays[1]

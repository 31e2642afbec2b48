"""studies.stats: intervals over seeds, McNemar and the bootstrap over test images, the wording.

Expected values are computed by hand (closed forms, exact binomial sums), not by the module."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from studies.stats import (
    Interval,
    cell,
    mcnemar,
    mean_interval,
    paired_bootstrap,
    paired_difference,
    t_critical,
    unpaired_difference,
    verdict,
)
from tests.conftest import ROOT

# t(0.975, 2) from its closed form (2p - 1) / sqrt(2p(1 - p)), p = 0.975, to 16 digits. (The
# value 4.302652729911275 found in some tables is off in the 10th digit.)
T_975_2 = 4.302652729749464


def correctness(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of runs a and b with the given counts of each kind of image."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return np.array(a), np.array(b)


# --- t quantile -------------------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.99, 0.999])
def test_t_critical_matches_the_closed_forms_for_1_and_2_degrees_of_freedom(confidence):
    p = (1 + confidence) / 2
    assert t_critical(confidence, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    assert t_critical(confidence, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)


def test_t_critical_table_values():
    assert t_critical(0.95, 2) == pytest.approx(T_975_2, rel=1e-13)
    assert t_critical(0.95, 4) == pytest.approx(2.7764451051977934, rel=1e-12)
    assert t_critical(0.99, 3) == pytest.approx(5.840909309733355, rel=1e-12)
    # Large df: the normal quantile.
    assert t_critical(0.95, 1e4) == pytest.approx(1.959963984540054, rel=1e-3)
    assert t_critical(0.95, 2.5) < t_critical(0.95, 2) < t_critical(0.95, 1.5)


def test_t_critical_agrees_with_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4.7, 9, 30):
        for confidence in (0.8, 0.95, 0.99):
            assert t_critical(confidence, df) == pytest.approx(
                stats.t.ppf((1 + confidence) / 2, df), rel=1e-11
            )


def test_bad_confidence_or_df_raises():
    with pytest.raises(ValueError, match="confidence"):
        t_critical(1.0, 3)
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([0.9, 0.91], confidence=95)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_critical(0.95, 0)


# --- intervals over seeds -----------------------------------------------------------------------


def test_mean_interval_by_hand():
    interval = mean_interval([0.90, 0.92, 0.94])
    half = T_975_2 * 0.02 / math.sqrt(3)  # sample sd 0.02
    assert interval.n == 3 and interval.confidence == 0.95
    assert interval.mean == pytest.approx(0.92, abs=1e-15)
    assert interval.low == pytest.approx(0.92 - half, abs=1e-12)
    assert interval.high == pytest.approx(0.92 + half, abs=1e-12)
    assert interval.low == pytest.approx(0.870317, abs=1e-6)
    assert interval.excludes_zero


def test_mean_interval_other_confidence_is_wider():
    wide, narrow = mean_interval([0.90, 0.92, 0.94], 0.99), mean_interval([0.90, 0.92, 0.94], 0.9)
    assert wide.high - wide.low == pytest.approx(2 * 9.924843200918287 * 0.02 / math.sqrt(3), rel=1e-10)
    assert narrow.high - narrow.low == pytest.approx(2 * 2.9199855803537242 * 0.02 / math.sqrt(3), rel=1e-10)


def test_one_seed_has_no_interval():
    interval = mean_interval([0.9123])
    assert interval == Interval(0.9123, None, None, 1, 0.95)
    assert not interval.has_interval and not interval.excludes_zero
    assert paired_difference([0.93], [0.92]).low is None
    assert paired_difference([0.93], [0.92]).mean == pytest.approx(0.01)


def test_identical_seeds_give_a_zero_width_interval():
    interval = mean_interval([0.9, 0.9, 0.9])
    assert (interval.low, interval.mean, interval.high) == pytest.approx((0.9, 0.9, 0.9))


def test_bad_values_raise():
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_interval([0.9, float("nan")])
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([0.9, 0.91], [0.9])


def test_paired_difference_by_hand():
    a, b = [0.93, 0.95, 0.94], [0.92, 0.93, 0.94]  # differences 0.01, 0.02, 0.00
    interval = paired_difference(a, b)
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert interval.mean == pytest.approx(0.01, abs=1e-12)
    assert (interval.low, interval.high) == pytest.approx((0.01 - half, 0.01 + half), abs=1e-12)
    assert not interval.excludes_zero


def test_pairing_is_narrower_when_the_seeds_share_noise():
    # Each seed moves both backends by the same amount (shared starting weights and batches);
    # tensorflow is 0.5 points higher, and each run adds a small noise of its own.
    shared = np.array([0.012, -0.009, 0.004, -0.015, 0.008])
    own_a = np.array([0.0004, -0.0003, 0.0002, 0.0001, -0.0004])
    own_b = np.array([-0.0002, 0.0003, -0.0001, 0.0004, -0.0003])
    a, b = 0.925 + shared + own_a, 0.920 + shared + own_b
    paired, unpaired = paired_difference(a, b), unpaired_difference(a, b)
    assert paired.mean == pytest.approx(unpaired.mean) == pytest.approx(0.005 + (own_a - own_b).mean())
    assert paired.high - paired.low < (unpaired.high - unpaired.low) / 10
    assert paired.excludes_zero and not unpaired.excludes_zero


def test_unpaired_difference_is_welch():
    a, b = [0.90, 0.92, 0.94], [0.80, 0.81, 0.82, 0.83]
    va, vb = 0.02**2 / 3, np.var(b, ddof=1) / 4
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    interval = unpaired_difference(a, b)
    half = t_critical(0.95, df) * math.sqrt(va + vb)
    assert 3.2 < df < 3.3
    assert interval.mean == pytest.approx(0.92 - 0.815)
    assert (interval.low, interval.high) == pytest.approx((interval.mean - half, interval.mean + half))
    assert interval.n == 3
    assert unpaired_difference([0.9], [0.8, 0.85]).low is None


def test_unpaired_difference_agrees_with_scipy_welch_when_installed():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.90, 0.92, 0.94], [0.80, 0.81, 0.82, 0.83]
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    interval = unpaired_difference(a, b)
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high), rel=1e-10)


# --- McNemar -----------------------------------------------------------------------------------


def test_mcnemar_exact_binomial_value():
    a, b = correctness(both=50, a_only=2, b_only=10, neither=8)
    result = mcnemar(a, b)
    # 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert result["p_value"] == 0.03857421875 == 2 * 79 / 4096
    assert (result["b01"], result["b10"], result["n"]) == (10, 2, 70)
    assert result["accuracy_a"] == pytest.approx(52 / 70)
    assert result["accuracy_b"] == pytest.approx(60 / 70)
    assert result["difference"] == pytest.approx(-8 / 70)
    swapped = mcnemar(b, a)
    assert swapped["p_value"] == result["p_value"]
    assert (swapped["b01"], swapped["b10"]) == (2, 10)
    assert swapped["difference"] == pytest.approx(8 / 70)


@pytest.mark.parametrize(
    ("a_only", "b_only", "expected"),
    [
        (6, 0, 2 / 64),  # all 6 disagreements one way
        (1, 0, 1.0),  # 2 * 1/2, capped
        (5, 5, 1.0),  # balanced: 2 * P(X <= 5 | 10) > 1, capped
        (3, 9, 2 * (1 + 12 + 66 + 220) / 4096),
        (40, 60, None),  # large: checked against the sum below
    ],
)
def test_mcnemar_p_values(a_only, b_only, expected):
    a, b = correctness(both=100, a_only=a_only, b_only=b_only, neither=7)
    n = a_only + b_only
    if expected is None:
        expected = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n)
        assert 0.05 < expected < 0.06
    assert mcnemar(a, b)["p_value"] == pytest.approx(expected, rel=1e-14)


def test_mcnemar_without_discordant_pairs_is_p_1():
    a, b = correctness(both=30, a_only=0, b_only=0, neither=5)
    result = mcnemar(a, b)
    assert result["p_value"] == 1.0
    assert (result["b01"], result["b10"], result["difference"]) == (0, 0, 0.0)


def test_mcnemar_against_scipy_binomtest_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for a_only, b_only in ((2, 10), (17, 31), (0, 9), (120, 150)):
        a, b = correctness(both=200, a_only=a_only, b_only=b_only, neither=20)
        expected = stats.binomtest(b_only, a_only + b_only, 0.5).pvalue
        assert mcnemar(a, b)["p_value"] == pytest.approx(expected, rel=1e-10)


def test_correctness_inputs_are_checked():
    assert mcnemar([1, 0, 1], [1, 1, 1])["b01"] == 1  # 0/1 integers are accepted
    with pytest.raises(ValueError, match="same test images"):
        mcnemar([True, False], [True])
    with pytest.raises(ValueError, match="boolean"):
        mcnemar([0, 2], [1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [])


# --- paired bootstrap ---------------------------------------------------------------------------


def test_bootstrap_is_deterministic_per_seed():
    a, b = correctness(both=300, a_only=25, b_only=12, neither=40)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    # The differences are multiples of 1/377, so the 10,000-draw quantiles of nearby seeds
    # often tie: small draws show that the seed is used.
    small = {paired_bootstrap(a, b, resamples=40, seed=seed) for seed in range(6)}
    assert len(small) > 1
    assert all(s.low == pytest.approx(0.0027, abs=0.02) for s in small)


def test_bootstrap_interval_contains_the_observed_difference_and_has_the_expected_width():
    a, b = correctness(both=300, a_only=25, b_only=12, neither=40)
    n = len(a)
    interval = paired_bootstrap(a, b, resamples=20_000)
    observed = (25 - 12) / n
    assert interval.mean == pytest.approx(observed) and interval.n == n
    assert interval.low < observed < interval.high
    # The normal approximation: difference ± 1.96 * sd(per-image difference) / sqrt(n).
    d = a.astype(float) - b.astype(float)
    half = 1.959963984540054 * d.std() / math.sqrt(n)
    assert interval.low == pytest.approx(observed - half, abs=0.004)
    assert interval.high == pytest.approx(observed + half, abs=0.004)
    assert interval.excludes_zero


def test_bootstrap_shrinks_with_more_images():
    small = paired_bootstrap(*correctness(both=60, a_only=6, b_only=3, neither=11))
    large = paired_bootstrap(*correctness(both=600, a_only=60, b_only=30, neither=110))
    assert small.mean == pytest.approx(large.mean)
    ratio = (small.high - small.low) / (large.high - large.low)
    assert ratio == pytest.approx(math.sqrt(10), rel=0.15)  # width goes as 1/sqrt(n)


def test_bootstrap_without_discordant_pairs_is_zero():
    interval = paired_bootstrap(*correctness(both=50, a_only=0, b_only=0, neither=5))
    assert (interval.low, interval.mean, interval.high) == (0.0, 0.0, 0.0)
    assert not interval.excludes_zero


def test_bootstrap_matches_resampling_image_indices():
    """The multinomial shortcut gives the same interval as drawing image indices."""
    a, b = correctness(both=150, a_only=14, b_only=6, neither=30)
    rng = np.random.default_rng(11)
    d = a.astype(float) - b.astype(float)
    by_index = d[rng.integers(0, len(d), size=(20_000, len(d)))].mean(axis=1)
    low, high = np.quantile(by_index, [0.025, 0.975])
    interval = paired_bootstrap(a, b, resamples=20_000)
    assert (interval.low, interval.high) == pytest.approx((low, high), abs=0.006)


# --- wording ------------------------------------------------------------------------------------


def test_verdict_when_the_interval_includes_zero():
    interval = Interval(0.002, -0.008, 0.012, 3)
    assert verdict(interval, "tensorflow", "torch") == (
        "not distinguishable from seed-to-seed noise "
        "(tensorflow minus torch +0.2 points, 95% interval -0.8 to +1.2 includes 0)"
    )


def test_verdict_when_the_first_is_higher():
    assert verdict(Interval(0.013, 0.004, 0.022, 5), "tensorflow", "torch") == (
        "tensorflow higher by 1.3 points (95% interval +0.4 to +2.2)"
    )


def test_verdict_when_the_second_is_higher_states_it_the_other_way_round():
    assert verdict(Interval(-0.013, -0.022, -0.004, 5), "tensorflow", "torch") == (
        "torch higher by 1.3 points (95% interval +0.4 to +2.2)"
    )


def test_verdict_from_computed_intervals():
    # Differences 1.4, 1.2, 1.5 points: sd 0.153, half-width 4.303 * 0.153 / sqrt(3) = 0.38.
    tensorflow, torch = [0.945, 0.951, 0.948], [0.931, 0.939, 0.933]
    assert verdict(paired_difference(tensorflow, torch), "tensorflow", "torch").startswith(
        "tensorflow higher by 1.4 points (95% interval +1.0 to +1.7)"
    )
    assert verdict(paired_difference([0.93, 0.95, 0.94], [0.92, 0.93, 0.94])).startswith(
        "not distinguishable from seed-to-seed noise (a minus b +1.0 points"
    )


def test_verdict_with_one_seed_says_there_is_no_interval():
    assert verdict(paired_difference([0.93], [0.92]), "jax", "torch") == (
        "jax minus torch +1.0 points from 1 seed: no 95% interval (it needs at least 2 seeds)"
    )


def test_verdict_units_noise_and_confidence():
    seconds = Interval(-12.34, -15.0, -9.5, 4, confidence=0.9)
    assert verdict(seconds, "jax", "torch", scale=1, unit="s", decimals=2) == (
        "torch higher by 12.34 s (90% interval +9.50 to +15.00)"
    )
    tie = Interval(-0.0004, -0.01, 0.009, 394)
    assert verdict(tie, noise="test-set sampling noise") == (
        "not distinguishable from test-set sampling noise (a minus b +0.0 points, 95% interval -1.0 to +0.9 includes 0)"
    )


def test_cell():
    assert cell(mean_interval([0.9123])) == "91.2"
    assert cell(Interval(0.941, 0.932, 0.950, 3)) == "94.1 [93.2, 95.0]"
    assert cell(mean_interval([0.90, 0.92, 0.94])) == "92.0 [87.0, 97.0]"
    assert cell(Interval(12.345, 11.0, 13.69, 3), scale=1, decimals=2) == "12.35 [11.00, 13.69]"
    assert cell(Interval(-0.0001, -0.004, 0.003, 3)) == "0.0 [-0.4, 0.3]"  # no "-0.0"


def test_the_module_imports_no_keras_and_no_scipy():
    code = "import sys, studies.stats; print(sorted(m for m in ('keras', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

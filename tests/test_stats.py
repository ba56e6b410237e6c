"""The leaderboard's statistics against textbook cases."""

import math

import pytest

from harness.stats import mean_ci, paired_p_value, welch_p_value


def test_confidence_interval_of_a_mean():
    """[10, 12, 14]: mean 12, s = 2, t(0.975, 2) = 4.3027 -> half-width 4.3027 * 2 / sqrt(3) = 4.968."""
    mean, half = mean_ci([10.0, 12.0, 14.0])
    assert mean == 12.0 and half == pytest.approx(4.968, abs=1e-3)
    assert math.isnan(mean_ci([3.0])[1])


def test_paired_t_test_on_a_known_difference():
    """Differences 1..5: mean 3, s = 1.5811, t = 3 / (1.5811 / sqrt 5) = 4.2426 with 4 df: p = 0.0132."""
    b = [10.0, 11.0, 9.0, 12.0, 10.0]
    a = [x + d for x, d in zip(b, [1, 2, 3, 4, 5], strict=True)]
    assert paired_p_value(a, b) == pytest.approx(0.0132, abs=2e-4)
    assert paired_p_value(a, b[:4]) != paired_p_value(a, b[:4])  # nan: the windows do not pair
    noisy = [x + d for x, d in zip(b, [0.5, -0.4, 0.3, -0.6, 0.1], strict=True)]
    assert paired_p_value(noisy, b) > 0.5  # a difference that averages out is not significant


def test_welch_test_on_a_textbook_example():
    """Wikipedia's "Welch's t-test", example 1 (two samples of 15, unequal variances): t = -2.46, df = 25.0,
    p = 0.021."""
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    assert welch_p_value(a, b) == pytest.approx(0.021, abs=5e-4)
    assert math.isnan(welch_p_value(a, [3.0]))  # one seed has no spread to compare with

"""Bootstrap intervals over images: coverage of a known distribution, seeding, the per-group table; the normal
interval of a difference of means."""

import numpy as np
import pandas as pd
import pytest

from taxotrait.intervals import bootstrap_interval, clears, difference_interval, mean_with_intervals


def test_bootstrap_interval_covers_the_mean_of_a_known_distribution():
    rng = np.random.default_rng(1)
    # one sample: the interval holds the true mean, about +-1.96 sigma / sqrt(n) wide
    values = rng.normal(0.3, 1.0, 400)
    low, high = bootstrap_interval(values)
    assert low < 0.3 < high and high - low == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.15)
    # over many samples of hits (a pointing game of 40 images, p = 0.3) it covers the mean about 95 % of the time
    covered = [low <= 0.3 <= high for low, high in
               (bootstrap_interval(rng.random(40) < 0.3, resamples=500, seed=k) for k in range(300))]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_interval_is_seeded_and_handles_degenerate_inputs():
    values = np.random.default_rng(0).random(25)
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values)
    assert bootstrap_interval([0.5]) == (0.5, 0.5)
    assert all(np.isnan(bootstrap_interval([])))


def test_mean_with_intervals_per_group_and_clears():
    table = pd.DataFrame({"method": ["a"] * 50 + ["b"] * 30, "hit": [1.0] * 40 + [0.0] * 10 + [0.0] * 25 + [1.0] * 5})
    summary = mean_with_intervals(table, ["method"], {"rate": "hit"}).set_index("method")
    assert list(summary.columns) == ["rate", "rate_low", "rate_high", "n_images"]
    assert summary.loc["a", "rate"] == 0.8 and summary.loc["b", "n_images"] == 30
    assert (summary["rate_low"] <= summary["rate"]).all() and (summary["rate"] <= summary["rate_high"]).all()
    a, b = (tuple(summary.loc[m, ["rate_low", "rate_high"]]) for m in "ab")
    assert clears(a, b) and not clears(b, a) and clears(b, a, higher_is_better=False)
    assert not clears((0.4, 0.6), (0.5, 0.7)) and not clears((0.4, 0.6), (0.5, 0.7), higher_is_better=False)


def test_the_difference_interval_is_welchs_normal_one_at_the_confidence():
    low, high = difference_interval(np.array([3.0, 1.0]), np.array([4.0, np.nan]), np.array([16, 1]),
                                    np.array([1.0, 0.0]), np.array([9.0, 1.0]), np.array([9, 4]))
    error = 1.959964 * np.sqrt(4 / 16 + 9 / 9)  # 95 %: z of the normal's 97.5th percentile
    assert low[0] == pytest.approx(2 - error) and high[0] == pytest.approx(2 + error)
    assert np.isnan(low[1]) and np.isnan(high[1])  # one value: no variance, no interval
    narrow = difference_interval(3.0, 4.0, 16, 1.0, 9.0, 9, confidence=0.5)
    assert narrow[0] > low[0] and narrow[1] < high[0]

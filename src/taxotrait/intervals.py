"""Bootstrap confidence intervals over images, for every score the evaluation tables report.

A score is a mean over images (an AUC, a hit, a share); its interval resamples the images with replacement
(`RESAMPLES` times, seeded) and takes the percentile interval of the resampled means (`CONFIDENCE`: 95 %). Each
table gives a score's interval as two columns beside it, ``<score>_low`` and ``<score>_high``. Where one interval per
group of many groups is needed at once (the key's separations), `difference_interval` gives the normal one of a
difference of two means, vectorised.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


def bootstrap_interval(values, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = SEED) -> tuple[float, float]:
    """The percentile bootstrap interval (low, high) of the mean of `values` [n] (one value per image); NaN for no
    values, the value itself for one."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if not len(values):
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    means = values[draws].mean(1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def difference_interval(mean_a, var_a, n_a, mean_b, var_b, n_b,
                        confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """The normal interval (low, high) of mean_a - mean_b, two means of independent samples with unequal variances
    (sample variances `var_*` of `n_*` values); arrays or columns alike; NaN where a variance is NaN (a sample of
    one value)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    difference = np.asarray(mean_a) - np.asarray(mean_b)
    error = z * np.sqrt(np.asarray(var_a) / np.asarray(n_a) + np.asarray(var_b) / np.asarray(n_b))
    return difference - error, difference + error


def interval_columns(columns) -> list[str]:
    """`columns` each followed by its interval's columns: [c, c_low, c_high, ...]."""
    return [name for column in columns for name in (column, f"{column}_low", f"{column}_high")]


def mean_with_intervals(table: pd.DataFrame, by: list[str], columns: dict[str, str],
                        seed: int = SEED) -> pd.DataFrame:
    """Per group of `by` of a per-image table: each score's mean and bootstrap interval, and n_images.

    columns: {score name in the output: per-image column of `table`}. Output columns: `by`, then
    `interval_columns(columns)`, then n_images."""
    rows = []
    for key, group in table.groupby(by, sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for name, column in columns.items():
            values = group[column].to_numpy(dtype=np.float64)
            row[name] = float(values.mean())
            row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(values, seed=seed)
        row["n_images"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *interval_columns(columns), "n_images"])


def clears(best: tuple[float, float], runner_up: tuple[float, float], higher_is_better: bool = True) -> bool:
    """Whether the interval `best` (low, high) lies wholly beyond the interval `runner_up` in the better direction."""
    return best[0] > runner_up[1] if higher_is_better else best[1] < runner_up[0]

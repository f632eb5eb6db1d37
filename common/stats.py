"""Is a difference real? Paired intervals for the comparisons a report makes.

Two models compared on the same seeds (same initialisation, same batch order, same views) or
on the same test images are paired: the noise that both share cancels in their difference, so
the interval is of the per-pair differences, not of two separate means.
- Over seed pairs (>= 3): the 95% t-interval of the mean per-seed difference. It covers seed
  noise (initialisation, batch order, selection) and, through each seed's test accuracy, the
  test sample as it was drawn once.
- Over test images (one seed, or a comparison without seeds such as an ensemble against its
  member): the paired bootstrap of the mean per-image difference in correctness, with a fixed
  RNG. It covers which test images were drawn, not seed noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
"""Bootstrap resamples: the interval's ends move by ~0.01 points between RNG seeds here."""


def t_quantile(q: float, df: int) -> float:
    """Student's t quantile (scipy's, which scikit-learn already brings)."""
    from scipy.stats import t

    return float(t.ppf(q, df))


def normal_quantile(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def paired_t_interval(diffs: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """{"gain", "ci95", "n"}: the mean of `diffs` (one per seed pair) and its t-interval,
    mean ± t(1 - (1 - confidence) / 2, n - 1) · sd / sqrt(n)."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 pairs, got {n}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(1 - (1 - confidence) / 2, n - 1) * sd / math.sqrt(n)
    return {"gain": mean, "ci95": [mean - half, mean + half], "n": n}


def paired_bootstrap_interval(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict:
    """{"gain", "ci95", "n"}: accuracy of B minus accuracy of A on the same test images, and
    the percentile interval of that difference over `resamples` resamplings of the images
    (the same resampled images for both: the pairing). `correct_*`: [n_images] or [pairs,
    n_images] (several seed pairs, averaged per resample) booleans."""
    a = np.atleast_2d(np.asarray(correct_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(correct_b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired predictions differ in shape: {a.shape} and {b.shape}")
    per_image = (b - a).mean(0)  # [n_images]: the difference, averaged over seed pairs
    n = per_image.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # resamples at a time: <= 2M indices (16 MB) at any size
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        means[start : start + rows] = per_image[idx].mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"gain": float(per_image.mean()), "ci95": [float(low), float(high)], "n": n}


def accuracy_interval(acc: float, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """The Wilson score interval of an accuracy measured on `n` test images: what the test
    sample alone leaves open (used to say whether a model sits at chance)."""
    z = normal_quantile(1 - (1 - confidence) / 2)
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n))
    return [centre - half, centre + half]


def direction(ci95: Sequence[float]) -> str:
    """ "better" / "worse" when the interval excludes 0, else "within noise"."""
    low, high = ci95
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "within noise"

"""Stateless seeding: every random choice is a pure function of integers.

Views, epoch permutations and view selection are derived from (seed, sample_id, view_id, ...)
rather than from a running RNG, so they do not depend on loader workers, world size, batch
size or iteration order, and a later stage can rebuild exactly the pixels a teacher saw.
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1


def mix(*values: int) -> int:
    """splitmix64 over a sequence of non-negative integers -> 63-bit seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        h = z ^ (z >> 31)
    return h >> 1


def rng_for(*values: int) -> np.random.Generator:
    """A fresh numpy Generator fully determined by `values`."""
    return np.random.default_rng(mix(*values))

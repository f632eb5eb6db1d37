"""When to prune how much: the iterative schedule as pure arithmetic (no models, no processes).

Round k of R removes 1 - (1 - ratio)^(1/R) of what is left of the target quantity, so the
rounds compound to `ratio` of the original; a MACs budget can end the schedule early.
"""

from __future__ import annotations


def round_ratio(ratio: float, rounds: int) -> float:
    """The share each of `rounds` equal rounds removes so that together they remove `ratio`."""
    return 1.0 - (1.0 - ratio) ** (1.0 / rounds)


def last_round(k: int, rounds: int, macs_kept: float, macs_budget: float | None) -> bool:
    """Whether round `k` (0-based) ends the schedule: the last one, or the budget is met."""
    return k == rounds - 1 or (macs_budget is not None and macs_kept <= macs_budget)
